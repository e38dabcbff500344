"""The generations this process runs: start, stop, drain at shutdown, heartbeat, orphan sweep.

`get_manager()` is the process's one manager, built on first use with the configured
event log (`eventlog.event_log_from_settings()`) and an `AnswerStore`; generations get
the log and the store at construction and never call back into the manager.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator
from uuid import UUID

from .. import metrics
from ..conf import chatbot_setting
from ..limits import give_back
from ..providers import Chunk, Provider
from .eventlog import EventLog, event_log_from_settings
from .generation import Generation, GenerationRequest
from .outcome import Outcome
from .store import (
    AnswerStore,
    _claim_orphans,
    _finish_orphan,
    _heartbeat,
    _number_orphans_end,
    _orphan_candidates,
)
from .tasks import detached_task

logger = logging.getLogger("chatbot.generation")


class GenerationManager:
    """The generations this process runs, their heartbeat and the orphan sweep."""

    def __init__(self, log: EventLog, store: AnswerStore | None = None):
        self.log = log
        self.store = store or AnswerStore()
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._running: dict[UUID, Generation] = {}
        self._housekeeper: asyncio.Task | None = None
        self._stop_listener: asyncio.Task | None = None
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
        generation = Generation(request, provider=provider, stream=stream, log=self.log, store=self.store)
        generation.task = detached_task(generation.run(), name=f"generation-{request.message_id}")
        self._running[request.message_id] = generation
        metrics.STREAMING_NOW.inc()
        generation.task.add_done_callback(lambda _: self._forget(request.message_id))
        return generation

    def _forget(self, message_id: UUID) -> None:
        if self._running.pop(message_id, None) is not None:
            metrics.STREAMING_NOW.dec()

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
            detached_task(self.stop(message_id), name=f"stop-{message_id}")

    def begin_shutdown(self) -> None:
        """The server was told to stop: start draining now, while clients are still connected.

        The ASGI server waits for open responses before it sends the lifespan shutdown, so
        waiting for that would let a long answer hold the process for minutes. Readers of
        answers running here get them (or their `interrupted` end after the grace period);
        other readers end at once with a retryable `server_shutdown`.
        """
        if self._drain is None:
            self.stopping.set()
            self._drain = detached_task(self._finish_running(), name="generation-drain")

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
            self._drain = detached_task(self._finish_running(grace), name="generation-drain")
        await self._drain
        for attribute in ("_housekeeper", "_stop_listener"):
            task = getattr(self, attribute)
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, RuntimeError):
                    await task
                setattr(self, attribute, None)
        await self.log.aclose()
        await self.store.close()

    def ensure_housekeeping(self) -> None:
        loop = asyncio.get_running_loop()
        task = self._housekeeper
        if task is not None and not task.done() and task.get_loop() is loop:
            return
        self._housekeeper = detached_task(self._housekeeping(), name="generation-housekeeping")
        if self.log.stop_requests() is not None:
            self._stop_listener = detached_task(self._listen_for_stops(), name="generation-stop-listener")

    async def _listen_for_stops(self) -> None:
        """Stop our generations that another process was asked to stop (shared event log)."""
        while True:
            try:
                async with contextlib.aclosing(self.log.stop_requests()) as requests:
                    async for message_id in requests:
                        if message_id in self._running:
                            detached_task(self.stop(message_id), name=f"stop-{message_id}")
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
                sweep = detached_task(self.sweep(), name="generation-sweep")
            await asyncio.sleep(period)

    async def heartbeat(self) -> None:
        if self._running:
            await self.store.db.run(_heartbeat, list(self._running), self.worker_id)

    async def sweep(
        self,
        *,
        older_than: float | None = None,
        message_id: UUID | None = None,
        outcome: Outcome | None = None,
    ) -> int:
        """End answers whose worker went quiet for `older_than` seconds, as `interrupted`.

        Each is claimed in the database (one sweeper wins) with its text as the event log
        has it when the log holds more than the last flush; then the log gets its terminal
        event (readers anywhere end), and its slot is given back.
        """
        older_than = chatbot_setting("ORPHAN_AFTER") if older_than is None else older_than
        try:
            outcome = outcome or Outcome.interrupted()
            rows, cutoff = await self.store.db.run(
                _orphan_candidates, older_than, message_id, list(self._running)
            )
            if not rows:
                return 0
            texts = await asyncio.gather(*(self._logged_text(row["id"]) for row in rows))
            logged = {row["id"]: text for row, text in zip(rows, texts, strict=True)}
            orphans = await self.store.db.run(_claim_orphans, rows, cutoff, logged, outcome)
        except Exception:
            logger.warning("sweeping orphaned answers failed", exc_info=True)
            return 0
        for orphan in orphans:
            await self._close_orphan(orphan, outcome)
        if orphans:
            logger.warning("marked %d orphaned answer(s) as interrupted", len(orphans))
        return len(orphans)

    async def _logged_text(self, message_id: UUID) -> str | None:
        """An orphan's text as its log has it (readers may have seen more than the last flush)."""
        try:
            return await self.log.text(message_id)
        except Exception:  # the flushed text is the best there is
            logger.warning("reading the event log of orphan %s failed", message_id, exc_info=True)
            return None

    async def _close_orphan(self, orphan: dict, outcome: Outcome) -> None:
        """Charge a claimed orphan, end its log, give its slot back."""
        message_id = orphan["id"]
        content = orphan["content"]
        tokens = 0
        if content:
            from ..providers import get_provider

            tokens = get_provider().count_tokens(content)
            if orphan["continuations"]:  # only the part being written: the rest was counted
                tokens = max(tokens - (orphan["completion_tokens"] or 0), 0)
        try:
            await self.store.db.run(_finish_orphan, orphan, outcome.status, tokens)
        except Exception:
            logger.error("saving orphan %s failed", message_id, exc_info=True)
        try:
            last_seq = await self.log.close_abandoned(message_id, *outcome.terminal_event())
            if last_seq is not None:
                await self.store.db.run(_number_orphans_end, message_id, last_seq)
        except Exception:  # the readers' own liveness checks end them from the database
            logger.warning("closing the event log of orphan %s failed", message_id, exc_info=True)
        await give_back(orphan["client_key"], slot=orphan["holds_slot"], tokens=tokens)


async def sweep_orphans(*, older_than: float | None = None) -> int:
    """Mark live messages whose worker has not reported for a while as `interrupted`."""
    return await get_manager().sweep(older_than=older_than)


_manager: GenerationManager | None = None


def get_manager() -> GenerationManager:
    """The process's generation manager, built on first use with the configured event log."""
    global _manager
    if _manager is None:
        _manager = GenerationManager(event_log_from_settings())
    return _manager


def reset_manager() -> None:
    """Forget the manager and its logs (tests)."""
    global _manager
    _manager = None
