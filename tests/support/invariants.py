"""The three promises every fault test checks, whatever it broke.

1. Each reader of an answer gets exactly one terminal event, and it is the last one.
2. The stored text is never shorter than what any client saw (it starts with it).
3. No rate-limit slot leaks: once every answer ended, the client holds no stream slot.
"""

from __future__ import annotations

import asyncio
import time

from chatbot_api.models import Message

TERMINAL = ("done", "error")


def seen_text(events: list[dict]) -> str:
    """What a client shows after these events (the `type`/`text` of each), as the page builds it."""
    text = ""
    for event in events:
        if event["type"] == "delta":
            text += event["text"]
        elif event["type"] == "snapshot":
            text = event["text"]
    return text


def assert_one_terminal(events: list[dict]) -> dict:
    """Exactly one terminal event, at the end; returns it."""
    kinds = [event["type"] for event in events]
    terminals = [kind for kind in kinds if kind in TERMINAL]
    assert len(terminals) == 1, f"expected one terminal event, got {kinds}"
    assert kinds[-1] in TERMINAL, f"the terminal event must be last: {kinds}"
    return events[-1]


def assert_seqs_unbroken(events: list[dict], *, after: int = 0) -> None:
    """The answer's own events (those with a seq) go after+1, after+2, ... with no hole."""
    seqs = [event["seq"] for event in events if event.get("seq") is not None]
    assert seqs == list(range(after + 1, after + 1 + len(seqs))), f"a hole or a repeat: {seqs}"


async def final_message(message_id, timeout: float = 10.0) -> Message:
    """The message once it is no longer pending/streaming (fails if it stays live)."""
    deadline = time.monotonic() + timeout
    while True:
        message = await Message.objects.aget(pk=message_id)
        if not message.is_live:
            return message
        assert time.monotonic() < deadline, f"message {message_id} is still {message.status}"
        await asyncio.sleep(0.05)


def assert_stored_covers(message: Message, *seen: str) -> None:
    for text in seen:
        assert message.content.startswith(text), (
            f"stored {len(message.content)} chars, a client saw {len(text)}: "
            f"{message.content[:40]!r} vs {text[:40]!r}"
        )


async def assert_no_leaked_slot(slots_in_use, timeout: float = 10.0) -> None:
    """`slots_in_use()` (sync or async) comes back to 0 within `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = slots_in_use()
        if asyncio.iscoroutine(value):
            value = await value
        if value == 0:
            return
        assert time.monotonic() < deadline, f"{value} stream slot(s) still held"
        await asyncio.sleep(0.05)
