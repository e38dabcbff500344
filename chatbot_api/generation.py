"""Generations: the tasks that turn a provider's stream into a message's event log.

A generation is owned by the server process, not by the HTTP request or socket
that asked for it: it reads the provider's stream, appends numbered events to the
message's log, flushes the partial text to the database at most every
`FLUSH_INTERVAL` seconds and writes the outcome at the end. Clients come and go as
readers of the log.

`GenerationManager` is the per-process registry of running generations; it also
keeps their heartbeat fresh and sweeps messages whose owner died.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from uuid import UUID

from django.db import connections, transaction
from django.utils import timezone

from . import events as ev
from . import metrics
from .conf import chatbot_setting
from .errors import ChatbotError, GenerationTimeout, ProviderError
from .eventlog import EventLog, InMemoryEventLog
from .limits import rate_limiter
from .models import Message, UsageRecord
from .outcome import Outcome
from .providers import Chunk, Provider, Usage
from .providers.base import storable_text

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
        manager: GenerationManager,
    ):
        self.request = request
        self.provider = provider
        self.stream = stream
        self.manager = manager
        self.log = manager.log
        self.time_limits = TimeLimits.from_settings()
        self.parts: list[str] = []
        self.last_seq = 0  # of the last event this generation logged
        self.task: asyncio.Task | None = None
        # Why we cancelled our own task: "stopped" (the user) or "interrupted" (shutdown).
        self.cancel_reason: str | None = None

    @property
    def message_id(self) -> UUID:
        return self.request.message_id

    @property
    def text(self) -> str:
        return "".join(self.parts)

    async def append(self, type: str, data: dict) -> None:
        event = await self.log.append(self.message_id, type, data)
        self.last_seq = event.seq

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        first_token_at: float | None = None
        finish_reason = ""
        usage: Usage | None = None
        stream = self.stream
        limits = self.time_limits
        total_deadline = started + limits.total
        deadline = min(started + limits.first_token, total_deadline)
        limit = "first_token" if deadline < total_deadline else "total"
        try:
            await self.append(
                ev.META,
                {
                    "session_id": str(self.request.conversation_id),
                    "message_id": str(self.message_id),
                    "model": self.provider.model_id,
                    "provider": self.provider.name,
                },
            )
            while True:
                # The time limits cover waiting for the model only: a limit that fires
                # during a log append (a Redis round trip) could be lost in the client
                # library's own cancellation handling, and the answer would run on unlimited.
                try:
                    async with asyncio.timeout_at(deadline):
                        chunk = await anext(stream)
                except StopAsyncIteration:
                    break
                now = loop.time()
                if chunk.text:
                    if first_token_at is None:
                        first_token_at = now
                    text = storable_text(chunk.text)
                    self.parts.append(text)
                    await self.append(ev.DELTA, {"text": text})
                    self.manager.mark_dirty(self)
                if chunk.finish_reason:
                    finish_reason = chunk.finish_reason
                if chunk.usage is not None:
                    usage = chunk.usage
                if first_token_at is not None:
                    idle_deadline = now + limits.idle
                    limit = "idle" if idle_deadline < total_deadline else "total"
                    deadline = min(idle_deadline, total_deadline)
            outcome = Outcome.complete(finish_reason)
        except TimeoutError:
            outcome = Outcome.failed(GenerationTimeout(limit, getattr(limits, limit)))
        except ChatbotError as error:
            outcome = Outcome.failed(error)
        except asyncio.CancelledError:
            outcome = Outcome.stopped() if self.cancel_reason == "stopped" else Outcome.interrupted()
            if self.cancel_reason is None:  # not ours: let the canceller see it after we save
                await _close_quietly(stream)
                await asyncio.shield(self._finish(outcome, usage, started, first_token_at))
                raise
            asyncio.current_task().uncancel()  # our own stop: the task ends normally
        except Exception as error:  # a bug or an unexpected library error: still end the stream
            logger.exception("generation %s crashed", self.message_id)
            outcome = Outcome.failed(
                ProviderError(f"Unexpected error: {error.__class__.__name__}", code="internal")
            )
        await _close_quietly(stream)
        await self._finish(outcome, usage, started, first_token_at)

    async def _finish(
        self, outcome: Outcome, usage: Usage | None, started: float, first_token_at: float | None
    ) -> None:
        """Save the outcome, give the slot back, end the log: each step even if another failed.

        Every reader must get exactly one terminal event, and the slot must come back,
        whatever the database or the accounting does.
        """
        self.manager.forget_dirty(self)
        now = asyncio.get_running_loop().time()
        try:
            outcome = outcome.with_facts(
                usage=usage or self._estimated_usage(outcome),
                duration_ms=round((now - started) * 1000, 3),
                ttft_ms=round((first_token_at - started) * 1000, 3) if first_token_at is not None else None,
            )
            outcome = await self._save(outcome)
        except Exception:  # a bug in building the outcome: the stream must still end
            logger.exception("ending answer %s failed", self.message_id)
            outcome = Outcome.save_failed()
        tokens = outcome.usage.total_tokens if outcome.usage else 0
        await self.manager.release_slot(self.request, tokens=tokens)
        try:
            if (usage_event := outcome.usage_event()) is not None:
                await self.append(ev.USAGE, usage_event)
            await self.append(*outcome.terminal_event())
        except Exception:  # this process's readers have it; the shared log's writer keeps retrying
            logger.error("logging the end of answer %s failed", self.message_id, exc_info=True)

    def _estimated_usage(self, outcome: Outcome) -> Usage | None:
        """Counts for an answer whose provider sent none (nothing when nothing was written)."""
        text = self.text
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
        record = self._usage_record(outcome)
        if not await self.manager.save_outcome(self.message_id, fields, record):
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
            self.provider.model_id,
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
            user_id=self.request.user_id,
            session_key=self.request.session_key,
            client_key=self.request.client_key,
            provider=self.provider.name,
            model=self.provider.model_id,
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
        self._first: asyncio.Task | None = _detached_task(_first_chunk(stream), name="upstream-first-chunk")

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


class DatabaseThread:
    """One thread, with its own connection, for every write the generations make.

    The writes are few (batched flushes, outcomes, heartbeats) and must never wait
    behind a request's thread or deadlock with it, so they do not share asgiref's
    thread-sensitive executor; one thread also keeps SQLite writers in a single file.
    """

    def __init__(self):
        self._executor: ThreadPoolExecutor | None = None

    async def run(self, function, /, *args):
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chatbot-db")
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, _in_connection, function, *args
        )

    def close(self) -> None:
        if self._executor is not None:
            self._executor.submit(connections.close_all)
            self._executor.shutdown(wait=False)
            self._executor = None


def _in_connection(function, *args):
    # The thread keeps its connection between calls, whatever CONN_MAX_AGE says (that setting
    # is for request threads): connecting cost more than the write itself, and closing SQLite's
    # last connection checkpoints and deletes the WAL, so every request paid that again.
    # A connection that failed is replaced before the next call.
    for connection in connections.all(initialized_only=True):
        if connection.errors_occurred:
            if connection.is_usable():
                connection.errors_occurred = False
            else:
                connection.close()
    return function(*args)


class GenerationManager:
    """The generations this process runs, their heartbeat and the orphan sweep."""

    def __init__(self, log: EventLog):
        self.log = log
        self.db = DatabaseThread()
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._running: dict[UUID, Generation] = {}
        # Generations with text not yet in the database, written together every flush interval.
        self._dirty: dict[UUID, Generation] = {}
        self._flusher: asyncio.Task | None = None
        self._housekeeper: asyncio.Task | None = None
        self._stop_listener: asyncio.Task | None = None
        # Counts batch writes, for the "writes per answer" benchmark and tests.
        self.flush_count = 0
        # Set when the server starts to shut down: readers of answers that do not run here
        # end at once (they resume on another worker), new answers are refused.
        self.stopping = asyncio.Event()
        self._drain: asyncio.Task | None = None

    def start(
        self, request: GenerationRequest, *, provider: Provider, stream: AsyncIterator[Chunk]
    ) -> Generation:
        """Start a generation reading `stream` (from `provider`) as a task of this process.

        The message and its log must exist; the generation owns the stream from now on.
        """
        self.ensure_housekeeping()
        generation = Generation(request, provider=provider, stream=stream, manager=self)
        generation.task = _detached_task(generation.run(), name=f"generation-{request.message_id}")
        self._running[request.message_id] = generation
        metrics.STREAMING_NOW.inc()
        generation.task.add_done_callback(lambda _: self._forget(request.message_id))
        return generation

    def _forget(self, message_id: UUID) -> None:
        if self._running.pop(message_id, None) is not None:
            metrics.STREAMING_NOW.dec()

    def mark_dirty(self, generation: Generation) -> None:
        self._dirty[generation.message_id] = generation
        flusher = self._flusher
        if flusher is None or flusher.done():
            self._flusher = _detached_task(self._flush_soon(), name="generation-flush")

    def forget_dirty(self, generation: Generation) -> None:
        self._dirty.pop(generation.message_id, None)

    async def _flush_soon(self) -> None:
        """Wait one flush interval, then write every dirty partial answer in one transaction."""
        await asyncio.sleep(chatbot_setting("FLUSH_INTERVAL"))
        batch = {message_id: generation.text for message_id, generation in self._dirty.items()}
        self._dirty.clear()
        if batch:
            try:
                await self.db.run(_write_partials, batch)
                self.flush_count += 1
            except Exception:  # the database hiccuped: the next flush or the final save will catch up
                logger.warning("flushing %d partial answer(s) failed", len(batch), exc_info=True)

    async def save_outcome(self, message_id: UUID, fields: dict, record: UsageRecord) -> bool:
        """Write an answer's outcome and usage; retried briefly. False (and an ERROR) if it failed.

        When the full row cannot be written, the answer is at least marked failed, so it
        is never left `pending` for the sweep to empty.
        """
        for attempt in range(3):
            try:
                await self.db.run(_save_outcome, message_id, fields, record)
                return True
            except Exception:
                logger.warning(
                    "saving message %s failed (attempt %d)", message_id, attempt + 1, exc_info=True
                )
                await asyncio.sleep(0.2 * (attempt + 1))
        logger.error(
            "saving message %s failed; its outcome (%s, %d characters) is lost",
            message_id,
            fields.get("status"),
            len(fields.get("content", "")),
        )
        try:
            await self.db.run(_mark_save_failed, message_id, fields)
        except Exception:
            logger.error("marking message %s as failed did not work either", message_id, exc_info=True)
        return False

    async def release_slot(self, request: GenerationRequest, *, tokens: int) -> None:
        """Give the answer's concurrency slot back and charge its tokens, off the database thread.

        The limits live in the cache (Redis in a cluster): a slow or frozen cache must not
        hold up the saves, flushes and heartbeats of every other answer. When the cache
        fails, the release is retried in the background until it works.
        """
        if not request.client_key or not (request.holds_slot or tokens):
            return
        if not await self._release(request, tokens, log_failure=False):
            _detached_task(self._release_later(request, tokens), name=f"release-{request.message_id}")

    async def _release(self, request: GenerationRequest, tokens: int, *, log_failure: bool) -> bool:
        try:
            await asyncio.to_thread(
                rate_limiter.release, request.client_key, tokens=tokens, slot=request.holds_slot
            )
            return True
        except Exception:
            if log_failure:
                logger.error("releasing the rate-limit slot of %s failed", request.client_key, exc_info=True)
            return False

    async def _release_later(self, request: GenerationRequest, tokens: int) -> None:
        delay = 0.5
        for _attempt in range(12):  # about two minutes; after that the slot expires by itself
            await asyncio.sleep(delay)
            if await self._release(request, tokens, log_failure=False):
                return
            delay = min(delay * 2, 15)
        await self._release(request, tokens, log_failure=True)

    def is_running(self, message_id: UUID) -> bool:
        return message_id in self._running

    @property
    def running_count(self) -> int:
        return len(self._running)

    async def stop(self, message_id: UUID, *, reason: str = "stopped") -> bool:
        """Cancel a running generation and wait until its outcome is saved and logged."""
        generation = self._running.get(message_id)
        if generation is None or generation.task is None:
            return False
        if generation.cancel_reason is None:
            generation.cancel_reason = reason
            generation.task.cancel()
        await asyncio.wait({generation.task})
        return True

    def stop_soon(self, message_id: UUID) -> None:
        """Stop without waiting (from a reader that is itself being cancelled)."""
        if message_id in self._running:
            _detached_task(self.stop(message_id), name=f"stop-{message_id}")

    def begin_shutdown(self) -> None:
        """The server was told to stop: start draining now, while clients are still connected.

        The ASGI server waits for open responses before it sends the lifespan shutdown, so
        waiting for that would let a long answer hold the process for minutes. Readers of
        answers running here get them (or their `interrupted` end after the grace period);
        other readers end at once with a retryable `server_shutdown`.
        """
        if self._drain is None:
            self.stopping.set()
            self._drain = _detached_task(self._finish_running(), name="generation-drain")

    async def _finish_running(self, grace: float | None = None) -> None:
        """Let running answers finish for `grace` seconds, then save the rest as interrupted."""
        grace = chatbot_setting("SHUTDOWN_GRACE") if grace is None else grace
        tasks = {g.task for g in self._running.values() if g.task is not None}
        if tasks and grace > 0:
            await asyncio.wait(tasks, timeout=grace)
        await asyncio.gather(
            *(self.stop(message_id, reason="interrupted") for message_id in list(self._running)),
            return_exceptions=True,
        )

    async def shutdown(self, *, grace: float | None = None) -> None:
        """Drain (unless a signal already started it), then stop the background tasks."""
        if self._drain is None:
            self.stopping.set()
            self._drain = _detached_task(self._finish_running(grace), name="generation-drain")
        await self._drain
        for attribute in ("_flusher", "_housekeeper", "_stop_listener"):
            task = getattr(self, attribute)
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, RuntimeError):
                    await task
                setattr(self, attribute, None)
        await self.log.aclose()
        self.db.close()

    def ensure_housekeeping(self) -> None:
        loop = asyncio.get_running_loop()
        task = self._housekeeper
        if task is not None and not task.done() and task.get_loop() is loop:
            return
        self._housekeeper = _detached_task(self._housekeeping(), name="generation-housekeeping")
        if self.log.stop_requests() is not None:
            self._stop_listener = _detached_task(self._listen_for_stops(), name="generation-stop-listener")

    async def _listen_for_stops(self) -> None:
        """Stop our generations that another process was asked to stop (shared event log)."""
        while True:
            try:
                async for message_id in self.log.stop_requests():
                    if message_id in self._running:
                        _detached_task(self.stop(message_id), name=f"stop-{message_id}")
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.warning("listening for stop requests failed; retrying", exc_info=True)
                await asyncio.sleep(1)

    async def _housekeeping(self) -> None:
        """Every few seconds: tell the database our generations are alive; sweep orphans.

        The sweep talks to the event log (Redis in a cluster) in a task of its own, so a
        frozen Redis never holds up the heartbeat that keeps our own answers alive.
        """
        period = max(chatbot_setting("ORPHAN_AFTER") / 3, 0.05)
        sweep: asyncio.Task | None = None
        while True:
            try:
                await self.heartbeat()
            except Exception:
                logger.warning("heartbeat failed", exc_info=True)
            if sweep is None or sweep.done():
                sweep = _detached_task(self.sweep(), name="generation-sweep")
            await asyncio.sleep(period)

    async def heartbeat(self) -> None:
        if self._running:
            await self.db.run(_heartbeat, list(self._running), self.worker_id)

    async def sweep(
        self,
        *,
        older_than: float | None = None,
        message_id: UUID | None = None,
        outcome: Outcome | None = None,
    ) -> int:
        """End answers whose worker went quiet for `older_than` seconds, as `interrupted`.

        Each is claimed in the database first (one sweeper wins), then its text is taken
        from the event log when the log holds more than the last flush, the log gets its
        terminal event (readers anywhere end), and its slot is given back.
        """
        older_than = chatbot_setting("ORPHAN_AFTER") if older_than is None else older_than
        try:
            outcome = outcome or Outcome.interrupted()
            orphans = await self.db.run(_claim_orphans, older_than, message_id, list(self._running), outcome)
        except Exception:
            logger.warning("sweeping orphaned answers failed", exc_info=True)
            return 0
        for orphan in orphans:
            await self._close_orphan(orphan, outcome)
        if orphans:
            logger.warning("marked %d orphaned answer(s) as interrupted", len(orphans))
        return len(orphans)

    async def _close_orphan(self, orphan: dict, outcome: Outcome) -> None:
        message_id = orphan["id"]
        content = orphan["content"]
        try:
            logged = await self.log.text(message_id)
            if logged and len(logged) > len(content):
                content = logged  # what readers of the log saw, beyond the last flush
            last_seq = await self.log.close_abandoned(message_id, *outcome.terminal_event())
        except Exception:  # the readers' own liveness checks end them from the database
            logger.warning("closing the event log of orphan %s failed", message_id, exc_info=True)
            last_seq = None
        tokens = 0
        if content:
            from .providers import get_provider

            tokens = get_provider().count_tokens(content)
        try:
            await self.db.run(_finish_orphan, orphan, outcome.status, content, last_seq, tokens)
        except Exception:
            logger.error("saving orphan %s failed", message_id, exc_info=True)
        await self.release_slot(
            GenerationRequest(
                message_id=message_id,
                conversation_id=orphan["conversation_id"],
                prompt=[],
                client_key=orphan["client_key"],
                holds_slot=orphan["holds_slot"],
            ),
            tokens=tokens,
        )


def _detached_task(coroutine, *, name: str) -> asyncio.Task:
    """A task that outlives the request that started it.

    It runs in an empty context: a request's context carries asgiref's per-request
    thread executor, which shuts down when the response ends, and database calls
    made from it afterwards would fail.
    """
    return asyncio.get_running_loop().create_task(coroutine, name=name, context=contextvars.Context())


def _write_partials(batch: dict[UUID, str]) -> None:
    """One statement executed for every streaming answer, in one transaction.

    `executemany` of a statement built once: the ORM's `update()` per answer cost ~0.17 ms
    of CPU each (42 ms for 250 answers, holding the GIL while every stream waits).
    """
    connection = connections[Message.objects.db]
    now = Message._meta.get_field("heartbeat_at").get_db_prep_value(timezone.now(), connection)
    to_db = Message._meta.pk.get_db_prep_value
    rows = [
        (text, Status.STREAMING, now, to_db(message_id, connection)) for message_id, text in batch.items()
    ]
    with transaction.atomic(using=connection.alias), connection.cursor() as cursor:
        cursor.executemany(_partials_sql(connection), rows)


def _partials_sql(connection) -> str:
    # Only while live: a late flush must never overwrite a saved outcome.
    def column(name: str) -> str:
        return connection.ops.quote_name(Message._meta.get_field(name).column)

    live = ", ".join(f"'{status}'" for status in Message.LIVE_STATUSES)
    return (
        f"UPDATE {connection.ops.quote_name(Message._meta.db_table)} SET {column('content')} = %s, "
        f"{column('status')} = %s, {column('heartbeat_at')} = %s "
        f"WHERE {column('id')} = %s AND {column('status')} IN ({live})"
    )


def _save_outcome(message_id: UUID, fields: dict, record: UsageRecord) -> None:
    with transaction.atomic():
        if not Message.objects.filter(pk=message_id).update(**fields):
            # Deleted meanwhile (with its conversation): the usage is still charged.
            record.message_id = None
        elif UsageRecord.objects.filter(message_id=message_id).exists():
            return
        record.save()


def _mark_save_failed(message_id: UUID, fields: dict) -> None:
    """The least an answer whose outcome could not be saved gets: failed, with its text if possible."""
    live = Message.objects.filter(pk=message_id, status__in=Message.LIVE_STATUSES)
    failed = {
        "status": Status.FAILED,
        "finish_reason": "error",
        "error_code": "save_failed",
        "error_message": Outcome.save_failed().message,
        "heartbeat_at": timezone.now(),
        "last_seq": fields.get("last_seq"),
    }
    try:
        with transaction.atomic():
            live.update(content=fields.get("content", ""), **failed)
    except Exception:  # the text itself may be what the database refuses
        live.update(**failed)


def _heartbeat(message_ids: list[UUID], worker: str) -> None:
    Message.objects.filter(pk__in=message_ids, status__in=Message.LIVE_STATUSES).update(
        heartbeat_at=timezone.now(), worker=worker
    )


def _claim_orphans(
    older_than: float, message_id: UUID | None, running: list[UUID], outcome: Outcome
) -> list[dict]:
    """Mark live answers whose heartbeat is older than `older_than` as interrupted; return them.

    Each row is claimed by a conditional update, so of several sweepers (workers, readers)
    exactly one goes on to close it. Answers this process runs are never claimed.
    """
    cutoff = timezone.now() - timedelta(seconds=older_than)
    candidates = Message.objects.filter(status__in=Message.LIVE_STATUSES, heartbeat_at__lt=cutoff)
    if message_id is not None:
        candidates = candidates.filter(pk=message_id)
    claimed = []
    for row in candidates.exclude(pk__in=running).values(
        "id",
        "content",
        "client_key",
        "holds_slot",
        "conversation_id",
        "conversation__user_id",
        "conversation__session_key",
        "provider",
        "model",
    )[:500]:
        won = Message.objects.filter(
            pk=row["id"], status__in=Message.LIVE_STATUSES, heartbeat_at__lt=cutoff
        ).update(
            status=outcome.status,
            error_code=outcome.code,
            error_message=outcome.message,
            finish_reason=outcome.finish_reason,
            heartbeat_at=timezone.now(),
            holds_slot=False,
        )
        if won:
            claimed.append(row)
    return claimed


def _finish_orphan(orphan: dict, status: str, content: str, last_seq: int | None, tokens: int) -> None:
    with transaction.atomic():
        updates: dict = {"completion_tokens": tokens, "tokens_estimated": True}
        if content != orphan["content"]:
            updates["content"] = content
        if last_seq is not None:
            updates["last_seq"] = last_seq
        Message.objects.filter(pk=orphan["id"]).update(**updates)
        if not UsageRecord.objects.filter(message_id=orphan["id"]).exists():
            UsageRecord.objects.create(
                message_id=orphan["id"],
                user_id=orphan["conversation__user_id"],
                session_key=orphan["conversation__session_key"] or "",
                client_key=orphan["client_key"],
                provider=orphan["provider"],
                model=orphan["model"],
                completion_tokens=tokens,
                estimated=True,
                outcome=status,
            )


async def sweep_orphans(*, older_than: float | None = None) -> int:
    """Mark live messages whose worker has not reported for a while as `interrupted`."""
    return await get_manager().sweep(older_than=older_than)


_manager: GenerationManager | None = None


def get_manager() -> GenerationManager:
    """The process's generation manager, built on first use with the configured event log."""
    global _manager
    if _manager is None:
        _manager = GenerationManager(_event_log_from_settings())
    return _manager


def _event_log_from_settings() -> EventLog:
    ttl = chatbot_setting("EVENT_LOG_TTL")
    if chatbot_setting("EVENT_LOG") == "redis":
        from django.conf import settings

        from .eventlog_redis import RedisEventLog

        # A log whose worker died without a terminal event expires after the longest answer.
        return RedisEventLog(url=settings.REDIS_URL, ttl=ttl, max_age=chatbot_setting("TOTAL_TIMEOUT") + ttl)
    return InMemoryEventLog(ttl=ttl)


def reset_manager() -> None:
    """Forget the manager and its logs (tests)."""
    global _manager
    _manager = None
