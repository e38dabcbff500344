"""The fake upstream must look like OpenAI to the real SDK, or tests built on it prove nothing."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import pytest_asyncio

from tests.support.fake_openai import FakeOpenAI, FakeOpenAIServer, Script, split_text

REPO_ROOT = Path(__file__).resolve().parent.parent
MESSAGES: list[dict[str, Any]] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Say hello to the world"},
]
PROMPT_WORDS = 7


@pytest.fixture(autouse=True)
def fresh_manager() -> None:
    """Shadows the conftest autouse fixture of that name: the fake itself needs no Django, so these
    tests also run with ``-p no:django`` / without settings."""


@pytest.fixture(scope="module")
def running_server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer() as running:
        yield running


@pytest.fixture
def server(running_server: FakeOpenAIServer) -> Iterator[FakeOpenAIServer]:
    """One server per module (stopping uvicorn takes ~0.2s), reset around every test."""
    fake = running_server.fake
    fake.reset()
    fake.default = Script()
    yield running_server
    fake.abort_streams()


@pytest.fixture
def fake(server: FakeOpenAIServer) -> FakeOpenAI:
    return server.fake


@pytest_asyncio.fixture
async def client(server: FakeOpenAIServer) -> AsyncIterator[openai.AsyncOpenAI]:
    sdk = openai.AsyncOpenAI(base_url=server.url, api_key="test", max_retries=0)
    try:
        yield sdk
    finally:
        await sdk.close()


async def open_stream(client: openai.AsyncOpenAI, **kwargs: Any) -> Any:
    return await client.chat.completions.create(
        model="fake-model",
        messages=MESSAGES,  # type: ignore[arg-type]
        stream=True,
        stream_options={"include_usage": True},
        **kwargs,
    )


async def iterate(stream: Any) -> list[Any]:
    return [chunk async for chunk in stream]


def sse_frames(raw: bytes) -> list[str]:
    assert raw.endswith(b"\n\n"), raw[-40:]
    return [frame.decode() for frame in raw.split(b"\n\n")[:-1]]


# -- SDK: happy paths ---------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_stream_text_finish_reason_and_usage(client: openai.AsyncOpenAI, fake: FakeOpenAI) -> None:
    fake.enqueue(Script(chunks=["Hello", ", ", "world", "!"]))

    chunks = await iterate(await open_stream(client))

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello, world!"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == PROMPT_WORDS
    assert chunks[-1].usage.completion_tokens == 4
    assert chunks[-1].usage.total_tokens == PROMPT_WORDS + 4
    assert {c.model for c in chunks} == {"fake-model"}
    assert len({c.id for c in chunks}) == 1

    record = fake.wait_for_disconnect()
    assert record.messages == MESSAGES
    assert record.model == "fake-model"
    assert record.stream and record.include_usage
    assert record.headers["authorization"] == "Bearer test"
    assert record.chunks_sent == 4
    assert not record.disconnected
    assert record.first_byte_at is not None and record.closed_at is not None
    assert record.received_at <= record.first_byte_at <= record.closed_at


@pytest.mark.asyncio
async def test_explicit_usage_and_finish_reason(client: openai.AsyncOpenAI, fake: FakeOpenAI) -> None:
    usage = {"prompt_tokens": 11, "completion_tokens": 2}
    fake.enqueue_text("cut short", finish_reason="length", usage=usage)

    chunks = await iterate(await open_stream(client))

    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "cut short"
    assert chunks[-2].choices[0].finish_reason == "length"
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.total_tokens) == (11, 13)


@pytest.mark.asyncio
async def test_usage_only_when_requested(client: openai.AsyncOpenAI, fake: FakeOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="fake-model",
        messages=MESSAGES,
        stream=True,  # type: ignore[arg-type]
    )
    chunks = await iterate(stream)
    assert all(c.choices and c.usage is None for c in chunks)

    fake.enqueue(Script(send_usage=False))
    chunks = await iterate(await open_stream(client))
    assert all(c.choices and c.usage is None for c in chunks)


@pytest.mark.asyncio
async def test_default_script_is_replaceable(client: openai.AsyncOpenAI, fake: FakeOpenAI) -> None:
    fake.default = Script(chunks=["x"] * 5)
    for _ in range(2):
        chunks = await iterate(await open_stream(client))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "xxxxx"
    assert len(fake.history) == 2


@pytest.mark.asyncio
async def test_non_streaming(client: openai.AsyncOpenAI, fake: FakeOpenAI) -> None:
    fake.enqueue_text("A whole answer.")

    completion = await client.chat.completions.create(model="fake-model", messages=MESSAGES)  # type: ignore[arg-type]

    assert completion.object == "chat.completion"
    assert completion.model == "fake-model"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content == "A whole answer."
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (PROMPT_WORDS, 3)
    assert not fake.history[0].stream


# -- SDK: failures --------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_500_raises_internal_server_error(client: openai.AsyncOpenAI, fake: FakeOpenAI) -> None:
    fake.enqueue(Script(status=500))
    with pytest.raises(openai.InternalServerError) as info:
        await open_stream(client)
    assert info.value.status_code == 500
    assert info.value.body["type"] == "server_error"  # type: ignore[index]


@pytest.mark.asyncio
async def test_429_raises_rate_limit_error(client: openai.AsyncOpenAI, fake: FakeOpenAI) -> None:
    fake.enqueue(Script(status=429, retry_after=3))
    with pytest.raises(openai.RateLimitError) as info:
        await open_stream(client)
    assert info.value.response.headers["retry-after"] == "3"
    assert info.value.code == "rate_limit_exceeded"


@pytest.mark.asyncio
async def test_custom_error_body(client: openai.AsyncOpenAI, fake: FakeOpenAI) -> None:
    body = {"error": {"message": "nope", "type": "invalid_request_error", "param": None, "code": "bad"}}
    fake.enqueue(Script(status=400, error_body=body))
    with pytest.raises(openai.BadRequestError, match="nope"):
        await open_stream(client)


@pytest.mark.asyncio
async def test_malformed_frame_raises_json_decode_error(client: openai.AsyncOpenAI, fake: FakeOpenAI) -> None:
    fake.enqueue(Script(malformed_after=1))
    stream = await open_stream(client)
    seen: list[Any] = []
    # Observed: the SDK lets json.JSONDecodeError escape unwrapped (not an openai.APIError).
    with pytest.raises(json.JSONDecodeError):
        async for chunk in stream:
            seen.append(chunk)
    assert [c.choices[0].delta.content for c in seen] == ["", "Hello"]


@pytest.mark.asyncio
async def test_drop_raises_api_connection_error(client: openai.AsyncOpenAI, fake: FakeOpenAI) -> None:
    fake.enqueue(Script(drop_after=2))
    stream = await open_stream(client)
    seen: list[Any] = []
    with pytest.raises(openai.APIConnectionError) as info:
        async for chunk in stream:
            seen.append(chunk)
    assert not isinstance(info.value, openai.APITimeoutError)
    assert "incomplete chunked read" in str(info.value.__cause__)
    assert "".join(c.choices[0].delta.content or "" for c in seen) == "Hello world"
    record = fake.wait_for_disconnect()
    assert record.chunks_sent == 2 and record.closed_at is not None


@pytest.mark.asyncio
async def test_error_frame_raises_api_error(client: openai.AsyncOpenAI, fake: FakeOpenAI) -> None:
    error = {"error": {"message": "boom", "type": "server_error"}}
    fake.enqueue(Script(error_frame_after=1, error_body=error))
    stream = await open_stream(client)
    with pytest.raises(openai.APIError, match="boom") as info:
        await iterate(stream)
    assert type(info.value) is openai.APIError


@pytest.mark.asyncio
async def test_closing_hung_stream_disconnects(client: openai.AsyncOpenAI, fake: FakeOpenAI) -> None:
    fake.enqueue(Script(chunks=["a", "b", "c"], hang_after=2))
    stream = await open_stream(client)
    seen = [await stream.__anext__() for _ in range(3)]  # role + 2 content chunks, then silence
    assert [c.choices[0].delta.content for c in seen] == ["", "a", "b"]
    record = await fake.wait_for_request_async()
    assert record.closed_at is None

    closed_at = time.monotonic()
    await stream.close()

    record = await fake.wait_for_disconnect_async(timeout=2)
    assert record.disconnected
    assert record.chunks_sent == 2
    assert record.closed_at is not None and record.closed_at - closed_at < 1.0


@pytest.mark.asyncio
async def test_idle_timeout_on_hang(server: FakeOpenAIServer, fake: FakeOpenAI) -> None:
    fake.enqueue(Script(hang_after=1))
    async with openai.AsyncOpenAI(base_url=server.url, api_key="test", max_retries=0, timeout=0.3) as sdk:
        stream = await open_stream(sdk)
        with pytest.raises(openai.APITimeoutError):
            await iterate(stream)
    record = await fake.wait_for_disconnect_async(timeout=2)
    assert record.disconnected and record.chunks_sent == 1


@pytest.mark.asyncio
async def test_headers_delay_times_out_before_response(server: FakeOpenAIServer, fake: FakeOpenAI) -> None:
    fake.enqueue(Script(headers_delay=5))
    async with openai.AsyncOpenAI(base_url=server.url, api_key="test", max_retries=0, timeout=0.3) as sdk:
        with pytest.raises(openai.APITimeoutError):
            await open_stream(sdk)
    record = await fake.wait_for_disconnect_async(timeout=2)
    assert record.disconnected and record.first_byte_at is None


# -- raw wire format ------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_sse_wire_format(server: FakeOpenAIServer) -> None:
    payload: dict[str, Any] = {"model": "m-1", "messages": MESSAGES, "stream": True}
    payload["stream_options"] = {"include_usage": True}
    async with httpx.AsyncClient() as http:
        response = await http.post(f"{server.url}/chat/completions", json=payload)

    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream"
    assert response.headers["transfer-encoding"] == "chunked"
    frames = sse_frames(response.content)
    assert all(f.startswith("data: ") for f in frames)
    assert frames[-1] == "data: [DONE]"
    chunks = [json.loads(f.removeprefix("data: ")) for f in frames[:-1]]
    for chunk in chunks:
        assert chunk["object"] == "chat.completion.chunk"
        assert chunk["model"] == "m-1"
        assert chunk["id"] == chunks[0]["id"] and isinstance(chunk["created"], int)
        assert "usage" in chunk
    assert chunks[0]["choices"] == [
        {
            "index": 0,
            "delta": {"role": "assistant", "content": "", "refusal": None},
            "logprobs": None,
            "finish_reason": None,
        }
    ]
    assert [c["choices"][0]["delta"]["content"] for c in chunks[1:4]] == ["Hello", " world", "!"]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:4])
    assert chunks[4]["choices"] == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]
    assert chunks[5]["choices"] == []
    assert chunks[5]["usage"] == {"prompt_tokens": PROMPT_WORDS, "completion_tokens": 3, "total_tokens": 10}
    assert len(chunks) == 6


@pytest.mark.asyncio
async def test_frames_are_flushed_as_produced(server: FakeOpenAIServer, fake: FakeOpenAI) -> None:
    fake.enqueue(Script(chunks=["a", "b", "c", "d"], interval=0.15, first_delay=0.1))
    payload = {"model": "m", "messages": MESSAGES, "stream": True}
    arrivals: list[tuple[float, str]] = []
    async with httpx.AsyncClient() as http:
        start = time.monotonic()
        async with http.stream("POST", f"{server.url}/chat/completions", json=payload) as response:
            headers_at = time.monotonic() - start
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    arrivals.append((time.monotonic() - start, line))

    assert headers_at < 0.1  # first_delay runs after the status line
    times = [t for t, _ in arrivals]
    assert times[1] >= 0.09  # first content chunk waited for first_delay
    assert times[1] < times[-1] - 0.4  # ...and reached us long before the end of the stream
    gaps = [later - earlier for earlier, later in zip(times[1:5], times[2:6], strict=True)]
    assert all(gap > 0.1 for gap in gaps), gaps  # one interval apart, not batched
    record = fake.history[0]
    assert record.first_byte_at is not None and record.first_byte_at - record.received_at >= 0.09


@pytest.mark.asyncio
async def test_path_without_v1_prefix_and_404(server: FakeOpenAIServer, fake: FakeOpenAI) -> None:
    root = server.url.removesuffix("/v1")
    async with httpx.AsyncClient() as http:
        ok = await http.post(f"{root}/chat/completions", json={"model": "m", "messages": MESSAGES})
        missing = await http.post(f"{root}/v1/embeddings", json={"model": "m", "input": "x"})
        wrong_method = await http.get(f"{server.url}/chat/completions")
        bad_json = await http.post(f"{server.url}/chat/completions", content=b"{nope")

    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == "Hello world!"
    assert missing.status_code == 404 and wrong_method.status_code == 404
    assert missing.json()["error"]["type"] == "invalid_request_error"
    assert set(missing.json()["error"]) == {"message", "type", "param", "code"}
    assert bad_json.status_code == 400
    assert [r.path for r in fake.history] == ["/chat/completions"]


@pytest.mark.asyncio
async def test_malformed_frame_on_the_wire(server: FakeOpenAIServer, fake: FakeOpenAI) -> None:
    fake.enqueue(Script(chunks=["a", "b"], malformed_after=1))
    async with httpx.AsyncClient() as http:
        response = await http.post(f"{server.url}/chat/completions", json={"model": "m", "stream": True})
    frames = sse_frames(response.content)
    assert frames[2] == "data: {not json"
    assert frames[-1] == "data: [DONE]"


# -- helpers ----------------------------------------------------------------------------------------------


def test_wait_helpers_work_from_other_threads(server: FakeOpenAIServer, fake: FakeOpenAI) -> None:
    fake.enqueue(Script(hang_after=0))
    result: dict[str, Any] = {}

    def client_thread() -> None:
        try:
            httpx.post(f"{server.url}/chat/completions", json={"model": "m", "stream": True}, timeout=0.3)
        except httpx.ReadTimeout as exc:
            result["error"] = exc

    thread = threading.Thread(target=client_thread)
    thread.start()
    record = fake.wait_for_request(1, timeout=2)
    assert record.closed_at is None
    assert fake.wait_for_disconnect(0, timeout=2).disconnected
    thread.join(2)
    assert isinstance(result.get("error"), httpx.ReadTimeout)
    with pytest.raises(TimeoutError):
        fake.wait_for_request(2, timeout=0.05)


def test_stop_aborts_hung_streams_promptly() -> None:
    server = FakeOpenAIServer().start()
    server.fake.enqueue(Script(hang_after=1))
    with (
        httpx.Client() as http,
        http.stream(
            "POST", f"{server.url}/chat/completions", json={"model": "m", "stream": True}
        ) as response,
    ):
        assert response.status_code == 200
        server.fake.wait_for_request()
        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < 1.5
        with pytest.raises(httpx.RemoteProtocolError):
            response.read()


def test_split_text() -> None:
    assert split_text("Hello big world!") == ["Hello", " big", " world!"]
    assert "".join(split_text("  spaced  out  ")) == "  spaced  out  "


def test_cli_serves_in_a_separate_process() -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.support.fake_openai",
            "--port",
            "0",
            "--chunks",
            "4",
            "--chunk-text",
            "ab",
            "--interval",
            "0.01",
        ],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("fake-openai ready http://127.0.0.1:"), line
        url = line.split()[-1]
        response = httpx.post(f"{url}/chat/completions", json={"model": "m", "messages": MESSAGES}, timeout=5)
        assert response.json()["choices"][0]["message"]["content"] == "abababab"
    finally:
        proc.terminate()
        proc.wait(10)
    assert proc.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after a clean stop
