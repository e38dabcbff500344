"""Per-message event logs: generations append, transports read from an offset.

`EventLog` is the backend contract. `InMemoryEventLog` serves one process;
`eventlog_redis.RedisEventLog` implements the same contract on Redis Streams for a
cluster. Readers
never talk to the generation: they replay what is logged after their offset, then
tail new events until the terminal one, so a reconnecting client gets exactly the
events it missed.
"""

from __future__ import annotations

import asyncio
import time
from array import array
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from uuid import UUID

from .deadline import Deadline
from .events import DELTA, SNAPSHOT, Event

# Yielded by `read()` when nothing happened for `keepalive` seconds, so transports
# can send a keep-alive frame without a timer of their own.
KEEPALIVE = object()


class LogNotFound(LookupError):
    """No log for this message here (never opened, expired, or owned by a process that died)."""


class LogGap(Exception):
    """Events are missing from a shared log and did not come back in time."""

    def __init__(self, message_id: UUID, position: int):
        super().__init__(f"events after {position} of {message_id} are missing from the shared log")


class EventLog:
    """Contract of an event-log backend.

    - `open(message_id, first_seq=)` creates an empty log before the generation starts; a
      continued answer's log replaces its finished one and numbers on from `first_seq`
      (its writer restates what came before in its first events: `meta`, a `snapshot`), so
      a reader from before `first_seq` starts there;
    - `append(message_id, type, data)` assigns the next sequence number and wakes readers;
      a terminal event closes the log, which is then kept for `ttl` seconds;
    - `read(message_id, after=, keepalive=)` yields the events with `seq > after`, then
      live ones, and returns after the terminal event; raises `LogNotFound`;
    - `exists(message_id)`;
    - a log shared by several processes also carries stop requests (`request_stop`,
      `stop_requests`) to the process that runs the generation.
    """

    # Whether other processes read (and may have to end) this log.
    is_shared = False

    async def open(self, message_id: UUID, *, first_seq: int = 1) -> None:
        raise NotImplementedError(".open() must be overridden")

    async def append(self, message_id: UUID, type: str, data: dict) -> Event:
        raise NotImplementedError(".append() must be overridden")

    def read(self, message_id: UUID, *, after: int = 0, keepalive: float | None = None) -> AsyncIterator:
        raise NotImplementedError(".read() must be overridden")

    async def exists(self, message_id: UUID) -> bool:
        raise NotImplementedError(".exists() must be overridden")

    async def tail(self, message_id: UUID) -> Event | None:
        """The last event logged, or None (no log, or nothing logged yet)."""
        raise NotImplementedError(".tail() must be overridden")

    async def text(self, message_id: UUID) -> str | None:
        """The answer's text as logged (its deltas joined), or None without a log."""
        raise NotImplementedError(".text() must be overridden")

    async def close_abandoned(self, message_id: UUID, type: str, data: dict) -> int | None:
        """End a log whose generation is gone with this terminal event, unless it already ended.

        Returns the seq of the log's terminal event (the new one or the one it had), or
        None without a log. Safe to race with another process doing the same: one wins.
        """
        raise NotImplementedError(".close_abandoned() must be overridden")

    async def request_stop(self, message_id: UUID) -> bool:
        """Ask another process to stop this answer; False when no other process shares the log."""
        return False

    def stop_requests(self) -> AsyncIterator[UUID] | None:
        """Stop requests from other processes, or None when the log is not shared."""
        return None

    async def aclose(self) -> None:
        """Release connections (at shutdown)."""


# Deltas' text is sealed into one string per this many events (see `_Stream`).
EVENTS_PER_CHUNK = 64
# Events kept whole at a log's end: the live readers, woken by the append, share their JSON.
RECENT_EVENTS = 4


@dataclass(slots=True)
class _Stream:
    """One message's events, stored compactly.

    Nearly every event is a delta, and a log is kept until its answer ends plus the TTL,
    so a delta keeps only its text: `ends[i]` is the length of all the delta text up to
    and including event `i`, and that text is joined into one string per
    `EVENTS_PER_CHUNK` events (`chunks`; `pending` holds the events since). A token then
    costs a few bytes, not a JSON string, a tuple and a list slot (~290 B), and the
    garbage collector has nothing per token to track. Older deltas are encoded again when
    read, to the same JSON (`Event.create`); other events are kept whole in `others`.
    """

    message_id: UUID
    # The seq before the first event: 0, or where a continued answer's log goes on from.
    base: int = 0
    ends: array = field(default_factory=lambda: array("I"))
    chunks: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)  # "" for an event that is not a delta
    others: dict[int, Event] = field(default_factory=dict)
    recent: deque[Event] = field(default_factory=lambda: deque(maxlen=RECENT_EVENTS))
    # Replaced on every append: readers wait on the current one, the append sets it.
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    expires_at: float | None = None
    # Readers see the first `visible` events; None: all of them (see `InMemoryEventLog.reveal`).
    visible: int | None = None

    def __len__(self) -> int:
        return len(self.ends)

    def add(self, event: Event) -> None:
        text = event.data["text"] if event.type == DELTA else ""
        if event.type != DELTA or len(event.data) > 1:
            self.others[len(self.ends)] = event
        self.ends.append((self.ends[-1] if self.ends else 0) + len(text))
        self.pending.append(text)
        if len(self.pending) == EVENTS_PER_CHUNK:
            self.chunks.append("".join(self.pending))
            self.pending = []
        self.recent.append(event)

    def get(self, index: int) -> Event:
        recent = index - (len(self.ends) - len(self.recent))
        if recent >= 0:
            return self.recent[recent]
        other = self.others.get(index)
        if other is not None:
            return other
        chunk = index // EVENTS_PER_CHUNK
        if chunk < len(self.chunks):
            chunk_start = self.ends[chunk * EVENTS_PER_CHUNK - 1] if chunk else 0
            start = self.ends[index - 1] if index else 0
            text = self.chunks[chunk][start - chunk_start : self.ends[index] - chunk_start]
        else:
            text = self.pending[index - chunk * EVENTS_PER_CHUNK]
        return Event.create(self.base + index + 1, DELTA, {"text": text}, self.message_id)

    def text(self) -> str:
        """The deltas' text joined, from the last `snapshot` on (a continued answer's text before its log)."""
        snapshots = [index for index, event in self.others.items() if event.type == SNAPSHOT]
        deltas = "".join(self.chunks) + "".join(self.pending)
        if not snapshots:
            return deltas
        last = max(snapshots)
        return self.others[last].data["text"] + deltas[self.ends[last] :]


class InMemoryEventLog(EventLog):
    """Event logs in this process's memory; finished logs expire after `ttl` seconds.

    With `gated=True` readers see an event only once `reveal()` says so: a shared log
    shows its own process's readers only what is already safe in the shared store, so a
    client of a worker that is killed never saw text that the cluster lost.
    """

    clock = staticmethod(time.monotonic)
    purge_every = 60.0

    def __init__(self, *, ttl: float, gated: bool = False):
        self.ttl = ttl
        self.gated = gated
        self._streams: dict[UUID, _Stream] = {}
        self._next_purge = 0.0

    async def open(self, message_id: UUID, *, first_seq: int = 1) -> None:
        self._purge_expired()
        stream = _Stream(message_id, base=first_seq - 1, visible=0 if self.gated else None)
        if first_seq > 1:
            self._streams[message_id] = stream  # the finished log's readers keep reading their copy
        else:
            self._streams.setdefault(message_id, stream)

    def reveal(self, message_id: UUID, seq: int | None = None) -> None:
        """Let readers see the events up to `seq` (all of them when None)."""
        stream = self._streams.get(message_id)
        if stream is None or stream.visible is None:
            return
        visible = len(stream) if seq is None else min(seq - stream.base, len(stream))
        if visible > stream.visible:
            stream.visible = visible
            waiters, stream.changed = stream.changed, asyncio.Event()
            waiters.set()

    async def append(self, message_id: UUID, type: str, data: dict) -> Event:
        stream = self._streams.get(message_id)
        if stream is None:
            raise LogNotFound(message_id)
        if stream.expires_at is not None:
            raise RuntimeError(f"the event log of {message_id} is closed")
        event = Event.create(stream.base + len(stream) + 1, type, data, message_id)
        stream.add(event)
        if event.is_terminal:
            stream.expires_at = self.clock() + self.ttl
        if stream.visible is None:
            waiters, stream.changed = stream.changed, asyncio.Event()
            waiters.set()
        return event

    async def read(
        self, message_id: UUID, *, after: int = 0, keepalive: float | None = None
    ) -> AsyncIterator:
        stream = self._streams.get(message_id)
        if stream is None:
            raise LogNotFound(message_id)
        base = stream.base
        position = max(after, base) - base  # an index into the events
        clock = asyncio.get_running_loop().time
        with Deadline() as quiet:
            while True:
                while position < (len(stream) if stream.visible is None else stream.visible):
                    event = stream.get(position)
                    position += 1
                    yield event
                    if event.is_terminal:
                        return
                if stream.expires_at is not None and position >= len(stream):
                    return  # ended, and the reader is at or past its end
                if keepalive is not None:
                    quiet.move(clock() + keepalive)
                try:
                    await quiet.wait(stream.changed.wait())
                except TimeoutError:
                    yield KEEPALIVE

    async def exists(self, message_id: UUID) -> bool:
        return message_id in self._streams

    async def tail(self, message_id: UUID) -> Event | None:
        stream = self._streams.get(message_id)
        if stream is None or len(stream) == 0:
            return None
        return stream.get(len(stream) - 1)

    async def text(self, message_id: UUID) -> str | None:
        stream = self._streams.get(message_id)
        if stream is None:
            return None
        return stream.text()

    async def close_abandoned(self, message_id: UUID, type: str, data: dict) -> int | None:
        stream = self._streams.get(message_id)
        if stream is None:
            return None
        if stream.expires_at is not None:
            return stream.base + len(stream)
        return (await self.append(message_id, type, data)).seq

    def events(self, message_id: UUID) -> list[Event]:
        """Every event of a log, from the first (a shared log re-seeds its copy from these)."""
        stream = self._streams.get(message_id)
        if stream is None:
            return []
        return [stream.get(index) for index in range(len(stream))]

    def _purge_expired(self) -> None:
        now = self.clock()
        if now < self._next_purge:
            return
        self._next_purge = now + self.purge_every
        expired = [
            key for key, s in self._streams.items() if s.expires_at is not None and s.expires_at <= now
        ]
        for key in expired:
            del self._streams[key]


def event_log_from_settings() -> EventLog:
    """The configured backend: this process's memory, or Redis Streams shared by a cluster."""
    from ..conf import chatbot_setting

    ttl = chatbot_setting("EVENT_LOG_TTL")
    if chatbot_setting("EVENT_LOG") == "redis":
        from django.conf import settings

        from .eventlog_redis import RedisEventLog

        # A log whose worker died without a terminal event expires after the longest answer.
        return RedisEventLog(url=settings.REDIS_URL, ttl=ttl, max_age=chatbot_setting("TOTAL_TIMEOUT") + ttl)
    return InMemoryEventLog(ttl=ttl)
