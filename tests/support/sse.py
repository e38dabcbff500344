"""Reading Server-Sent Events in tests: one parser, one reader for each kind of response."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

TERMINAL = ("done", "error")


def parse_sse(raw: bytes) -> list[dict]:
    """Split an SSE byte stream into frames: {"event", "id", "data" (parsed JSON)}; comments skipped."""
    frames = []
    for block in raw.decode().split("\n\n"):
        fields: dict = {}
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            fields[name] = value[1:] if value.startswith(" ") else value
        if "data" in fields:
            fields["data"] = json.loads(fields["data"])
            frames.append(fields)
    return frames


async def frames_in(chunks: AsyncIterator[bytes]) -> AsyncIterator[dict]:
    """Each SSE frame of a byte stream as soon as it is complete (frames may span chunks)."""
    buffer = b""
    async for chunk in chunks:
        buffer += chunk
        *blocks, buffer = buffer.split(b"\n\n")
        for block in blocks:
            for frame in parse_sse(block + b"\n\n"):
                yield frame


async def read_frames(response, *, limit: int | None = None) -> list[tuple[float, dict]]:
    """(arrival time, frame) of a Django streaming response, to the terminal event or `limit` frames."""
    frames = []
    iterator = aiter(response.streaming_content)
    async for frame in frames_in(iterator):
        frames.append((time.monotonic(), frame))
        if frame["event"] in TERMINAL or (limit and len(frames) >= limit):
            break
    await iterator.aclose()
    return frames


def text_of(frames) -> str:
    """The deltas' text of `read_frames()` output."""
    return "".join(f["data"]["text"] for _, f in frames if f["event"] == "delta")
