"""Generations: the tasks that turn a provider's stream into a message's event log.

A generation is owned by the server process, not by the HTTP request or socket
that asked for it: it reads the provider's stream, appends numbered events to the
message's log, hands its partial text to the `AnswerStore` (flushed in batches every
`FLUSH_INTERVAL` seconds) and saves its `Outcome` at the end. Clients come and go as
readers of the log. It gets everything it uses at construction (the log, the store);
the `GenerationManager` (manager.py) starts, stops and supervises generations.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from uuid import UUID

from django.utils import timezone

from .. import metrics
from ..conf import chatbot_setting
from ..errors import ChatbotError, GenerationTimeout, ProviderError
from ..limits import give_back
from ..models import Message, UsageRecord
from ..providers import Chunk, Provider, Usage
from ..providers.base import storable_text
from . import events as ev
from .deadline import Deadline
from .eventlog import EventLog
from .outcome import Outcome
from .store import AnswerStore
from .tasks import detached_task

logger = logging.getLogger("chatbot.generation")

Status = Message.Status


@dataclass(slots=True)
class GenerationRequest:
    message_id: UUID
    conversation_id: UUID
    prompt: list[dict]
    # Whom the answer is charged to (rate limits, usage records).
    client_key: str = ""
    user_id: int | None = None
    session_key: str = ""
    holds_slot: bool = False  # a concurrency slot to give back when the answer ends
    model: str = ""  # the model asked, when not the provider's default
    question_id: UUID | None = None  # the question answered (the client may edit it later)
    # A continuation: the answer's text so far (the model goes on from it), which part this
    # is, and what the earlier parts cost (the message's counts are the whole answer's).
    prefix: str = ""
    part: int = 0
    earlier_usage: Usage | None = None


@dataclass(slots=True)
class TimeLimits:
    """How long a generation may wait for the model: first token, between tokens, in all."""

    first_token: float
    idle: float
    total: float

    @classmethod
    def from_settings(cls) -> TimeLimits:
        return cls(
            first_token=chatbot_setting("FIRST_TOKEN_TIMEOUT"),
            idle=chatbot_setting("IDLE_TIMEOUT"),
            total=chatbot_setting("TOTAL_TIMEOUT"),
        )


class Generation:
    """One answer being written. `run()` is the whole life of the task."""

    def __init__(
        self,
        request: GenerationRequest,
        *,
        provider: Provider,
        stream: AsyncIterator[Chunk],
        log: EventLog,
        store: AnswerStore,
    ):
        self.request = request
        self.provider = provider
        self.stream = stream
        self.log = log
        self.store = store
        self.time_limits = TimeLimits.from_settings()
        self.parts: list[str] = [request.prefix] if request.prefix else []
        self.last_seq = 0  # of the last event this generation logged
        self.first_token_at: float | None = None  # loop time
        self.finish_reason = ""
        self.usage: Usage | None = None  # as the provider counted it
        self.limit = "first_token"  # the time limit running now
        self.task: asyncio.Task | None = None
        # Why we cancelled our own task: "stopped" (the user) or "interrupted" (shutdown).
        self.cancel_reason: str | None = None

    @property
    def model(self) -> str:
        return self.request.model or self.provider.model_id

    @property
    def message_id(self) -> UUID:
        return self.request.message_id

    @property
    def text(self) -> str:
        # Joined once and kept joined: each flush (4 a second) reads it, and a str per token
        # held to the end was ~50 bytes of overhead per token per open stream.
        if len(self.parts) > 1:
            self.parts = ["".join(self.parts)]
        return self.parts[0] if self.parts else ""

    async def append(self, type: str, data: dict) -> None:
        event = await self.log.append(self.message_id, type, data)
        self.last_seq = event.seq

    async def run(self) -> None:
        started = asyncio.get_running_loop().time()
        stream = self.stream
        try:
            await self.append(
                ev.META,
                {
                    "session_id": str(self.request.conversation_id),
                    "message_id": str(self.message_id),
                    "model": self.model,
                    "provider": self.provider.name,
                    **({"question_id": str(self.request.question_id)} if self.request.question_id else {}),
                },
            )
            if self.request.prefix:  # a continuation: readers from before this log get the text so far
                await self.append(ev.SNAPSHOT, {"text": self.request.prefix})
            await self._read_stream(started)
            outcome = Outcome.complete(self.finish_reason)
        except TimeoutError:
            outcome = Outcome.failed(GenerationTimeout(self.limit, getattr(self.time_limits, self.limit)))
        except ChatbotError as error:
            outcome = Outcome.failed(error)
        except asyncio.CancelledError:
            outcome = Outcome.stopped() if self.cancel_reason == "stopped" else Outcome.interrupted()
            if self.cancel_reason is None:  # not ours: let the canceller see it after we save
                await _close_quietly(stream)
                await asyncio.shield(self._finish(outcome, started))
                raise
            asyncio.current_task().uncancel()  # our own stop: the task ends normally
        except Exception as error:  # a bug or an unexpected library error: still end the stream
            logger.exception("generation %s crashed", self.message_id)
            outcome = Outcome.failed(
                ProviderError(f"Unexpected error: {error.__class__.__name__}", code="internal")
            )
        await _close_quietly(stream)
        await self._finish(outcome, started)

    async def _read_stream(self, started: float) -> None:
        """Log the model's chunks until its stream ends; TimeoutError names `self.limit`.

        The time limits cover waiting for the model only: a limit that fires during a log
        append (a Redis round trip) could be lost in the client library's own cancellation
        handling, and the answer would run on unlimited.
        """
        loop = asyncio.get_running_loop()
        limits = self.time_limits
        total_deadline = started + limits.total
        first_token_deadline = min(started + limits.first_token, total_deadline)
        self.limit = "first_token" if first_token_deadline < total_deadline else "total"
        with Deadline(first_token_deadline) as deadline:
            while True:
                try:
                    chunk = await deadline.wait(anext(self.stream))
                except StopAsyncIteration:
                    return
                now = loop.time()
                if chunk.text:
                    if self.first_token_at is None:
                        self.first_token_at = now
                    text = storable_text(chunk.text)
                    self.parts.append(text)
                    await self.append(ev.DELTA, {"text": text})
                    self.store.mark_dirty(self)
                if chunk.finish_reason:
                    self.finish_reason = chunk.finish_reason
                if chunk.usage is not None:
                    self.usage = chunk.usage
                if self.first_token_at is not None:
                    idle_deadline = now + limits.idle
                    self.limit = "idle" if idle_deadline < total_deadline else "total"
                    deadline.move(min(idle_deadline, total_deadline))

    async def _finish(self, outcome: Outcome, started: float) -> None:
        """Save the outcome, give the slot back, end the log: each step even if another failed.

        Every reader must get exactly one terminal event, and the slot must come back,
        whatever the database or the accounting does.
        """
        self.store.forget_dirty(self)
        now = asyncio.get_running_loop().time()
        try:
            first_token_at = self.first_token_at
            outcome = outcome.with_facts(
                usage=self.usage or self._estimated_usage(outcome),
                duration_ms=round((now - started) * 1000, 3),
                ttft_ms=round((first_token_at - started) * 1000, 3) if first_token_at is not None else None,
            )
            outcome = await self._save(outcome)
        except Exception:  # a bug in building the outcome: the stream must still end
            logger.exception("ending answer %s failed", self.message_id)
            outcome = Outcome.save_failed()
        tokens = outcome.usage.total_tokens if outcome.usage else 0
        await give_back(self.request.client_key, slot=self.request.holds_slot, tokens=tokens)
        try:
            if (usage_event := outcome.usage_event()) is not None:
                await self.append(ev.USAGE, usage_event)
            await self.append(*outcome.terminal_event())
        except Exception:  # this process's readers have it; the shared log's writer keeps retrying
            logger.error("logging the end of answer %s failed", self.message_id, exc_info=True)

    def _estimated_usage(self, outcome: Outcome) -> Usage | None:
        """Counts for an answer whose provider sent none (nothing when nothing was written)."""
        text = self.text[len(self.request.prefix) :]
        if not text and outcome.status != Status.COMPLETE:
            return None
        count = self.provider.count_tokens
        return Usage(
            prompt_tokens=sum(count(m["content"]) for m in self.request.prompt),
            completion_tokens=count(text) if text else 0,
            estimated=True,
        )

    async def _save(self, outcome: Outcome) -> Outcome:
        """Write the outcome, its usage record and its metrics; a refused save is `save_failed`."""
        # Known before they are logged: only this generation appends to the log.
        terminal_seq = self.last_seq + (2 if outcome.usage is not None else 1)
        fields = {
            **outcome.message_fields(),
            "content": self.text,
            "heartbeat_at": timezone.now(),
            "last_seq": terminal_seq,
        }
        if (earlier := self.request.earlier_usage) is not None and outcome.usage is not None:
            fields["prompt_tokens"] += earlier.prompt_tokens
            fields["completion_tokens"] += earlier.completion_tokens
            fields["tokens_estimated"] |= earlier.estimated
        record = self._usage_record(outcome)
        if not await self.store.save_outcome(self.message_id, fields, record):
            # The client must not believe an answer is safe that the database does not hold.
            outcome = Outcome.save_failed().with_facts(
                usage=outcome.usage, duration_ms=outcome.duration_ms, ttft_ms=outcome.ttft_ms
            )
        metrics.observe_answer(
            provider=record.provider,
            model=record.model,
            outcome=outcome.status,
            ttft_ms=outcome.ttft_ms,
            duration_ms=outcome.duration_ms,
            prompt_tokens=record.prompt_tokens,
            completion_tokens=record.completion_tokens,
            error_code=outcome.code,
        )
        logger.info(
            "answer message=%s conversation=%s provider=%s model=%s outcome=%s prompt_tokens=%s "
            "completion_tokens=%s estimated=%s ttft_ms=%s duration_ms=%s",
            self.message_id,
            self.request.conversation_id,
            self.provider.name,
            self.model,
            outcome.status,
            outcome.usage.prompt_tokens if outcome.usage else None,
            outcome.usage.completion_tokens if outcome.usage else None,
            outcome.usage.estimated if outcome.usage else False,
            outcome.ttft_ms,
            outcome.duration_ms,
        )
        return outcome

    def _usage_record(self, outcome: Outcome) -> UsageRecord:
        usage = outcome.usage
        return UsageRecord(
            message_id=self.message_id,
            part=self.request.part,
            user_id=self.request.user_id,
            session_key=self.request.session_key,
            client_key=self.request.client_key,
            provider=self.provider.name,
            model=self.model,
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
            estimated=usage.estimated if usage else False,
            ttft_ms=outcome.ttft_ms,
            duration_ms=outcome.duration_ms,
            outcome=outcome.status,
        )


async def _close_quietly(stream) -> None:
    try:
        await stream.aclose()
    except Exception:  # a provider that fails to close must not keep the answer from ending
        logger.warning("closing the model's stream failed", exc_info=True)


class EarlyStream:
    """A provider stream whose request is sent now, before its generation exists.

    The first chunk is awaited in a task of its own (detached from the request, like the
    generation), so the model's time to first token runs while the request saves the turn;
    the generation then reads the stream as usual, the first chunk first. Whoever ends up
    owning it must `aclose()` it, which also cancels a first chunk still on its way.
    """

    def __init__(self, stream: AsyncIterator[Chunk]):
        self._stream = stream
        self._first: asyncio.Task | None = detached_task(_first_chunk(stream), name="upstream-first-chunk")

    def __aiter__(self) -> EarlyStream:
        return self

    async def __anext__(self) -> Chunk:
        if self._first is None:
            return await anext(self._stream)
        first, self._first = self._first, None
        chunk = await first  # cancelling the reader (stop, timeout) cancels this task too
        if chunk is None:
            raise StopAsyncIteration
        return chunk

    async def aclose(self) -> None:
        first, self._first = self._first, None
        if first is not None:
            first.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):  # nobody will read it now
                await first
        await self._stream.aclose()


async def _first_chunk(stream: AsyncIterator[Chunk]) -> Chunk | None:
    try:
        return await anext(stream)
    except StopAsyncIteration:  # an empty stream: a coroutine must not raise this
        return None
