"""The one interface every model backend implements.

A provider implements a single async generator, `stream()`, that yields `Chunk`s:
text deltas as the model produces them, then (optionally) a final chunk with
`finish_reason` and `usage`. Everything else (the assembled JSON answer, SSE,
WebSocket, NDJSON) is built on that one stream by the generation service.

Cancelling the consumer (``task.cancel()`` or ``aclose()`` on the generator)
must stop the model promptly and release the upstream connection.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    estimated: bool = False


@dataclass(frozen=True, slots=True)
class Chunk:
    text: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None


class Provider:
    """Base class of model backends.

    Subclasses set `name`, `model_id` and `context_window` and override `stream()`.
    Raise `chatbot_api.errors.ProviderError` (with a clear message and a `code`)
    for failures the user should see.
    """

    name: str = ""
    model_id: str = ""
    context_window: int = 8192

    async def stream(
        self, messages: list[dict], *, max_tokens: int, temperature: float
    ) -> AsyncIterator[Chunk]:
        raise NotImplementedError(".stream() must be overridden")
        yield  # pragma: no cover  (makes this an async generator)

    def count_tokens(self, text: str) -> int:
        """Token estimate used to fit the history into the model's window.

        The default (about four characters a token, rounded up) errs on the side of
        sending less history; backends with a tokenizer at hand override it.
        """
        return len(text) // 4 + 1

    async def aclose(self) -> None:
        """Release clients and models; called on shutdown and when settings change."""
