"""Fake OpenAI-compatible upstream for tests and benchmarks.

It speaks the real Chat Completions HTTP + SSE wire format on loopback, so the code under test runs
its real client (the ``openai`` SDK over ``httpx2``) and we can script timing and failures and see
what reached the upstream and when the connection went away.

What the ``openai`` 3.x SDK (``AsyncOpenAI``, ``stream=True``) raises while iterating, as observed
in ``tests/test_fake_openai.py`` with openai 3.57 / httpx2 2.16 / uvicorn 0.54 (httptools):

* ``malformed_after`` (a ``data: {not json`` frame): ``json.JSONDecodeError`` (a ``ValueError``), raised
  unwrapped from ``json.loads`` -- it is NOT an ``openai.APIError``.
* ``drop_after`` (socket closed mid chunked body): ``openai.APIConnectionError`` whose ``__cause__`` is
  ``httpx2.RemoteProtocolError`` ("peer closed connection without sending complete message body").
* ``error_frame_after`` (``data: {"error": {...}}``): plain ``openai.APIError`` carrying the message.
* ``status=500`` / ``status=429``: ``openai.InternalServerError`` / ``openai.RateLimitError`` at
  ``create()`` time, before any iteration.

Run standalone for benchmarks::

    python -m tests.support.fake_openai --port 8001 --chunks 64 --interval 0.02
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import itertools
import json
import logging
import math
import re
import sys
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import uvicorn

from tests.support.servers import UvicornThread

__all__ = ["FakeOpenAI", "FakeOpenAIServer", "RecordedRequest", "Script", "chunk_frame", "serve_forever"]

ASGIMessage = MutableMapping[str, Any]
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[ASGIMessage]]
Send = Callable[[ASGIMessage], Awaitable[None]]

COMPLETION_PATHS = frozenset({"/v1/chat/completions", "/chat/completions"})
MODEL_LIST_PATHS = frozenset({"/v1/models", "/models"})
DONE_FRAME = b"data: [DONE]\n\n"
MALFORMED_FRAME = b"data: {not json\n\n"
SSE_CONTENT_TYPE = b"text/event-stream"

_DEFAULT_ERRORS: dict[int, tuple[str, str, str | None]] = {
    400: ("Invalid request.", "invalid_request_error", None),
    401: ("Incorrect API key provided.", "invalid_request_error", "invalid_api_key"),
    404: (
        "The model does not exist or you do not have access to it.",
        "invalid_request_error",
        "model_not_found",
    ),
    429: ("Rate limit reached for requests.", "requests", "rate_limit_exceeded"),
    500: ("The server had an error while processing your request.", "server_error", None),
    503: ("The engine is currently overloaded, please try again later.", "server_error", None),
}


def error_payload(message: str, type_: str = "server_error", code: str | None = None) -> dict[str, Any]:
    """Build an error body exactly as OpenAI shapes it, so SDK error parsing sees the real thing."""
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


def chunk_frame(*, content: Any = None, finish_reason: Any = None, usage: Any = None) -> bytes:
    """One ``data:`` frame shaped like OpenAI's, carrying any values (also ones OpenAI never sends)."""
    frame: dict[str, Any] = {
        "id": "chatcmpl-raw",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": "fake",
        "choices": [],
    }
    if content is not None or finish_reason is not None:
        delta = {} if content is None else {"content": content}
        frame["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    if usage is not None:
        frame["usage"] = usage
    return b"data: " + _dumps(frame) + b"\n\n"


def _default_error(status: int) -> dict[str, Any]:
    message, type_, code = _DEFAULT_ERRORS.get(
        status, ("The server had an error while processing your request.", "server_error", None)
    )
    return error_payload(message, type_, code)


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


class _DropConnection(Exception):
    """Raised inside the ASGI app after the response started: uvicorn then closes the socket
    without the terminating zero-length chunk, which is how an upstream crash looks on the wire."""


class _QuietDropFilter(logging.Filter):
    """Keeps uvicorn from printing a traceback for every scripted drop."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, _DropConnection)


def _install_drop_log_filter() -> None:
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _QuietDropFilter) for f in logger.filters):
        logger.addFilter(_QuietDropFilter())


async def _read_json_body(receive: Receive, send: Send) -> dict[str, Any] | None:
    """The request's JSON object; None when the client left or was answered 400."""
    raw = await _drain_body(receive)
    if raw is None:  # client left while sending the request
        return None
    try:
        body = json.loads(raw) if raw else {}
        if not isinstance(body, dict):
            raise ValueError("body must be a JSON object")
    except ValueError as exc:
        await _send_json(send, 400, error_payload(f"Invalid JSON body: {exc}", "invalid_request_error"))
        return None
    return body


@dataclass(frozen=True)
class Script:
    """One scripted upstream response. Frozen because its SSE frames are encoded once and cached;
    use ``dataclasses.replace(script, ...)`` to derive variants.

    The ``*_after`` triggers count content chunks: ``drop_after=2`` sends two content chunks, then drops.
    Non-streaming requests honour ``status``, the delays, ``hang_after``, ``drop_after`` (truncated body)
    and ``malformed_after`` (invalid JSON body); ``error_frame_after`` only applies to streams.
    """

    chunks: Sequence[str] = ("Hello", " world", "!")
    interval: float = 0.0  # seconds between content chunks (also before the finish chunk)
    first_delay: float = 0.0  # after the response headers, before the first frame (time to first token)
    headers_delay: float = 0.0  # before the status line: a slow or hung upstream connect
    usage: dict[str, int] | None = None  # None: prompt words / number of chunks
    send_usage: bool = True  # streams still need ``stream_options.include_usage`` to get it
    finish_reason: str = "stop"
    status: int = 200
    error_body: dict[str, Any] | None = None  # non-200 body and error-frame payload; None: OpenAI default
    retry_after: float = 1.0  # seconds, advertised on 429 responses
    malformed_after: int | None = None  # inject ``data: {not json`` and carry on
    drop_after: int | None = None  # abort the socket mid-body
    error_frame_after: int | None = None  # send ``data: {"error": ...}`` and end the body (no [DONE])
    hang_after: int | None = None  # go silent until the client disconnects
    # Sent as they are after the content chunks, before the finish frame: hostile or odd data
    # (bad usage, non-string content, invalid UTF-8, a frame cut mid-way) in the real framing.
    raw_frames: Sequence[bytes] = ()

    def __post_init__(self) -> None:
        # A tuple keeps the cached frames in sync with the chunks (a list could be mutated later).
        object.__setattr__(self, "chunks", tuple(self.chunks))
        object.__setattr__(self, "raw_frames", tuple(self.raw_frames))

    @property
    def text(self) -> str:
        return "".join(self.chunks)

    @functools.cached_property
    def _choice_parts(self) -> tuple[bytes, tuple[bytes, ...], bytes]:
        """Role, content and finish ``choices`` payloads (each closing the ``choices`` array)."""
        role = {
            "index": 0,
            "delta": {"role": "assistant", "content": "", "refusal": None},
            "logprobs": None,
            "finish_reason": None,
        }
        content = tuple(
            _dumps({"index": 0, "delta": {"content": chunk}, "logprobs": None, "finish_reason": None}) + b"]"
            for chunk in self.chunks
        )
        finish = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": self.finish_reason}
        return _dumps(role) + b"]", content, _dumps(finish) + b"]"

    @functools.cached_property
    def _error_body(self) -> dict[str, Any]:
        if self.error_body is not None:
            return self.error_body
        return _default_error(self.status if self.status != 200 else 500)

    @functools.cached_property
    def _error_frame(self) -> bytes:
        return b"data: " + _dumps(self._error_body) + b"\n\n"


@dataclass
class RecordedRequest:
    """What the fake received and how the exchange ended; times are ``time.monotonic()`` seconds."""

    index: int
    path: str
    body: dict[str, Any]
    headers: dict[str, str]
    received_at: float
    script: Script
    stream: bool
    include_usage: bool
    first_byte_at: float | None = None  # first response body byte handed to the socket
    closed_at: float | None = None  # response finished, aborted, or client disconnect seen
    disconnected: bool = False  # the client went away before the response was complete
    chunks_sent: int = 0  # content chunks only (not role/finish/usage frames)
    _ending: bool = field(default=False, init=False, repr=False)

    @property
    def messages(self) -> list[dict[str, Any]]:
        return list(self.body.get("messages") or [])

    @property
    def model(self) -> str:
        return str(self.body.get("model", ""))

    @property
    def closed(self) -> bool:
        return self.closed_at is not None


def _count_prompt_words(messages: Any) -> int:
    """Cheap stand-in for a tokenizer: whitespace-separated words of every text part."""
    words = 0
    for message in messages if isinstance(messages, list) else ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            words += len(content.split())
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    words += len(part["text"].split())
    return words


def split_text(text: str) -> list[str]:
    """Split text into word-sized deltas with leading spaces, the way model tokens usually arrive."""
    return re.findall(r"\s*\S+|\s+$", text) or [text]


class FakeOpenAI:
    """ASGI app for ``POST /v1/chat/completions`` answering from a FIFO of :class:`Script`.

    The app runs on the server's event loop thread; the queue, history and ``wait_*`` helpers are safe to
    use from any other thread or event loop.
    """

    def __init__(self, default: Script | None = None, *, keep_history: bool = True) -> None:
        self.default: Script = default if default is not None else Script()
        self.keep_history = keep_history  # off for long benchmarks so memory stays flat
        self.models: list[str] = []  # GET /v1/models lists these; empty: 404, as servers without it do
        self.history: list[RecordedRequest] = []
        self.request_count = 0
        self._queue: deque[Script] = deque()
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._producers: set[asyncio.Task[None]] = set()
        _install_drop_log_filter()

    # -- scripting ---------------------------------------------------------------------------------

    def enqueue(self, *scripts: Script) -> None:
        """Answer the next requests with these scripts, in order; then fall back to ``default``."""
        self._queue.extend(scripts)

    def enqueue_text(self, text: str | Sequence[str], **overrides: Any) -> Script:
        """Queue a successful response streaming ``text`` (split into words, or the given chunks)."""
        chunks = split_text(text) if isinstance(text, str) else list(text)
        script = Script(chunks=chunks, **overrides)
        self.enqueue(script)
        return script

    @property
    def pending(self) -> int:
        return len(self._queue)

    def reset(self) -> None:
        """Forget queued scripts, history and listed models (keeps ``default``)."""
        self.models = []
        self._queue.clear()
        with self._cond:
            self.history.clear()
            self.request_count = 0

    def abort_streams(self) -> None:
        """Drop every in-flight response; lets a server stop promptly even with hung scripts."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return

        def cancel_all() -> None:
            for task in list(self._producers):
                task.cancel()

        try:
            loop.call_soon_threadsafe(cancel_all)
        except RuntimeError:  # loop closed between the check and the call
            pass

    # -- waiting (any thread / any loop) ------------------------------------------------------------

    def wait_for_request(self, n: int = 1, timeout: float = 5.0) -> RecordedRequest:
        """Block until at least ``n`` requests arrived; return the ``n``-th (1-based)."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.history) >= n, timeout):
                raise TimeoutError(f"expected {n} request(s) within {timeout}s, got {len(self.history)}")
            return self.history[n - 1]

    def wait_for_disconnect(self, index: int = -1, timeout: float = 5.0) -> RecordedRequest:
        """Block until request ``index`` (``-1``: the latest one at the time it is seen) has ended.

        Returns the record whatever the reason; assert ``.disconnected`` to prove the client hung up.
        """
        probe = self._closed_probe(index)
        with self._cond:
            if not self._cond.wait_for(lambda: probe() is not None, timeout):
                raise TimeoutError(f"request {index} did not end within {timeout}s")
            record = probe()
            assert record is not None
            return record

    # ``timeout`` mirrors the sync helpers on purpose, hence the ASYNC109 waivers.
    async def wait_for_request_async(self, n: int = 1, timeout: float = 5.0) -> RecordedRequest:
        """Like :meth:`wait_for_request` without blocking the caller's event loop."""
        deadline = time.monotonic() + timeout
        while len(self.history) < n:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"expected {n} request(s) within {timeout}s, got {len(self.history)}")
            await asyncio.sleep(0.005)
        return self.history[n - 1]

    async def wait_for_disconnect_async(
        self,
        index: int = -1,
        timeout: float = 5.0,
    ) -> RecordedRequest:
        """Like :meth:`wait_for_disconnect` without blocking the caller's event loop."""
        probe = self._closed_probe(index)
        deadline = time.monotonic() + timeout
        while (record := probe()) is None:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"request {index} did not end within {timeout}s")
            await asyncio.sleep(0.005)
        return record

    def _closed_probe(self, index: int) -> Callable[[], RecordedRequest | None]:
        """Pin a negative index to a concrete request once one exists, so later arrivals don't shift it."""
        resolved: int | None = index if index >= 0 else None

        def probe() -> RecordedRequest | None:
            nonlocal resolved
            if resolved is None:
                if len(self.history) < -index:
                    return None
                resolved = len(self.history) + index
            if resolved >= len(self.history):
                return None
            record = self.history[resolved]
            return record if record.closed_at is not None else None

        return probe

    def _notify(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # -- ASGI ---------------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        self._loop = asyncio.get_running_loop()

        path = scope["path"].rstrip("/") or "/"
        if scope["method"] == "GET" and path in MODEL_LIST_PATHS and self.models:
            await self._list_models(receive, send)
            return
        if scope["method"] != "POST" or path not in COMPLETION_PATHS:
            await _drain_body(receive)
            message = f"Invalid URL ({scope['method']} {scope['path']})"
            await _send_json(send, 404, error_payload(message, "invalid_request_error"))
            return

        body = await _read_json_body(receive, send)
        if body is None:
            return
        record = self._record(scope, path, body)
        producer = asyncio.ensure_future(self._respond(record, send))
        watcher = asyncio.ensure_future(_watch_disconnect(receive, record))
        self._producers.add(producer)
        try:
            await asyncio.wait((producer, watcher), return_when=asyncio.FIRST_COMPLETED)
            if not producer.done():  # the client hung up first: stop producing, end quietly
                producer.cancel()
                await asyncio.wait((producer,))
            elif producer.cancelled():  # abort_streams()
                raise _DropConnection("aborted by FakeOpenAI.abort_streams()")
            else:
                producer.result()  # re-raise a scripted drop (or a bug) so uvicorn closes the socket
        finally:
            self._producers.discard(producer)
            for task in (producer, watcher):
                task.cancel()
            if record.closed_at is None:
                record.closed_at = time.monotonic()
            self._notify()

    async def _list_models(self, receive: Receive, send: Send) -> None:
        await _drain_body(receive)
        listed = [{"id": model, "object": "model", "created": 0, "owned_by": "fake"} for model in self.models]
        await _send_json(send, 200, {"object": "list", "data": listed})

    def _record(self, scope: Scope, path: str, body: dict[str, Any]) -> RecordedRequest:
        headers: dict[str, str] = {}
        for name, value in scope.get("headers", ()):
            key, text = name.decode("latin-1").lower(), value.decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        stream_options = body.get("stream_options")
        script = self._queue.popleft() if self._queue else self.default
        with self._cond:
            record = RecordedRequest(
                index=self.request_count,
                path=path,
                body=body,
                headers=headers,
                received_at=time.monotonic(),
                script=script,
                stream=bool(body.get("stream")),
                include_usage=isinstance(stream_options, dict) and bool(stream_options.get("include_usage")),
            )
            self.request_count += 1
            if self.keep_history:
                self.history.append(record)
            self._cond.notify_all()
        return record

    async def _respond(self, record: RecordedRequest, send: Send) -> None:
        script = record.script
        if script.headers_delay:
            await asyncio.sleep(script.headers_delay)
        if script.status != 200:
            await self._send_error(record, send)
        elif record.stream:
            await self._stream(record, send)
        else:
            await self._complete(record, send)

    async def _send_error(self, record: RecordedRequest, send: Send) -> None:
        script = record.script
        extra: list[tuple[bytes, bytes]] = []
        if script.status == 429:
            extra.append((b"retry-after", str(math.ceil(script.retry_after)).encode()))
            extra.append((b"retry-after-ms", str(int(script.retry_after * 1000)).encode()))
        record._ending = True
        record.first_byte_at = time.monotonic()
        await _send_json(send, script.status, script._error_body, extra, request_id=record.index)

    def _usage(self, record: RecordedRequest) -> dict[str, int]:
        script = record.script
        if script.usage is not None:
            usage = dict(script.usage)
        else:
            usage = {
                "prompt_tokens": _count_prompt_words(record.body.get("messages")),
                "completion_tokens": len(script.chunks),
            }
        usage.setdefault("total_tokens", usage.get("prompt_tokens", 0) + usage.get("completion_tokens", 0))
        return usage

    async def _stream(self, record: RecordedRequest, send: Send) -> None:
        script = record.script
        role, contents, finish = script._choice_parts
        count = len(contents)
        prefix = (
            b'data: {"id":"chatcmpl-fake%d","object":"chat.completion.chunk","created":%d,"model":%s,'
            b'"system_fingerprint":null,"choices":['
        ) % (next(self._ids), int(time.time()), _dumps(record.model))
        # OpenAI adds "usage":null to every chunk once the client asked for usage.
        tail = b',"usage":null}\n\n' if record.include_usage else b"}\n\n"

        async def frame(data: bytes) -> None:
            if record.first_byte_at is None:
                record.first_byte_at = time.monotonic()
            await send({"type": "http.response.body", "body": data, "more_body": True})

        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", SSE_CONTENT_TYPE),
                    (b"cache-control", b"no-cache"),
                    (b"x-request-id", b"req_fake%d" % record.index),
                ],
            }
        )
        if script.first_delay:
            await asyncio.sleep(script.first_delay)

        role_sent = False
        for i in range(count + 1):
            if i and script.interval:
                await asyncio.sleep(script.interval)
            if not await self._scripted_fault(record, send, frame, i, count):
                return
            if not role_sent:
                await frame(prefix + role + tail)
                role_sent = True
            if i == count:
                break
            await frame(prefix + contents[i] + tail)
            record.chunks_sent += 1

        for raw in script.raw_frames:
            await frame(raw)
        await frame(prefix + finish + tail)
        if record.include_usage and script.send_usage:
            await frame(prefix + b'],"usage":' + _dumps(self._usage(record)) + b"}\n\n")
        record._ending = True
        await send({"type": "http.response.body", "body": DONE_FRAME, "more_body": False})

    @staticmethod
    async def _scripted_fault(record: RecordedRequest, send: Send, frame, position: int, count: int) -> bool:
        """The fault the script asks for at this point of the stream; False when the body ended."""
        script = record.script
        if _triggers(script.malformed_after, position, count):
            await frame(MALFORMED_FRAME)
        if _triggers(script.error_frame_after, position, count):
            await frame(script._error_frame)
            record._ending = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return False
        if _triggers(script.drop_after, position, count):
            raise _DropConnection(f"scripted drop after {record.chunks_sent} chunk(s)")
        if _triggers(script.hang_after, position, count):
            await asyncio.Future()  # until the client disconnects (we get cancelled)
        return True

    async def _complete(self, record: RecordedRequest, send: Send) -> None:
        script = record.script
        delay = script.first_delay + script.interval * len(script.chunks)
        if delay:
            await asyncio.sleep(delay)
        if script.hang_after is not None:
            await asyncio.Future()
        payload: dict[str, Any] = {
            "id": f"chatcmpl-fake{next(self._ids)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": record.model,
            "system_fingerprint": None,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": script.text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": script.finish_reason,
                }
            ],
        }
        if script.send_usage:
            payload["usage"] = self._usage(record)
        data = _dumps(payload)
        record.chunks_sent = len(script.chunks)
        if script.drop_after is not None:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", b"%d" % len(data)),
                    ],
                }
            )
            record.first_byte_at = time.monotonic()
            await send({"type": "http.response.body", "body": data[: len(data) // 2], "more_body": True})
            raise _DropConnection("scripted drop of a non-streaming response")
        if script.malformed_after is not None:
            data = b"{not json"
        record._ending = True
        record.first_byte_at = time.monotonic()
        await _send_json(send, 200, data, request_id=record.index)


def _triggers(after: int | None, position: int, count: int) -> bool:
    """True at the point where ``after`` content chunks have gone out (capped at the last chunk)."""
    return after is not None and position == min(after, count)


async def _watch_disconnect(receive: Receive, record: RecordedRequest) -> None:
    """Return when the client disconnects. uvicorn also reports ``http.disconnect`` once the response
    completed; ``_ending`` (set right before the final send) tells the two apart."""
    while (await receive())["type"] != "http.disconnect":
        pass
    if not record._ending:
        record.disconnected = True
        record.closed_at = time.monotonic()


async def _drain_body(receive: Receive) -> bytes | None:
    """Read the whole request body; None if the client disconnected first."""
    parts: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(parts)


async def _send_json(
    send: Send,
    status: int,
    payload: dict[str, Any] | bytes,
    extra_headers: Sequence[tuple[bytes, bytes]] = (),
    request_id: int | None = None,
) -> None:
    data = payload if isinstance(payload, bytes) else _dumps(payload)
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(data)), *extra_headers]
    if request_id is not None:
        headers.append((b"x-request-id", b"req_fake%d" % request_id))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data, "more_body": False})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


class FakeOpenAIServer(UvicornThread):
    """Runs a :class:`FakeOpenAI` under uvicorn on ``127.0.0.1`` in a daemon thread with its own loop.

    Use as ``with FakeOpenAIServer() as server:`` (or ``start()``/``stop()`` from a fixture); point the
    client at ``server.url`` and script ``server.fake``.
    """

    def __init__(self, fake: FakeOpenAI | None = None, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.fake = fake if fake is not None else FakeOpenAI()
        super().__init__(
            self.fake, host=host, port=port, lifespan="off", ws="none", timeout_graceful_shutdown=2
        )

    @property
    def url(self) -> str:
        """OpenAI ``base_url`` (with ``/v1``)."""
        return f"{self.origin}/v1"

    def stop(self, timeout: float = 10.0) -> None:
        self.fake.abort_streams()  # a hung script must not hold up the shutdown
        super().stop(timeout)


def serve_forever(
    host: str = "127.0.0.1",
    port: int = 8001,
    script: Script | None = None,
    *,
    log_level: str = "warning",
    ready_message: bool = True,
    fake: FakeOpenAI | None = None,
    backlog: int = 2048,
) -> None:
    """Serve in the foreground (signals handled) as a separate benchmark process; no history is kept.

    Prints ``fake-openai ready <url>`` on stdout once listening, so a parent can wait for it.
    ``fake`` replaces the default ``FakeOpenAI(script)`` (``bench.upstream`` passes a subclass).
    """
    fake = fake or FakeOpenAI(script, keep_history=False)
    config = uvicorn.Config(
        fake,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        lifespan="off",
        ws="none",
        timeout_graceful_shutdown=2,
        backlog=backlog,
    )
    server = uvicorn.Server(config)
    _install_drop_log_filter()  # after Config() (re)configured logging

    def announce() -> None:
        while not server.started and not server.should_exit:
            time.sleep(0.01)
        if server.started:
            bound = server.servers[0].sockets[0].getsockname()[1]
            print(f"fake-openai ready http://{host}:{bound}/v1", flush=True)

    if ready_message:
        threading.Thread(target=announce, daemon=True).start()
    server.run()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--chunks", type=int, default=None, help="repeat --chunk-text this many times")
    parser.add_argument("--chunk-text", default=" tok", help="text of each chunk (default: %(default)r)")
    parser.add_argument("--interval", type=float, default=0.0, help="seconds between chunks")
    parser.add_argument("--first-delay", type=float, default=0.0, help="seconds before the first chunk")
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    script = Script(interval=args.interval, first_delay=args.first_delay)
    if args.chunks is not None:
        script = dataclasses.replace(script, chunks=[args.chunk_text] * args.chunks)
    serve_forever(args.host, args.port, script, log_level=args.log_level)


if __name__ == "__main__":
    sys.exit(main())
