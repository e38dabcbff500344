"""The OpenAI provider parses frames that the network cut anywhere, over both HTTP transports.

The fake upstream of the other tests writes one whole frame at a time; this upstream is a
bare HTTP/1.1 server that cuts its body where a real network may: inside a frame, inside a
multi-byte character, between the "\\r" and "\\n" of a CRLF, and ends without a newline.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from chatbot_api.errors import ProviderError
from chatbot_api.providers import Usage
from chatbot_api.providers.openai import OpenAIProvider

from .support.servers import closed_port


@pytest.fixture(params=["aiohttp", "httpx"])
def transport(request) -> str:
    """The SDK's HTTP transport (CHATBOT OPENAI_HTTP_CLIENT): each test runs over both."""
    return request.param


def frame(payload: dict | str, end: bytes = b"\n\n") -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return b"data: " + data.encode() + end


def delta(text: str) -> dict:
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": text}}]}


BODY = (
    frame(delta("Caff"))
    + frame(delta("è ☕ "), end=b"\r\n\r\n")
    + b": a comment line\n\n"
    + frame(delta("pronto"))
    + frame({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    + frame({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}})
    + b"data: [DONE]"  # no final newline
)


async def serve_in_pieces(cuts: list[int]):
    """An upstream that sends BODY in pieces ending at the byte offsets in `cuts`."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        writer.write(head)
        for start, end in zip([0, *cuts], [*cuts, len(BODY)], strict=True):
            piece = BODY[start:end]
            writer.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            await writer.drain()
            await asyncio.sleep(0.01)  # separate reads on the client's side
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        writer.close()

    return await asyncio.start_server(answer, "127.0.0.1", 0)


async def test_frames_cut_anywhere_by_the_network_still_parse(transport):
    accent = BODY.index("è".encode()) + 1  # between the two bytes of "è"
    cup = BODY.index("☕".encode()) + 2  # inside the three bytes of "☕"
    crlf = BODY.index(b"\r\n\r\n") + 1  # between "\r" and "\n"
    cuts = sorted({5, accent, cup, crlf, BODY.index(b"pronto") + 3, len(BODY) - 3})
    server = await serve_in_pieces(cuts)
    provider = provider_for(server, transport)
    try:
        async with asyncio.timeout(10):
            chunks = [
                c
                async for c in provider.stream(
                    [{"role": "user", "content": "Hi"}], max_tokens=8, temperature=0
                )
            ]
    finally:
        await provider.aclose()
        server.close()

    assert "".join(c.text for c in chunks) == "Caffè ☕ pronto"
    assert [c.finish_reason for c in chunks if c.finish_reason] == ["stop"]
    assert [c.usage for c in chunks if c.usage] == [Usage(prompt_tokens=7, completion_tokens=3)]


HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
ANSWER = frame(delta("Ciao")) + frame({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})


async def keep_alive_upstream(*, end_body: bool):
    """An HTTP/1.1 upstream that answers every request of a connection with ANSWER and [DONE].

    With `end_body=False` it never sends the body's last chunk after [DONE] (nor closes), as
    a broken server might. Returns the server and the list of connections it accepted.
    """
    connections: list[int] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer.get_extra_info("peername")[1])
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.lower().split(b"\r\n")
                    if line.startswith(b"content-length:")
                )
                await reader.readexactly(length)
                writer.write(HEAD)
                body = ANSWER + frame("[DONE]")
                writer.write(f"{len(body):x}\r\n".encode() + body + b"\r\n")
                if end_body:
                    writer.write(b"0\r\n\r\n")
                await writer.drain()
                if not end_body:
                    await reader.read()  # until the client gives the connection up
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()

    return await asyncio.start_server(answer, "127.0.0.1", 0), connections


def provider_for(server, transport: str, *, port: int | None = None) -> OpenAIProvider:
    port = port or server.sockets[0].getsockname()[1]
    return OpenAIProvider(
        api_key="sk-test",
        base_url=f"http://127.0.0.1:{port}/v1",
        model_id="m",
        connect_timeout=5,
        max_retries=0,
        http_client=transport,
    )


async def answer_text(provider: OpenAIProvider) -> str:
    async with asyncio.timeout(10):
        chunks = [
            c async for c in provider.stream([{"role": "user", "content": "Hi"}], max_tokens=8, temperature=0)
        ]
    return "".join(c.text for c in chunks)


async def test_answers_in_a_row_share_one_connection_to_the_model_server(transport):
    # Reading each body to its end after [DONE] hands the connection back to the pool:
    # closing it early would cost every answer a new TCP connection (and the server an accept).
    server, connections = await keep_alive_upstream(end_body=True)
    provider = provider_for(server, transport)
    try:
        assert [await answer_text(provider) for _ in range(3)] == ["Ciao"] * 3
    finally:
        await provider.aclose()
        server.close()
    assert len(connections) == 1


async def test_a_server_that_never_ends_its_body_after_done_still_ends_the_answer_at_once(transport):
    server, connections = await keep_alive_upstream(end_body=False)
    provider = provider_for(server, transport)
    loop = asyncio.get_running_loop()
    try:
        started = loop.time()
        assert await answer_text(provider) == "Ciao"
        assert loop.time() - started < 2.0  # END_OF_BODY_WAIT (0.1 s), far from any idle limit
        assert await answer_text(provider) == "Ciao"  # the broken connection was not reused
    finally:
        await provider.aclose()
        server.close()
    assert len(connections) == 2


async def answer_error(server, transport: str, *, port: int | None = None) -> tuple[str, ProviderError]:
    """The text streamed before the provider raised, and what it raised (`server` closed after)."""
    provider = provider_for(server, transport, port=port)
    text = ""
    try:
        with pytest.raises(ProviderError) as raised:
            async with asyncio.timeout(10):
                messages = [{"role": "user", "content": "Hi"}]
                async for chunk in provider.stream(messages, max_tokens=8, temperature=0):
                    text += chunk.text
    finally:
        await provider.aclose()
        if server is not None:
            server.close()
    return text, raised.value


async def cut_upstream(response: bytes):
    """An upstream that sends `response` (head and body so far) and then drops the connection."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(response)
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.transport.abort()  # a reset, as a crashed model server leaves it

    return await asyncio.start_server(answer, "127.0.0.1", 0)


async def test_a_refused_connection_is_unavailable_not_a_timeout(transport):
    # The aiohttp transport reports every connection error as httpx's ConnectTimeout.
    text, error = await answer_error(None, transport, port=closed_port())
    assert (text, error.code, error.retryable) == ("", "upstream_unavailable", True)


async def test_a_model_server_that_dies_mid_answer_is_unavailable(transport):
    first = frame(delta("Ciao"))
    server = await cut_upstream(HEAD + f"{len(first):x}\r\n".encode() + first + b"\r\n")
    text, error = await answer_error(server, transport)
    assert (text, error.code, error.retryable) == ("Ciao", "upstream_unavailable", True)


@pytest.mark.parametrize(
    "status, code, retryable",
    [(429, "upstream_rate_limited", True), (401, "upstream_auth", False), (503, "upstream_error", True)],
)
async def test_an_http_error_before_the_stream_keeps_its_meaning(transport, status, code, retryable):
    body = b'{"error": {"message": "no", "type": "x"}}'
    head = f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    server = await cut_upstream(head.encode() + body)
    text, error = await answer_error(server, transport)
    assert (text, error.code, error.retryable) == ("", code, retryable)
