"""Thin views of one event stream: SSE, NDJSON, the seed's assembled JSON, WebSocket frames.

Each function takes the async iterator from `follow.follow_events()` and only changes
the framing. SSE and NDJSON keep idle connections open with their own keep-alive (ask
`follow_events(keepalives=True)` for them); JSON and WebSocket (pinged by the server at
the protocol level) take the events alone. Under ASGI every chunk is handed to the server as soon as it
is produced: the iterators are async, nothing buffers, and SSE is never compressed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

from asgiref.sync import SyncToAsync, sync_to_async
from django.db import connections
from django.http import StreamingHttpResponse
from rest_framework.renderers import BaseRenderer

from .eventlog import KEEPALIVE
from .events import Answer, Event

SSE_CONTENT_TYPE = "text/event-stream"
NDJSON_CONTENT_TYPE = "application/x-ndjson"
# Sent first: tells EventSource to reconnect after one second instead of its default three.
SSE_PREAMBLE = b"retry: 1000\n\n"
SSE_KEEPALIVE = b": keep-alive\n\n"
NDJSON_KEEPALIVE = b"\n"


def sse_encode(event: Event) -> bytes:
    if event.seq is None:  # a reader's own terminal event: Last-Event-ID stays where it was
        return f"event: {event.type}\ndata: {event.json}\n\n".encode()
    return f"id: {event.seq}\nevent: {event.type}\ndata: {event.json}\n\n".encode()


# Each transport closes the event iterator itself (`aclosing`) so a client that goes
# away ends the reader at once, not whenever the garbage collector gets to it.


def _close_and_forget_connections() -> None:
    # Forgotten too: a closed connection's wrapper (~6 KiB) stays in the request's context otherwise.
    for connection in connections.all(initialized_only=True):
        connection.close()
        del connections[connection.alias]


async def release_request_thread() -> None:
    """Give back what the request's thread holds before a stream that may last minutes.

    Django runs a request's sync code on a thread of its own (asgiref's
    `ThreadSensitiveContext`) and keeps that thread, and the database connection it
    opened, until the response ends. A stream reads the event log, not the database, so
    holding them only cost an OS thread and a connection per open stream (about 100 KiB
    each with SQLite). Closing the connection and retiring the idle executor now is
    safe: anything later in the request that needs sync code or the database gets a
    fresh thread and connection, which the context's exit retires as before.
    """
    await sync_to_async(_close_and_forget_connections)()
    context = SyncToAsync.thread_sensitive_context.get(None)
    if context is None:  # not served by Django's ASGI handler (a test client): no thread of its own
        return
    executor = SyncToAsync.context_to_thread_executor.pop(context, None)
    if executor is not None:
        executor.shutdown(wait=False)  # idle: its one job above has returned


async def _sse(events: AsyncIterator) -> AsyncIterator[bytes]:
    yield SSE_PREAMBLE
    async with aclosing(events):
        await release_request_thread()
        async for item in events:
            yield SSE_KEEPALIVE if item is KEEPALIVE else sse_encode(item)


async def _ndjson(events: AsyncIterator) -> AsyncIterator[bytes]:
    async with aclosing(events):
        await release_request_thread()
        async for item in events:
            yield NDJSON_KEEPALIVE if item is KEEPALIVE else (item.json + "\n").encode()


class ByteStreamResponse(StreamingHttpResponse):
    """A `StreamingHttpResponse` whose async iterator already yields bytes, served as it is.

    Django's own `__aiter__` passes every chunk through two more async generators (its
    sync-iterator fallback and `make_bytes()`): two resumptions per token for nothing.
    """

    def __aiter__(self):
        if self.is_async:
            return self._iterator  # the body as set last (a middleware may have wrapped it)
        return super().__aiter__()


def _streaming_response(body: AsyncIterator[bytes], content_type: str) -> StreamingHttpResponse:
    response = ByteStreamResponse(body, content_type=content_type)
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # nginx: pass each chunk through at once
    return response


def event_stream_response(body: AsyncIterator[bytes]) -> StreamingHttpResponse:
    """An SSE response for a framing of its own (the OpenAI API's chunks)."""
    return _streaming_response(body, SSE_CONTENT_TYPE)


def sse_response(events: AsyncIterator) -> StreamingHttpResponse:
    return _streaming_response(_sse(events), SSE_CONTENT_TYPE)


def ndjson_response(events: AsyncIterator) -> StreamingHttpResponse:
    return _streaming_response(_ndjson(events), NDJSON_CONTENT_TYPE)


async def collect(events: AsyncIterator) -> Answer:
    """Read the stream to its terminal event and assemble the answer (the JSON transport)."""
    answer = Answer()
    async with aclosing(events):
        await release_request_thread()
        async for event in events:
            answer.add(event)
    return answer


async def pump_websocket(events: AsyncIterator, send_text) -> None:
    """The WebSocket framing: one text frame per event (servers ping at the protocol level)."""
    async with aclosing(events):
        async for event in events:
            await send_text(event.json)


class EventStreamRenderer(BaseRenderer):
    """Lets DRF's content negotiation accept `text/event-stream`; streams bypass rendering.

    Never asked to render: streams are `StreamingHttpResponse`s, and errors are switched
    to JSON by `views.ApiView.finalize_response`.
    """

    media_type = SSE_CONTENT_TYPE
    format = "sse"


class NDJSONRenderer(EventStreamRenderer):
    media_type = NDJSON_CONTENT_TYPE
    format = "ndjson"
