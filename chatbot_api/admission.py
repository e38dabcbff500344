"""Load shedding: a worker refuses new answers at once when too many are already starting.

Starting an answer is the expensive part of its life in this process (request parsing,
limits, the turn's INSERTs, the model's request: ~15 ms of CPU, docs/benchmarks.md);
relaying its tokens afterwards is cheap. A worker asked to start more answers than its
event loop can keep up with would otherwise queue them all: every new request waits
seconds for its first token while the running streams stutter. So each worker counts the
answer requests between their arrival and the moment their answer has started (the
response begins, or a JSON-mode view says so), and past `CHATBOT_MAX_STARTING_ANSWERS`
answers the rest with 503 `server_busy` and `Retry-After` before Django sees them: a
client (or a load balancer) retries, here or on another worker.

A burst can outrun that count: requests wait in the event loop's queue before they reach
the gate, where no count sees them. So the gate also watches the loop itself: while its
smoothed lag (a probe that sleeps 50 ms and measures how late it wakes) is over
`CHATBOT_MAX_LOOP_LAG`, new answers are refused too, and the work already admitted
catches up.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from functools import lru_cache

from . import metrics
from .conf import chatbot_setting
from .errors import ChatbotError

RETRY_AFTER = 1  # seconds: a starting answer takes milliseconds, so room comes back quickly
BUSY_MESSAGE = "This server is starting too many answers at once; try again in a moment."
ADMITTED = "chatbot.admitted"  # the scope key of the request's release callable
GATE = "chatbot.answer_gate"  # the scope key of the gate, in a WebSocket's scope
LAG_PROBE = 0.05  # seconds between the lag probe's wake-ups (every 10 ms cost ~2% of a request's CPU)
LAG_SMOOTHING = 0.5  # weight of the newest probe: one 100 ms pause alone does not refuse anybody


class AnswerAdmission:
    """ASGI middleware in front of Django: at most N answers starting at once in this process."""

    def __init__(self, app):
        self.app = app
        self.starting = 0
        self.loop_lag = 0.0  # smoothed, seconds
        self._probe: asyncio.Task | None = None

    async def __call__(self, scope, receive, send):
        view_class = _answer_view(scope) if shedding_enabled() and scope["type"] == "http" else None
        if view_class is None:
            return await self.app(scope, receive, send)
        release = self.admit()
        if release is None:
            return await _refuse(view_class, send)

        async def send_and_release(message):
            if message["type"] == "http.response.start":
                release()
            await send(message)

        try:
            await self.app({**scope, ADMITTED: release}, receive, send_and_release)
        finally:
            release()

    def admit(self) -> Callable[[], None] | None:
        """Count one more answer starting and return its release (safe to call twice), or
        None when it must be refused (counted in the shedding metric)."""
        limit, max_lag = chatbot_setting("MAX_STARTING_ANSWERS"), chatbot_setting("MAX_LOOP_LAG")
        if max_lag:
            self._watch_this_loop()
        cause = "starting" if limit and self.starting >= limit else None
        if cause is None and max_lag and self.loop_lag > max_lag:
            cause = "loop_lag"
        if cause:
            metrics.SHED.labels(cause).inc()
            return None
        self.starting += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.starting -= 1

        return release

    def _watch_this_loop(self) -> None:
        """The lag probe runs on the loop serving requests (a new one after a test's server restarts)."""
        loop = asyncio.get_running_loop()
        if self._probe is None or self._probe.done() or self._probe.get_loop() is not loop:
            self.loop_lag = 0.0
            self._probe = loop.create_task(self._watch_loop_lag(), name="chatbot-loop-lag")

    async def _watch_loop_lag(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            asked = loop.time()
            await asyncio.sleep(LAG_PROBE)
            late = max(loop.time() - asked - LAG_PROBE, 0.0)
            self.loop_lag += LAG_SMOOTHING * (late - self.loop_lag)


def shedding_enabled() -> bool:
    return bool(chatbot_setting("MAX_STARTING_ANSWERS") or chatbot_setting("MAX_LOOP_LAG"))


def admit_websocket_answer(scope) -> Callable[[], None]:
    """A WebSocket's `chat`, `regenerate` or `continue` passes the same gate as an HTTP start:
    the release, or `busy_error()` raised (the socket stays open; the client retries later)."""
    gate = scope.get(GATE)
    if gate is None or not shedding_enabled():
        return lambda: None
    release = gate.admit()
    if release is None:
        raise busy_error()
    return release


def busy_error() -> ChatbotError:
    """The refusal as an error a WebSocket sends in a frame: no headers there, so the wait is in it."""
    return ChatbotError(
        BUSY_MESSAGE,
        code="server_busy",
        status_code=503,
        retryable=True,
        extra={"retry_safe": True, "retry_after": RETRY_AFTER},
    )


def started(request) -> None:
    """The answer of `request` has started (its model request is out): it no longer counts."""
    release = getattr(request, "scope", {}).get(ADMITTED)
    if release is not None:
        release()


def _answer_view(scope):
    """The view class of a request that starts an answer (`starts_answer`), else None."""
    if scope.get("method") != "POST":
        return None
    path = scope["path"]
    root_path = scope.get("root_path", "")
    if root_path and path.startswith(root_path):
        path = path[len(root_path) :]
    return _view_class_for(path)


@lru_cache(maxsize=4096)  # bounded: paths of regenerate/edit carry message ids
def _view_class_for(path: str):
    from django.urls import Resolver404, resolve

    try:
        match = resolve(path)
    except Resolver404:
        return None
    view_class = getattr(match.func, "view_class", None)
    return view_class if getattr(view_class, "starts_answer", False) else None


async def _refuse(view_class, send) -> None:
    status = 503
    body = view_class.busy_body(BUSY_MESSAGE, "server_busy", status)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"retry-after", str(RETRY_AFTER).encode()),
                (b"cache-control", b"no-store"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": json.dumps(body).encode()})
