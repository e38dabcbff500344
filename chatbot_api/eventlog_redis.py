"""Event logs in Redis Streams, shared by every worker process of a cluster.

One stream per answer, `chatbot:events:<message_id>`. Entry ids encode the
sequence number (`1-<seq>`; `0-1` marks an opened, still empty log), so resuming
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
import json
import logging
import weakref
from collections.abc import AsyncIterator
from contextlib import aclosing
from uuid import UUID

import redis.asyncio as aioredis

from .eventlog import KEEPALIVE, EventLog, InMemoryEventLog, LogNotFound
from .events import Event

logger = logging.getLogger("chatbot.eventlog")

OPEN_MARKER = "0-1"
STOP_CHANNEL = "chatbot:stop"


def _entry_id(seq: int) -> str:
    return f"1-{seq}"


class RedisEventLog(EventLog):
    """`EventLog` on Redis Streams; see the module docstring for the layout."""

    prefix = "chatbot:events:"
    block_slice = 4.0  # seconds; below redis-py's default socket timeout of 5 s
    local_ttl = 30.0  # seconds this process's readers keep a finished answer's events in memory
    # Connections per process (a `max_connections` in the URL overrides both): commands are
    # short round trips, so they queue for a connection (up to `pool_wait` seconds) rather
    # than fail, as redis-py's default pool does beyond 100; readers from other processes
    # hold one each while they block, so they have a pool of their own.
    command_connections = 64
    reader_connections = 1024
    pool_wait = 30.0

    def __init__(self, *, url: str, ttl: float, max_age: float):
        self.url = url
        self.ttl = max(int(ttl), 1)
        self.max_age = max(int(max_age), self.ttl)
        # The events of this process's generations, numbered here (only this process appends).
        self._local = InMemoryEventLog(ttl=min(self.local_ttl, self.ttl))
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
                        self.url, max_connections=size, timeout=self.pool_wait
                    )
                )
                for size in (self.command_connections, self.reader_connections)
            )
        return clients[1] if reader else clients[0]

    def _key(self, message_id: UUID) -> str:
        return f"{self.prefix}{message_id}"

    async def open(self, message_id: UUID) -> None:
        key = self._key(message_id)
        async with self._redis().pipeline(transaction=True) as pipe:
            pipe.xadd(key, {"open": 1}, id=OPEN_MARKER)
            pipe.expire(key, self.max_age)
            await pipe.execute()
        await self._local.open(message_id)

    async def append(self, message_id: UUID, type: str, data: dict) -> Event:
        """Log in memory at once (this process's readers see it now), copy to Redis in batches.

        Every append waiting for its own XADD cost a round trip and a pooled connection per
        token; the writer sends whatever accumulated since its last write in one MULTI/EXEC.
        A terminal event returns once it is in Redis, so other processes see the end.
        """
        event = await self._local.append(message_id, type, data)  # LogNotFound unless opened here
        written = self._writer().add(
            self._key(message_id), event, expire=self.ttl if event.is_terminal else None
        )
        if event.is_terminal:
            await written
        return event

    def _writer(self) -> _Writer:
        loop = asyncio.get_running_loop()
        writer = self._writers.get(loop)
        if writer is None:
            writer = self._writers[loop] = _Writer(self._redis)
        return writer

    async def read(
        self, message_id: UUID, *, after: int = 0, keepalive: float | None = None
    ) -> AsyncIterator:
        if await self._local.exists(message_id):
            async with aclosing(self._local.read(message_id, after=after, keepalive=keepalive)) as events:
                async for event in events:
                    yield event
            return
        client = self._redis(reader=True)
        key = self._key(message_id)
        if not await client.exists(key):
            raise LogNotFound(message_id)
        last = _entry_id(after) if after > 0 else OPEN_MARKER
        entries = await client.xrange(key, min=f"({last}", max="+")
        # Block in slices shorter than the client's socket timeout (redis-py: 5 s), and send a
        # keep-alive only once `keepalive` seconds have passed without an event.
        wait = min(keepalive or self.block_slice, self.block_slice)
        clock = asyncio.get_running_loop().time
        quiet_since = clock()
        while True:
            for entry_id, fields in entries:
                last = entry_id
                payload = fields.get(b"e")
                if payload is None:  # the open marker
                    continue
                event = _decode(payload)
                yield event
                if event.is_terminal:
                    return
            response = await client.xread({key: last}, block=int(wait * 1000), count=256)
            entries = response[0][1] if response else []
            if entries or not keepalive:
                quiet_since = clock()
            elif clock() - quiet_since >= keepalive:
                quiet_since = clock()
                yield KEEPALIVE

    async def exists(self, message_id: UUID) -> bool:
        return bool(await self._redis().exists(self._key(message_id)))

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
    """Copies appended events to Redis in order, one MULTI/EXEC per batch, one batch at a time."""

    retries = 3

    def __init__(self, redis):
        self._redis = redis
        self._pending: list[tuple[str, Event, int | None]] = []
        self._batch_done: asyncio.Future | None = None  # resolved when the pending batch is written
        self._task: asyncio.Task | None = None

    def add(self, key: str, event: Event, *, expire: int | None) -> asyncio.Future:
        """Queue an event; the returned future is done when it is in Redis."""
        self._pending.append((key, event, expire))
        if self._batch_done is None:
            self._batch_done = asyncio.get_running_loop().create_future()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="redis-event-writer")
        return self._batch_done

    async def drain(self) -> None:
        if self._task is not None:
            await asyncio.shield(self._task)

    async def _run(self) -> None:
        while self._pending:
            await asyncio.sleep(0)  # let this loop iteration's other appends join the batch
            batch, self._pending = self._pending, []
            done, self._batch_done = self._batch_done, None
            try:
                await self._write(batch)
            except Exception as error:  # readers here are unaffected; other processes miss events
                logger.error("copying %d event(s) to Redis failed", len(batch), exc_info=True)
                if not done.done():
                    done.set_exception(error)
                    done.exception()  # retrieved: nobody may be waiting for non-terminal events
            else:
                if not done.done():
                    done.set_result(None)

    async def _write(self, batch: list[tuple[str, Event, int | None]]) -> None:
        for attempt in range(self.retries):
            try:
                async with self._redis().pipeline(transaction=True) as pipe:
                    for key, event, expire in batch:
                        pipe.xadd(key, {"e": event.json}, id=_entry_id(event.seq))
                        if expire is not None:
                            pipe.expire(key, expire)
                    await pipe.execute()
                return
            except (aioredis.ConnectionError, aioredis.TimeoutError):
                if attempt + 1 == self.retries:
                    raise
                await asyncio.sleep(0.1 * 2**attempt)


def _decode(payload: bytes) -> Event:
    text = payload.decode()
    data = json.loads(text)
    kind, seq = data.pop("type"), data.pop("seq")
    data.pop("message_id", None)
    return Event(seq, kind, data, text)
