"""A real uvicorn server on loopback in a background thread, for end-to-end tests."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import uvicorn


class UvicornThread:
    """Serves an ASGI app on 127.0.0.1 (a free port) from a daemon thread with its own event loop."""

    def __init__(self, app, *, host: str = "127.0.0.1", port: int = 0, **config) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.config = {"log_level": "warning", "log_config": None, "access_log": False, **config}
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def origin(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> UvicornThread:
        server = uvicorn.Server(uvicorn.Config(self.app, host=self.host, port=self.port, **self.config))
        thread = threading.Thread(target=server.run, name=f"uvicorn-{id(self)}", daemon=True)
        self._server, self._thread = server, thread
        thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("uvicorn failed to start")
            time.sleep(0.005)
        self.port = server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self, timeout: float = 10.0) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None or thread is None:
            return
        server.should_exit = True
        thread.join(timeout)

    def __enter__(self) -> UvicornThread:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def answer_admission():
    """The load-shedding gate inside the served application (chatbot.asgi)."""
    from chatbot.asgi import application
    from chatbot_api.admission import AnswerAdmission

    app = application
    while not isinstance(app, AnswerAdmission):
        mapping = getattr(app, "application_mapping", None)
        app = mapping["http"] if mapping else app.app  # LifespanMiddleware → router → the gate
    return app


@contextlib.contextmanager
def lagging_loop(gate):
    """Keep the served application's event loop really busy (150 ms blocks, 5 ms apart) until exit.

    `gate` is `answer_admission()`, whose lag probe must already run (one answer started)."""
    loop, hogging = gate._probe.get_loop(), threading.Event()
    hogging.set()

    def hog() -> None:
        if hogging.is_set():
            time.sleep(0.15)
            loop.call_later(0.005, hog)

    loop.call_soon_threadsafe(hog)
    try:
        yield
    finally:
        hogging.clear()


def closed_port() -> int:
    """A loopback port nothing listens on (bound once, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
