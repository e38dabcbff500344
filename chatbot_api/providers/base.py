"""The one interface every model backend implements.

A provider implements a single async generator, `stream()`, that yields `Chunk`s:
text deltas as the model produces them, then (optionally) a final chunk with
`finish_reason` and `usage`. Everything else (the assembled JSON answer, SSE,
WebSocket, NDJSON) is built on that one stream by the generation service.

Cancelling the consumer (``task.cancel()`` or ``aclose()`` on the generator)
must stop the model promptly and release the upstream connection.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass

# Token counts above this are not real (a context window is far smaller): treated as missing.
MAX_TOKEN_COUNT = 10_000_000
# The `finish_reason` column's width; longer values from an upstream are cut.
FINISH_REASON_LENGTH = 32
# Characters no database column can hold: NUL (PostgreSQL refuses it) and lone surrogates
# (not encodable as UTF-8). Replaced before anything is logged, so every reader sees the
# same text that is saved.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
CONTINUE_INSTRUCTION = (
    "Your answer was cut off. Continue it exactly where it stopped, without repeating anything "
    "and without any preamble."
)


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    estimated: bool = False

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def token_count(value) -> int | None:
    """A token count from an upstream, or None when it is not a plausible one."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_TOKEN_COUNT:
        return value
    return None


def usage_from_counts(prompt, completion) -> Usage | None:
    """`Usage` from raw upstream counts; None (estimate instead) unless both are plausible."""
    prompt, completion = token_count(prompt), token_count(completion)
    if prompt is None or completion is None:
        return None
    return Usage(prompt, completion)


def storable_text(text: str) -> str:
    """`text` with the characters a database cannot store replaced by U+FFFD."""
    return _UNSTORABLE.sub("\ufffd", text) if _UNSTORABLE.search(text) else text


def bounded_finish_reason(value) -> str | None:
    return value[:FINISH_REASON_LENGTH] if isinstance(value, str) and value else None


@dataclass(frozen=True, slots=True)
class Chunk:
    text: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None


class Provider:
    """Base class of model backends (register one: docs/providers.md).

    Subclasses set `name` and override `from_settings()` and `stream()`; the
    capabilities are attributes: `model_id` (the model this instance serves, from
    `CHATBOT["MODEL"]` or `default_model`), `context_window` (tokens), `count_tokens()`,
    `list_models()` (the models a request may name; `stream(model=...)` gets one of them
    only when a backend lists more than its `model_id`).
    Raise `chatbot_api.errors.ProviderError` (with a clear message and a `code`) for
    failures the user should see.
    """

    name: str = ""
    default_model: str = ""
    model_id: str = ""
    context_window: int = 8192
    # Whether stream() takes `stop=[...]` (sequences that end the answer, not included in it);
    # requests asking for them are refused with 400 by backends that do not.
    supports_stop: bool = False

    @classmethod
    def from_settings(cls) -> Provider:
        """Build the provider from `chatbot_setting(...)`; raise ImproperlyConfigured with the fix."""
        raise NotImplementedError(".from_settings() must be overridden")

    async def stream(
        self, messages: list[dict], *, max_tokens: int, temperature: float
    ) -> AsyncIterator[Chunk]:
        raise NotImplementedError(".stream() must be overridden")
        yield  # pragma: no cover  (makes this an async generator)

    def continuation_prompt(self, messages: list[dict], answer_so_far: str) -> list[dict]:
        """The prompt that makes the model go on with `answer_so_far`, its cut answer to `messages`.

        Chat APIs take no half-written assistant turn, so the default sends it as a finished one
        and asks for the rest; a backend that renders its own prompt (local) prefills it instead.
        """
        return [
            *messages,
            {"role": "assistant", "content": answer_so_far},
            {"role": "user", "content": CONTINUE_INSTRUCTION},
        ]

    async def list_models(self) -> list[str]:
        """The models this backend can answer with, `model_id` first."""
        return [self.model_id]

    def count_tokens(self, text: str) -> int:
        """Token estimate used to fit the history into the model's window.

        The default (about four characters a token, rounded up) errs on the side of
        sending less history; backends with a tokenizer at hand override it.
        """
        return len(text) // 4 + 1

    async def aclose(self) -> None:
        """Release clients and models; called on shutdown and when settings change."""


class StopScanner:
    """Cuts streamed text at the first stop sequence, holding back what may begin one.

    `feed(text)` returns the text that is safe to show and whether a stop sequence was
    reached (the sequence itself is never shown); `flush()` returns what was held back
    once the stream ends without one.
    """

    def __init__(self, stops: list[str]):
        self.stops = [stop for stop in stops if stop]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        self.pending += text
        found = [index for stop in self.stops if (index := self.pending.find(stop)) >= 0]
        if found:
            safe, self.pending = self.pending[: min(found)], ""
            return safe, True
        held = max(
            (
                size
                for stop in self.stops
                for size in range(len(stop) - 1, 0, -1)
                if self.pending.endswith(stop[:size])
            ),
            default=0,
        )
        cut = len(self.pending) - held
        safe, self.pending = self.pending[:cut], self.pending[cut:]
        return safe, False

    def flush(self) -> str:
        rest, self.pending = self.pending, ""
        return rest
