"""Event logs in Redis Streams, shared by every worker process of a cluster.

One stream per answer, `chatbot:events:<message_id>`. Entry ids encode the
sequence number (`1-<seq>`; `0-1` marks an opened log, with the seq it starts from for a
continued answer), so resuming
after event N is `XRANGE (1-N +` followed by `XREAD BLOCK` from there. Only the
generation's process appends to a log, so it numbers the events itself. A log
expires `ttl` seconds after its terminal event (or after `max_age` if its worker
died without one).

The process running a generation also keeps its events in memory while it runs (and
`local_ttl` seconds after), and its own readers (nearly all readers: the request that
starts an answer streams it) follow that copy. Only readers in other processes, or
after the copy expired, read Redis, each holding a pooled connection while it blocks in
`XREAD`. Following every stream through Redis cost one connection per open stream, and
redis-py's pool stops at 100.

Stop requests cross processes on the pub/sub channel `chatbot:stop`: the process
running the generation stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import weakref
from collections.abc import AsyncIterator
from contextlib import aclosing
from uuid import UUID

import redis.asyncio as aioredis

from .eventlog import KEEPALIVE, EventLog, InMemoryEventLog, LogGap, LogNotFound
from .events import DELTA, SNAPSHOT, Event

logger = logging.getLogger("chatbot.eventlog")

OPEN_MARKER = "0-1"
STOP_CHANNEL = "chatbot:stop"


def _entry_id(seq: int) -> str:
    return f"1-{seq}"


class RedisEventLog(EventLog):
    """`EventLog` on Redis Streams; see the module docstring for the layout."""

    prefix = "chatbot:events:"
    is_shared = True
    block_slice = 4.0  # seconds; below redis-py's default socket timeout of 5 s
    local_ttl = 30.0  # seconds this process's readers keep a finished answer's events in memory
    # Connections per process (a `max_connections` in the URL overrides both): commands are
    # short round trips, so they queue for a connection (up to `pool_wait` seconds) rather
    # than fail, as redis-py's default pool does beyond 100; readers from other processes
    # hold one each while they block, so they have a pool of their own.
    command_connections = 64
    reader_connections = 1024
    pool_wait = 30.0
    socket_timeout = 5.0
    # A cross-worker reader waits this long for Redis to come back before it ends its
    # stream with a retryable `server_busy` (the client resumes; nothing is lost).
    outage_wait = 10.0
    # How long a terminal append waits for Redis before it returns anyway (the writer
    # keeps retrying in the background; this process's readers have the event already).
    terminal_wait = 5.0

    def __init__(self, *, url: str, ttl: float, max_age: float):
        self.url = url
        self.ttl = max(int(ttl), 1)
        self.max_age = max(int(max_age), self.ttl)
        # The events of this process's generations, numbered here (only this process appends).
        self._local = InMemoryEventLog(ttl=min(self.local_ttl, self.ttl), gated=True)
        # redis.asyncio clients belong to the event loop that made them: (commands, readers).
        self._clients: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._writers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # loop -> _Writer

    def _redis(self, *, reader: bool = False) -> aioredis.Redis:
        loop = asyncio.get_running_loop()
        clients = self._clients.get(loop)
        if clients is None:
            clients = self._clients[loop] = tuple(
                aioredis.Redis(
                    connection_pool=aioredis.BlockingConnectionPool.from_url(
                        self.url,
                        max_connections=size,
                        timeout=self.pool_wait,
                        # A frozen server fails a command after this, instead of hanging it.
                        socket_timeout=self.socket_timeout,
                        socket_connect_timeout=self.socket_timeout,
                    )
                )
                for size in (self.command_connections, self.reader_connections)
            )
        return clients[1] if reader else clients[0]

    def _key(self, message_id: UUID) -> str:
        return f"{self.prefix}{message_id}"

    async def open(self, message_id: UUID, *, first_seq: int = 1) -> None:
        key = self._key(message_id)
        async with self._redis().pipeline(transaction=True) as pipe:
            if first_seq > 1:
                pipe.delete(key)  # a continued answer: its finished log is replaced
            pipe.xadd(key, _open_fields(first_seq), id=OPEN_MARKER)
            pipe.expire(key, self.max_age)
            await pipe.execute()
        await self._local.open(message_id, first_seq=first_seq)

    async def append(self, message_id: UUID, type: str, data: dict) -> Event:
        """Log in memory at once (this process's readers see it now), copy to Redis in batches.

        Every append waiting for its own XADD cost a round trip and a pooled connection per
        token; the writer sends whatever accumulated since its last write in one MULTI/EXEC.
        A terminal event returns once it is in Redis, so other processes see the end.
        """
        event = await self._local.append(message_id, type, data)  # LogNotFound unless opened here
        writer = self._writer()
        written = writer.add(
            message_id, self._key(message_id), event, expire=self.ttl if event.is_terminal else None
        )
        if writer.degraded:  # Redis is failing or slow: this process's readers must not wait for it
            self._local.reveal(message_id)
        if event.is_terminal:
            try:
                await asyncio.wait_for(asyncio.shield(written), self.terminal_wait)
            except TimeoutError:
                logger.error("Redis did not take the end of answer %s in time; still retrying", message_id)
        return event

    def _writer(self) -> _Writer:
        loop = asyncio.get_running_loop()
        writer = self._writers.get(loop)
        if writer is None:
            writer = self._writers[loop] = _Writer(
                self._redis, self._seed_events, self._local.reveal, ttl=self.ttl, max_age=self.max_age
            )
        return writer

    def _seed_events(self, message_id: UUID) -> list[Event]:
        """Every event logged here for a message: what a vanished stream is re-created from."""
        return self._local.events(message_id)

    async def read(
        self, message_id: UUID, *, after: int = 0, keepalive: float | None = None
    ) -> AsyncIterator:
        if await self._local.exists(message_id):
            async with aclosing(self._local.read(message_id, after=after, keepalive=keepalive)) as events:
                async for event in events:
                    yield event
            return
        async with aclosing(self._read_shared(message_id, after, keepalive)) as events:
            async for event in events:
                yield event

    async def _read_shared(self, message_id: UUID, after: int, keepalive: float | None) -> AsyncIterator:
        """A reader in another process than the generation's: XRANGE, then XREAD BLOCK in slices."""
        client = self._redis(reader=True)
        key = self._key(message_id)
        if not await client.exists(key):
            raise LogNotFound(message_id)
        last_event = await self.tail(message_id)
        if last_event is not None and last_event.is_terminal and last_event.seq <= after:
            return  # ended, and the reader is at or past its end
        # Block in slices shorter than the client's socket timeout, and send a keep-alive
        # only once `keepalive` seconds have passed without an event.
        wait = min(keepalive or self.block_slice, self.block_slice)
        clock = asyncio.get_running_loop().time
        quiet_since = clock()
        # The seq of the last event yielded; a continued answer's log restates what came before.
        position = max(after, await self._first_seq(client, key) - 1, 0)
        entries = await self._range_after(client, key, position)
        while True:
            for event in _events_of(entries):
                if event.seq <= position:  # re-read after a gap or an outage
                    continue
                if event.seq != position + 1:
                    # A hole: never skip it silently. The generating worker re-creates a
                    # stream that Redis lost; read again from where we are until it has.
                    entries = await self._fill_gap(client, key, position, message_id)
                    break
                position = event.seq
                yield event
                if event.is_terminal:
                    return
            else:
                entries = await self._next_entries(client, key, position, wait)
                if entries or not keepalive:
                    quiet_since = clock()
                elif clock() - quiet_since >= keepalive:
                    quiet_since = clock()
                    yield KEEPALIVE

    async def _first_seq(self, client, key: str) -> int:
        marker = await client.xrange(key, min=OPEN_MARKER, max=OPEN_MARKER)
        return int(marker[0][1].get(b"from", 1)) if marker else 1

    async def _range_after(self, client, key: str, position: int) -> list:
        last = _entry_id(position) if position > 0 else OPEN_MARKER
        return await client.xrange(key, min=f"({last}", max="+")

    async def _next_entries(self, client, key: str, position: int, wait: float) -> list:
        """The entries after `position`, waiting up to `wait`; rides out a Redis outage."""
        last = _entry_id(position) if position > 0 else OPEN_MARKER
        deadline = asyncio.get_running_loop().time() + self.outage_wait
        while True:
            try:
                response = await client.xread({key: last}, block=int(wait * 1000), count=256)
                return response[0][1] if response else []
            except (aioredis.ConnectionError, aioredis.TimeoutError):
                if asyncio.get_running_loop().time() > deadline:
                    raise
                logger.warning("reading %s from Redis failed; retrying", key)
                await asyncio.sleep(0.5)

    async def _fill_gap(self, client, key: str, position: int, message_id: UUID) -> list:
        deadline = asyncio.get_running_loop().time() + self.outage_wait
        while asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.2)
            entries = await self._range_after(client, key, position)
            first = next((_decode(f[b"e"]).seq for _, f in entries if b"e" in f), None)
            if first is None or first == position + 1:
                return entries
        raise LogGap(message_id, position)

    async def exists(self, message_id: UUID) -> bool:
        return bool(await self._redis().exists(self._key(message_id)))

    async def tail(self, message_id: UUID) -> Event | None:
        if await self._local.exists(message_id):
            return await self._local.tail(message_id)
        entries = await self._redis().xrevrange(self._key(message_id), max="+", min="-", count=1)
        if not entries or b"e" not in entries[0][1]:
            return None
        return _decode(entries[0][1][b"e"])

    async def text(self, message_id: UUID) -> str | None:
        if await self._local.exists(message_id):
            return await self._local.text(message_id)
        key = self._key(message_id)
        if not await self._redis().exists(key):
            return None
        parts = []
        for _, fields in await self._redis().xrange(key, min="-", max="+"):
            if b"e" in fields:
                event = _decode(fields[b"e"])
                if event.type == DELTA:
                    parts.append(event.data["text"])
                elif event.type == SNAPSHOT:
                    parts = [event.data["text"]]
        return "".join(parts)

    async def close_abandoned(self, message_id: UUID, type: str, data: dict) -> int | None:
        if await self._local.exists(message_id):
            seq = await self._local.close_abandoned(message_id, type, data)
            terminal = await self._local.tail(message_id)
            if seq is not None and terminal is not None and terminal.seq == seq:
                written = self._writer().add(message_id, self._key(message_id), terminal, expire=self.ttl)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(written), self.terminal_wait)
            return seq
        key = self._key(message_id)
        for _attempt in range(5):
            if not await self._redis().exists(key):
                return None
            last = await self.tail(message_id)
            if last is not None and last.is_terminal:
                return last.seq
            seq = last.seq + 1 if last else await self._first_seq(self._redis(), key)
            event = Event.create(seq, type, data, message_id)
            try:
                async with self._redis().pipeline(transaction=True) as pipe:
                    pipe.xadd(key, {"e": event.json}, id=_entry_id(event.seq), nomkstream=True)
                    pipe.expire(key, self.ttl)
                    await pipe.execute()
                return event.seq
            except aioredis.ResponseError:  # someone appended meanwhile: look again
                continue
        return None

    async def request_stop(self, message_id: UUID) -> bool:
        """Ask the process running this answer to stop it; True if some process listens."""
        return await self._redis().publish(STOP_CHANNEL, str(message_id)) > 0

    async def stop_requests(self) -> AsyncIterator[UUID]:
        """Message ids whose stop was requested anywhere in the cluster."""
        pubsub = self._redis().pubsub()
        await pubsub.subscribe(STOP_CHANNEL)
        try:
            async for message in pubsub.listen():
                if message.get("type") == "message":
                    yield UUID(message["data"].decode())
        finally:
            await pubsub.aclose()

    async def aclose(self) -> None:
        writer = self._writers.pop(asyncio.get_running_loop(), None)
        if writer is not None:
            await writer.drain()
        for client in self._clients.pop(asyncio.get_running_loop(), ()):
            await client.aclose()
            await client.connection_pool.disconnect()


class _Writer:
    """Copies appended events to Redis in order, one MULTI/EXEC per batch, one batch at a time.

    Nothing is dropped: a batch that fails stays queued and is retried (with back-off)
    until Redis takes it. A stream that Redis no longer has (restarted empty, flushed)
    is re-created from this process's copy of the log, so readers elsewhere never see a
    hole.
    """

    max_backoff = 2.0
    # This process's readers see an event once Redis has it, or after this long if Redis
    # is slow or down (then at once, until a write succeeds again): durability when Redis
    # is healthy, never a stall when it is not.
    visibility_wait = 0.1

    def __init__(self, redis, seed_events, reveal, *, ttl: int, max_age: int):
        self._redis = redis
        self._seed_events = seed_events
        self._reveal = reveal
        self.degraded = False
        self._ttl = ttl
        self._max_age = max_age
        self._pending: list[tuple[UUID, str, Event, int | None]] = []
        self._batch_done: asyncio.Future | None = None  # resolved when the pending batch is written
        self._task: asyncio.Task | None = None

    def add(self, message_id: UUID, key: str, event: Event, *, expire: int | None) -> asyncio.Future:
        """Queue an event; the returned future is done when it is in Redis."""
        self._pending.append((message_id, key, event, expire))
        if self._batch_done is None:
            self._batch_done = asyncio.get_running_loop().create_future()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="redis-event-writer")
        return self._batch_done

    async def drain(self) -> None:
        if self._task is not None:
            await asyncio.shield(self._task)

    async def _run(self) -> None:
        backoff = 0.1
        loop = asyncio.get_running_loop()
        while self._pending:
            await asyncio.sleep(0)  # let this loop iteration's other appends join the batch
            batch, self._pending = self._pending, []
            done, self._batch_done = self._batch_done, None
            slow = loop.call_later(self.visibility_wait, self._degrade, batch)
            try:
                await self._write(batch)
            except Exception:  # readers here are unaffected; keep the batch and try again
                slow.cancel()
                self._degrade(batch)
                logger.error("copying %d event(s) to Redis failed; retrying", len(batch), exc_info=True)
                self._pending[:0] = batch
                if self._batch_done is None:
                    self._batch_done = done
                else:  # later appends wait on the merged batch
                    self._batch_done.add_done_callback(lambda _, done=done: _settle(done))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff)
            else:
                slow.cancel()
                backoff = 0.1
                if self.degraded:
                    logger.warning("Redis takes the event logs again")
                self.degraded = False
                for message_id, _key, event, _expire in batch:
                    self._reveal(message_id, event.seq)
                _settle(done)

    def _degrade(self, batch) -> None:
        if not self.degraded:
            logger.warning("Redis is slow or down: readers here no longer wait for it")
        self.degraded = True
        for message_id, *_ in batch:
            self._reveal(message_id)

    async def _write(self, batch: list[tuple[UUID, str, Event, int | None]]) -> None:
        async with self._redis().pipeline(transaction=True) as pipe:
            for _, key, event, expire in batch:
                # NOMKSTREAM: a stream Redis lost is not silently started again mid-answer.
                pipe.xadd(key, {"e": event.json}, id=_entry_id(event.seq), nomkstream=True)
                if expire is not None:
                    pipe.expire(key, expire)
            results = await pipe.execute(raise_on_error=False)
        lost: dict[UUID, str] = {}
        index = 0
        for message_id, key, _event, expire in batch:
            result = results[index]
            index += 2 if expire is not None else 1
            if result is None:
                lost[message_id] = key
            elif isinstance(result, Exception) and not _is_duplicate(result):
                raise result
        for message_id, key in lost.items():
            await self._reseed(message_id, key)

    async def _reseed(self, message_id: UUID, key: str) -> None:
        events = self._seed_events(message_id)
        logger.warning("Redis lost the event log of %s; re-creating it (%d events)", message_id, len(events))
        async with self._redis().pipeline(transaction=True) as pipe:
            pipe.delete(key)
            pipe.xadd(key, _open_fields(events[0].seq if events else 1), id=OPEN_MARKER)
            for event in events:
                pipe.xadd(key, {"e": event.json}, id=_entry_id(event.seq))
            ended = bool(events) and events[-1].is_terminal
            pipe.expire(key, self._ttl if ended else self._max_age)
            await pipe.execute()


def _open_fields(first_seq: int) -> dict:
    return {"open": 1, "from": first_seq} if first_seq > 1 else {"open": 1}


def _is_duplicate(error: Exception) -> bool:
    # Re-seeding already wrote this entry (XADD refuses an id at or below the stream's top).
    return isinstance(error, aioredis.ResponseError) and "equal or smaller" in str(error)


def _settle(future: asyncio.Future | None) -> None:
    if future is not None and not future.done():
        future.set_result(None)


def _events_of(entries) -> list[Event]:
    """The events of XRANGE/XREAD entries (the open marker has none)."""
    return [_decode(fields[b"e"]) for _id, fields in entries if b"e" in fields]


def _decode(payload: bytes) -> Event:
    text = payload.decode()
    data = json.loads(text)
    kind, seq = data.pop("type"), data.pop("seq")
    data.pop("message_id", None)
    return Event(seq, kind, data, text)
