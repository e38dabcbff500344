"""Reading an answer: its events after an offset, live to the end, whatever fails meanwhile.

`follow_events()` is what every transport reads. It replays the answer's event log
from the reader's offset and follows it live; when the log goes quiet it checks that
the answer's worker is still alive (and sweeps the answer if not), when the log is
gone it rebuilds the events from the saved message, and when this worker shuts down
it ends readers of answers that run elsewhere. Each reader gets exactly one terminal
event, or none when it already had the end (`events_after()` says so first: 204).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from datetime import timedelta

from django.utils import timezone

from ..conf import chatbot_setting
from ..errors import UNAVAILABLE_ERRORS
from ..models import Message
from . import events as ev
from .eventlog import KEEPALIVE, LogGap, LogNotFound
from .manager import get_manager
from .outcome import Outcome

logger = logging.getLogger("chatbot.streaming")


async def follow_events(*, message: Message, after: int = 0, keepalives: bool = False) -> AsyncIterator:
    """The message's events after `after`, live until the terminal one.

    Ends with exactly one terminal event, whatever happens to the answer's worker or to
    the shared log, or with none when `after` is already at or past the end. A transport
    that keeps idle connections open on its own (SSE comments, NDJSON blank lines) asks
    for `keepalives`: then `KEEPALIVE` comes after every `KEEPALIVE_INTERVAL` of silence.
    With `CANCEL_ON_DISCONNECT`, a reader that leaves before the end stops the answer.
    """
    finished = False
    events = _message_events(message=message, after=after)
    try:
        async with aclosing(events):
            async for item in events:
                if item is KEEPALIVE:
                    if keepalives:
                        yield item
                    continue
                finished = item.is_terminal
                yield item
    finally:
        if not finished and chatbot_setting("CANCEL_ON_DISCONNECT"):
            # Not awaited: we may be inside a cancellation; the stop saves the partial text.
            get_manager().stop_soon(message.id)


# An answer saved this recently may still be on its way into the log: don't end it for the log yet.
SETTLE_SECONDS = 2.0


class _EndFromDatabase(Exception):
    """The log will not end by itself: finish the reader from the saved message."""


def _message_events(*, message: Message, after: int) -> AsyncIterator:
    return _Reader(message, after).events()


class _Ended(Exception):
    """The reader is done: the log's terminal event was read, or it was already past it."""


class _Reader:
    """One reader of one answer: its position, its silence, and how it ends."""

    def __init__(self, message: Message, after: int):
        self.message = message
        self.position = after  # the seq of the last event yielded
        self.manager = get_manager()
        self.keepalive = chatbot_setting("KEEPALIVE_INTERVAL")
        # A silent reader checks this often that the answer's worker is still alive.
        self.check_every = min(self.keepalive, max(chatbot_setting("ORPHAN_AFTER") / 3, 0.05))
        self.clock = asyncio.get_running_loop().time
        self.last_sent = self.clock()

    async def events(self) -> AsyncIterator:
        """The events after the offset, then exactly one terminal event (or none past the end)."""
        message_id = self.message.id
        try:
            # Each nested generator is closed here, not by the garbage collector (aclosing).
            async with aclosing(self._follow()) as items:
                async for item in items:
                    yield item
        except _Ended:
            return
        except _Stopping:
            yield ev.Event.for_reader(
                "server_shutdown",
                "This server is restarting; resume the answer to go on reading it.",
                message_id,
            )
            return
        except MessageGone:
            yield ev.Event.for_reader(
                "message_not_found", "This answer was deleted.", message_id, retryable=False
            )
            return
        except (LogGap, *UNAVAILABLE_ERRORS) as error:
            logger.warning("reader of %s ended: %s: %s", message_id, error.__class__.__name__, error)
            yield ev.Event.for_reader(
                "server_busy", "The answer's event stream is unreachable for now; resume shortly.", message_id
            )
            return
        except _EndFromDatabase:
            pass
        # No log (expired, or lost with its worker), or one that will never end: the database has it.
        for event in await self._from_database():
            yield event

    async def _follow(self) -> AsyncIterator:
        """Read the log; while there is none, wait for it as long as the answer may come back."""
        while True:
            try:
                async with aclosing(self._from_log()) as items:
                    async for item in items:
                        yield item
            except LogNotFound:
                pass
            if not await _log_may_come_back(self.message.id, self.manager):
                raise _EndFromDatabase
            await asyncio.sleep(self.check_every)
            if self._keepalive_due():
                yield KEEPALIVE

    async def _from_log(self) -> AsyncIterator:
        reader = self.manager.log.read(self.message.id, after=self.position, keepalive=self.check_every)
        if not self.manager.is_running(self.message.id):
            # Nothing here will end this reader when the server stops: the race will.
            reader = _until_stopping(reader, self.manager.stopping)
        async with aclosing(reader):
            async for item in reader:
                if item is KEEPALIVE:
                    if await _log_is_abandoned(self.message.id, self.manager):
                        raise _EndFromDatabase
                    if self._keepalive_due():
                        yield KEEPALIVE
                    continue
                self.position = item.seq
                self.last_sent = self.clock()
                yield item
                if item.is_terminal:
                    raise _Ended
        raise _Ended  # the log had ended, and the reader was at or past its end

    def _keepalive_due(self) -> bool:
        if self.clock() - self.last_sent < self.keepalive * 0.9:
            return False
        self.last_sent = self.clock()
        return True

    async def _from_database(self) -> list[ev.Event]:
        message = self.message
        await message.arefresh_from_db()
        events = stored_events(message, after=self.position)
        if message.last_seq is None and not message.is_live:
            # The log's numbering is lost with it: the first replay fixes one, so that a
            # reader resuming at its end is told there is nothing more (204), not a new end.
            await Message.objects.filter(pk=message.pk, last_seq__isnull=True).aupdate(
                last_seq=events[-1].seq
            )
        return events


class _Stopping(Exception):
    """This worker is shutting down."""


async def _until_stopping(reader: AsyncIterator, stopping: asyncio.Event) -> AsyncIterator:
    """`reader`'s items until `stopping` is set, then `_Stopping`.

    Only for readers of answers that run elsewhere (rare): a task per item would cost
    every local stream CPU per token; those end with their generation anyway.
    """
    if stopping.is_set():
        raise _Stopping
    stop = asyncio.ensure_future(stopping.wait())
    try:
        async with aclosing(reader):
            while True:
                item = asyncio.ensure_future(anext(reader))
                await asyncio.wait({item, stop}, return_when=asyncio.FIRST_COMPLETED)
                if not item.done():
                    item.cancel()
                    with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                        await item
                    raise _Stopping
                try:
                    value = item.result()
                except StopAsyncIteration:
                    return
                yield value
    finally:
        stop.cancel()


class MessageGone(LookupError):
    """The answer was deleted while a reader followed it."""


async def _answer_state(message_id) -> dict:
    row = await Message.objects.filter(pk=message_id).values("status", "heartbeat_at", "last_seq").afirst()
    if row is None:
        raise MessageGone(message_id)
    return row


def _is_stale(row: dict, seconds: float) -> bool:
    return row["heartbeat_at"] is None or row["heartbeat_at"] < timezone.now() - timedelta(seconds=seconds)


async def _log_is_abandoned(message_id, manager) -> bool:
    """A silent reader's check: end the answer if its worker is gone; True if only the database can.

    A live answer whose worker stopped reporting is swept (the sweep writes the terminal
    event to the log, which this reader then reads). A saved answer whose log never got
    its terminal event (a Redis write lost with its worker) gets it now.
    """
    if manager.is_running(message_id):
        return False
    row = await _answer_state(message_id)
    if row["status"] in Message.LIVE_STATUSES:
        orphan_after = chatbot_setting("ORPHAN_AFTER") if manager.log.is_shared else SETTLE_SECONDS
        if _is_stale(row, orphan_after):
            await manager.sweep(older_than=orphan_after, message_id=message_id)
        return False
    if not _is_stale(row, SETTLE_SECONDS):
        return False  # just saved: its worker is writing the end to the log
    message = await Message.objects.aget(pk=message_id)
    seq = await manager.log.close_abandoned(message_id, *Outcome.of_message(message).terminal_event())
    if seq is None:
        return True
    if seq != message.last_seq:
        await Message.objects.filter(pk=message_id).aupdate(last_seq=seq)
    return False


async def _log_may_come_back(message_id, manager) -> bool:
    """No log here: wait for it (a shared log its live worker re-creates) or end from the database."""
    row = await _answer_state(message_id)
    if row["status"] not in Message.LIVE_STATUSES:
        return False
    if manager.log.is_shared and not _is_stale(row, chatbot_setting("ORPHAN_AFTER")):
        return True
    # Its worker is gone (or, with a log only this process has, it is not running here).
    await manager.sweep(older_than=0 if not manager.log.is_shared else None, message_id=message_id)
    return False


def stored_events(message: Message, *, after: int = 0) -> list[ev.Event]:
    """Events rebuilt from a saved message whose log is gone, numbered as the log was.

    The terminal event keeps its seq (`last_seq`); the text comes as one event just
    before the usage: a `delta` for a client starting from 0, a `snapshot` (the whole
    text, replacing what it had) for one that had read part of the log. Nothing is
    returned at or past the end.
    """
    usage = None
    if message.prompt_tokens is not None:
        usage = {
            "prompt_tokens": message.prompt_tokens,
            "completion_tokens": message.completion_tokens or 0,
            "estimated": message.tokens_estimated,
        }
    meta = {
        "session_id": str(message.conversation_id),
        "message_id": str(message.id),
        "model": message.model,
        "provider": message.provider,
    }
    # Without a known numbering, the events go after whatever the client already has.
    terminal_seq = message.last_seq or max(
        2 + bool(message.content) + bool(usage), after + 1 + bool(message.content) + bool(usage)
    )
    text_seq = terminal_seq - 1 - bool(usage)
    items: list[tuple[int, str, dict]] = [(1, ev.META, meta)]
    if message.content and text_seq > 1:
        items.append((text_seq, ev.DELTA if after == 0 else ev.SNAPSHOT, {"text": message.content}))
    if usage is not None:
        items.append((terminal_seq - 1, ev.USAGE, usage))
    items.append((terminal_seq, *Outcome.of_message(message).terminal_event()))
    return [ev.Event.create(seq, kind, data, message.id) for seq, kind, data in items if seq > after]


async def events_after(*, message: Message, after: int) -> bool:
    """Whether a reader resuming after `after` has anything left to read.

    False only for an answer that ended and whose end the reader already has; raises
    the log's connection errors (503) when the shared log cannot be asked.
    """
    manager = get_manager()
    if message.is_live:
        if manager.log.is_shared and not manager.is_running(message.id):
            await manager.log.tail(message.id)  # a Redis outage answers 503 now, not a cut stream
        return True
    tail = await manager.log.tail(message.id)
    if tail is not None and tail.is_terminal:
        return after < tail.seq
    # Without a known last seq the replay sends an end after `after` (and fixes the numbering).
    return message.last_seq is None or after < message.last_seq
