"""The event stream of one assistant message: one schema for every transport.

Each event is a JSON object with a `type`, the `message_id` and a `seq` strictly
increasing per message (1, 2, 3, ...):

    meta     {session_id, message_id, model, provider, question_id (live streams)}
    delta    {text}
    snapshot {text}: the whole text up to this seq (replaces what the client has)
    usage    {prompt_tokens, completion_tokens, estimated}
    done     {status: "complete" | "stopped", finish_reason}        terminal
    error    {code, message, retryable}                             terminal

Every stream ends with exactly one terminal event, so a client can always tell a
finished answer from a cut one. The JSON text is encoded once, when the event is
appended, and shared by every live reader and transport; a replay of older deltas
encodes them again, to the same text (the log keeps only their text).

A terminal `error` with no `seq` ends one reader's stream, not the answer (this
server is shutting down, the shared log is unreachable): the client resumes after
the last seq it saw.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

META, DELTA, SNAPSHOT, USAGE, DONE, ERROR = "meta", "delta", "snapshot", "usage", "done", "error"
TERMINAL_TYPES = frozenset({DONE, ERROR})


# One encoder for every event: json.dumps() with options builds a new one per call.
encode_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), check_circular=False).encode


@dataclass(frozen=True, slots=True)
class Event:
    seq: int | None  # None: a reader's own terminal event, not one of the answer's
    type: str
    data: dict
    json: str = field(default="", compare=False)

    @classmethod
    def create(cls, seq: int, type: str, data: dict, message_id) -> Event:
        payload = {"type": type, "seq": seq, "message_id": str(message_id), **data}
        return cls(seq, type, data, encode_json(payload))

    @classmethod
    def for_reader(cls, code: str, message: str, message_id, *, retryable: bool = True) -> Event:
        """A terminal `error` that ends one reader's stream (no seq: the answer goes on)."""
        data = {"code": code, "message": message, "retryable": retryable}
        payload = {"type": ERROR, "message_id": str(message_id), **data}
        return cls(None, ERROR, data, encode_json(payload))

    @property
    def is_terminal(self) -> bool:
        return self.type in TERMINAL_TYPES

    def as_dict(self) -> dict:
        return {"type": self.type, "seq": self.seq, **self.data}


@dataclass(slots=True)
class Answer:
    """What a client assembles from the events: used by the JSON transport."""

    parts: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    usage: dict | None = None
    terminal: Event | None = None

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def add(self, event: Event) -> None:
        if event.type == DELTA:
            self.parts.append(event.data["text"])
        elif event.type == SNAPSHOT:
            self.parts = [event.data["text"]]
        elif event.type == META:
            self.meta = event.data
        elif event.type == USAGE:
            self.usage = event.data
        elif event.is_terminal:
            self.terminal = event
