"""The OpenAI provider parses frames that the network cut anywhere.

The fake upstream of the other tests writes one whole frame at a time; this upstream is a
bare HTTP/1.1 server that cuts its body where a real network may: inside a frame, inside a
multi-byte character, between the "\\r" and "\\n" of a CRLF, and ends without a newline.
"""

from __future__ import annotations

import asyncio
import json

from chatbot_api.providers import Usage
from chatbot_api.providers.openai import OpenAIProvider


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


async def test_frames_cut_anywhere_by_the_network_still_parse():
    accent = BODY.index("è".encode()) + 1  # between the two bytes of "è"
    cup = BODY.index("☕".encode()) + 2  # inside the three bytes of "☕"
    crlf = BODY.index(b"\r\n\r\n") + 1  # between "\r" and "\n"
    cuts = sorted({5, accent, cup, crlf, BODY.index(b"pronto") + 3, len(BODY) - 3})
    server = await serve_in_pieces(cuts)
    port = server.sockets[0].getsockname()[1]
    provider = OpenAIProvider(
        api_key="sk-test",
        base_url=f"http://127.0.0.1:{port}/v1",
        model_id="m",
        connect_timeout=5,
        max_retries=0,
    )
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
