"""Real processes for the fault suite: a private redis-server and uvicorn workers that can be killed.

Nothing here touches the machine's shared Redis or PostgreSQL servers beyond the test
database pytest-django made: the Redis server is our own, on a free loopback port, so
the tests can kill it, restart it empty and freeze it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, *, timeout: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the process exited with {process.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


class RedisServer:
    """A private `redis-server` on a free port: start, kill -9, restart empty, freeze, thaw."""

    def __init__(self) -> None:
        self.port = free_port()
        self.directory = tempfile.mkdtemp(prefix="chatbot-redis-")
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @staticmethod
    def available() -> bool:
        return shutil.which("redis-server") is not None

    def start(self) -> RedisServer:
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", self.directory,
                "--loglevel", "warning",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_for_port(self.port, timeout=10, process=self.process)
        return self

    def kill(self) -> None:
        """SIGKILL: what a crash or an OOM kill does; everything it held is gone."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # a frozen server must be able to die
            self.process.kill()
            self.process.wait(10)

    def restart_empty(self) -> None:
        self.kill()
        self.start()

    def freeze(self) -> None:
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.directory, ignore_errors=True)


class Worker:
    """The product under uvicorn in a process of its own, as `make run` starts it."""

    def __init__(self, env: dict[str, str], *, name: str, graceful: float = 10) -> None:
        self.env = env
        self.name = name
        self.graceful = graceful
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self.log_path = Path(tempfile.gettempdir()) / f"chatbot-worker-{name}-{self.port}.log"

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Worker:
        self._log = open(self.log_path, "wb")  # kept open for the process's life
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "uvicorn", "chatbot.asgi:application",
                "--host", "127.0.0.1", "--port", str(self.port),
                "--lifespan", "on", "--log-level", "warning", "--no-access-log",
                "--timeout-graceful-shutdown", str(self.graceful),
            ],
            cwd=ROOT,
            env={**os.environ, **self.env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        wait_for_port(self.port, timeout=30, process=self.process)
        return self

    def kill(self, signum: int = signal.SIGKILL) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signum)

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        if getattr(self, "_log", None) is not None:
            self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
