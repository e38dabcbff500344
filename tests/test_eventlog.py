"""The EventLog contract, run against every backend: in-memory and Redis Streams (a real server)."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from chatbot_api.streaming.eventlog import KEEPALIVE, InMemoryEventLog, LogGap, LogNotFound
from chatbot_api.streaming.eventlog_redis import RedisEventLog

REDIS_URL = "redis://127.0.0.1:6379/15"


class OtherWorker:
    """Appends through one RedisEventLog (the generation's worker), reads through another."""

    def __init__(self, writer: RedisEventLog, reader: RedisEventLog):
        self.open, self.append = writer.open, writer.append
        self.read, self.exists = reader.read, reader.exists
        self.tail, self.text, self.close_abandoned = reader.tail, reader.text, reader.close_abandoned


async def redis_log(url: str = REDIS_URL) -> RedisEventLog:
    log = RedisEventLog(url=url, ttl=60, max_age=600)
    try:
        await log._redis().ping()
    except OSError:
        pytest.skip("Redis is not running on 127.0.0.1:6379")
    return log


@pytest.fixture(
    params=[
        "memory",
        pytest.param("redis", marks=pytest.mark.redis),  # readers in the generation's process
        pytest.param("redis-other-worker", marks=pytest.mark.redis),  # readers elsewhere: XREAD
    ]
)
async def log(request):
    if request.param == "memory":
        yield InMemoryEventLog(ttl=60)
        return
    logs = [await redis_log()]
    if request.param == "redis-other-worker":
        logs.append(await redis_log())
    yield OtherWorker(*logs) if len(logs) == 2 else logs[0]
    for each in logs:
        await each.aclose()


async def collect(iterator, *, stop_on_keepalive=False):
    items = []
    async for item in iterator:
        if item is KEEPALIVE:
            if stop_on_keepalive:
                break
            continue
        items.append(item)
    return items


async def test_sequence_numbers_replay_and_resume(log):
    message_id = uuid.uuid4()
    await log.open(message_id)
    for text in ["a", "b", "c"]:
        await log.append(message_id, "delta", {"text": text})
    await log.append(message_id, "done", {"status": "complete", "finish_reason": "stop"})

    everything = await collect(log.read(message_id))
    tail = await collect(log.read(message_id, after=2))

    assert [(e.seq, e.type) for e in everything] == [(1, "delta"), (2, "delta"), (3, "delta"), (4, "done")]
    assert [e.data.get("text") for e in everything[:3]] == ["a", "b", "c"]
    assert tail == everything[2:]
    assert everything[0].json == (f'{{"type":"delta","seq":1,"message_id":"{message_id}","text":"a"}}')


async def test_a_long_log_replays_every_event_exactly_as_it_was_appended(log):
    """Several of the memory log's text chunks, odd text (empty, non-ASCII, escapes) and
    other events among the deltas: a replay from any offset gives the appended JSON."""
    message_id = uuid.uuid4()
    await log.open(message_id)
    appended = [await log.append(message_id, "meta", {"model": "m"})]
    texts = ["", "é", "\n", '"q"', "日本", "🙂", "a\\b", "plain "]
    for n in range(200):
        appended.append(await log.append(message_id, "delta", {"text": texts[n % len(texts)] + str(n)}))
        if n == 150:
            appended.append(await log.append(message_id, "usage", {"prompt_tokens": 1}))
    appended.append(await log.append(message_id, "done", {"status": "complete", "finish_reason": "stop"}))
    await asyncio.sleep(0.05)  # the Redis writer's batch

    for after in (0, 1, 63, 64, 65, 130, 151, 152, 200, 201, 202):
        replayed = await collect(log.read(message_id, after=after))
        assert [(e.seq, e.type, e.data, e.json) for e in replayed] == [
            (e.seq, e.type, e.data, e.json) for e in appended[after:]
        ], after
    assert await log.text(message_id) == "".join(e.data["text"] for e in appended if e.type == "delta")
    assert (await log.tail(message_id)).json == appended[-1].json


async def test_readers_follow_live_appends_and_get_keepalives(log):
    message_id = uuid.uuid4()
    await log.open(message_id)
    reader = log.read(message_id, keepalive=0.05)
    first = await anext(reader)  # nothing yet: a keep-alive
    assert first is KEEPALIVE

    async def write():
        for text in ["x", "y"]:
            await asyncio.sleep(0.02)
            await log.append(message_id, "delta", {"text": text})
        await log.append(message_id, "error", {"code": "timeout_idle", "message": "m", "retryable": True})

    writer = asyncio.create_task(write())
    events = await asyncio.wait_for(collect(reader), 5)
    await writer
    assert [e.type for e in events] == ["delta", "delta", "error"]
    assert [e.seq for e in events] == [1, 2, 3]


async def test_unknown_log(log):
    assert not await log.exists(uuid.uuid4())
    with pytest.raises(LogNotFound):
        await collect(log.read(uuid.uuid4()))
    opened = uuid.uuid4()
    await log.open(opened)
    assert await log.exists(opened)


async def test_many_readers_get_the_same_events(log):
    message_id = uuid.uuid4()
    await log.open(message_id)
    readers = [asyncio.create_task(collect(log.read(message_id, keepalive=1))) for _ in range(5)]
    await asyncio.sleep(0.05)
    for n in range(20):
        await log.append(message_id, "delta", {"text": str(n)})
    await log.append(message_id, "done", {"status": "complete", "finish_reason": "stop"})
    results = await asyncio.wait_for(asyncio.gather(*readers), 5)
    assert all([e.seq for e in r] == list(range(1, 22)) for r in results)


@pytest.mark.redis
async def test_redis_reader_waits_past_the_client_socket_timeout(monkeypatch):
    """Blocking reads are sliced below redis-py's socket timeout; keep-alives still come on time."""
    log, other = await redis_log(), await redis_log()  # the reader is in another worker
    monkeypatch.setattr(RedisEventLog, "block_slice", 0.05)  # stands in for 4 s against a 5 s timeout
    message_id = uuid.uuid4()
    await log.open(message_id)

    async def write_late():
        await asyncio.sleep(0.45)
        await log.append(message_id, "done", {"status": "complete", "finish_reason": "stop"})

    writer = asyncio.create_task(write_late())
    items = [item async for item in other.read(message_id, keepalive=0.3)]
    await writer
    await log.aclose()
    await other.aclose()
    kinds = [getattr(item, "type", "keepalive") for item in items]
    assert kinds[-1] == "done" and set(kinds[:-1]) == {"keepalive"}, kinds


@pytest.mark.redis
async def test_redis_readers_in_the_generations_process_hold_no_connection():
    """More live readers than the connection pool holds: they follow the in-process copy."""
    log = await redis_log(REDIS_URL + "?max_connections=4")
    message_ids = [uuid.uuid4() for _ in range(10)]
    for message_id in message_ids:
        await log.open(message_id)
    readers = [
        asyncio.create_task(collect(log.read(message_id, keepalive=1)))
        for message_id in message_ids
        for _ in range(3)
    ]
    await asyncio.sleep(0.05)  # every reader is waiting for its first event
    for message_id in message_ids:
        for n in range(5):
            await log.append(message_id, "delta", {"text": str(n)})
        await log.append(message_id, "done", {"status": "complete", "finish_reason": "stop"})
    results = await asyncio.wait_for(asyncio.gather(*readers), 5)
    await log.aclose()
    assert all([e.seq for e in r] == list(range(1, 7)) for r in results)


@pytest.mark.redis
async def test_redis_copies_appends_in_batches_and_a_terminal_event_before_returning(monkeypatch):
    from chatbot_api.streaming import eventlog_redis

    batches = []
    write = eventlog_redis._Writer._write

    async def counting_write(self, batch):
        batches.append(len(batch))
        await write(self, batch)

    monkeypatch.setattr(eventlog_redis._Writer, "_write", counting_write)
    log, other = await redis_log(), await redis_log()
    message_ids = [uuid.uuid4() for _ in range(10)]
    for message_id in message_ids:
        await log.open(message_id)

    async def generate(message_id):  # ten generations appending at the same time
        for n in range(20):
            await log.append(message_id, "delta", {"text": str(n)})
            await asyncio.sleep(0)
        await log.append(message_id, "done", {"status": "complete", "finish_reason": "stop"})
        # Returned: the end is already in Redis for every other process.
        return await collect(other.read(message_id, keepalive=0.01), stop_on_keepalive=True)

    results = await asyncio.wait_for(asyncio.gather(*map(generate, message_ids)), 10)
    await log.aclose()
    await other.aclose()
    assert all([e.seq for e in events] == list(range(1, 22)) for events in results)
    assert sum(batches) == 210 and len(batches) < 210 / 5, (
        f"one round trip per batch, not per event: {batches}"
    )


async def test_a_reader_at_or_past_the_end_of_an_ended_log_returns_at_once(log):
    message_id = uuid.uuid4()
    await log.open(message_id)
    await log.append(message_id, "meta", {})
    await log.append(message_id, "done", {"status": "complete"})

    for after in (2, 3, 10**12):
        async with asyncio.timeout(2):
            assert await collect(log.read(message_id, after=after)) == []


async def test_tail_text_and_closing_an_abandoned_log(log):
    message_id = uuid.uuid4()
    await log.open(message_id)
    assert await log.tail(message_id) is None
    await log.append(message_id, "meta", {})
    for text in ("a", "b"):
        await log.append(message_id, "delta", {"text": text})
    await asyncio.sleep(0.05)  # the Redis writer's batch

    assert (await log.tail(message_id)).seq == 3 and await log.text(message_id) == "ab"
    assert await log.close_abandoned(message_id, "error", {"code": "interrupted"}) == 4
    assert await log.close_abandoned(message_id, "error", {"code": "interrupted"}) == 4, "only once"
    events = await collect(log.read(message_id))
    assert [e.type for e in events] == ["meta", "delta", "delta", "error"]
    assert await log.close_abandoned(uuid.uuid4(), "error", {}) is None


@pytest.mark.redis
async def test_a_redis_reader_never_skips_a_hole(monkeypatch):
    log = await redis_log()
    monkeypatch.setattr(RedisEventLog, "outage_wait", 0.6)
    message_id = uuid.uuid4()
    key = log._key(message_id)
    client = log._redis()
    await client.xadd(key, {"open": 1}, id="0-1")
    for seq in (1, 2, 5):  # 3 and 4 never made it
        await client.xadd(key, {"e": f'{{"type":"delta","seq":{seq},"text":"{seq}"}}'}, id=f"1-{seq}")

    seen = []
    with pytest.raises(LogGap):
        async for event in log.read(message_id):
            seen.append(event.seq)
    assert seen == [1, 2]
    await client.delete(key)
    await log.aclose()


@pytest.mark.redis
async def test_the_writer_recreates_a_stream_redis_lost_and_readers_elsewhere_see_no_hole():
    writer, reader = await redis_log(), await redis_log()
    message_id = uuid.uuid4()
    await writer.open(message_id)
    await writer.append(message_id, "meta", {})
    await writer.append(message_id, "delta", {"text": "a"})
    await asyncio.sleep(0.05)
    await writer._redis().delete(writer._key(message_id))  # as a Redis restarted empty

    await writer.append(message_id, "delta", {"text": "b"})
    await writer.append(message_id, "done", {"status": "complete"})

    events = await collect(reader.read(message_id))
    assert [(e.seq, e.type) for e in events] == [(1, "meta"), (2, "delta"), (3, "delta"), (4, "done")]
    for each in (writer, reader):
        await each.aclose()


async def test_a_continued_answers_log_numbers_on_and_readers_from_before_start_at_its_restatement(log):
    message_id = uuid.uuid4()
    await log.open(message_id)
    await log.append(message_id, "meta", {"message_id": str(message_id)})
    for text in ["cut ", "short"]:
        await log.append(message_id, "delta", {"text": text})
    await log.append(message_id, "done", {"status": "complete", "finish_reason": "length"})  # seq 4

    await log.open(message_id, first_seq=3)  # the generation restates meta and the text so far
    await log.append(message_id, "meta", {"message_id": str(message_id)})
    await log.append(message_id, "snapshot", {"text": "cut short"})
    from_start = asyncio.create_task(collect(log.read(message_id, keepalive=1)))
    from_old_end = asyncio.create_task(collect(log.read(message_id, after=4, keepalive=1)))
    await asyncio.sleep(0.05)
    await log.append(message_id, "delta", {"text": " and done"})
    terminal = await log.append(message_id, "done", {"status": "complete", "finish_reason": "stop"})

    everything, new_part = await asyncio.wait_for(asyncio.gather(from_start, from_old_end), 5)
    assert [(e.seq, e.type) for e in everything] == [(3, "meta"), (4, "snapshot"), (5, "delta"), (6, "done")]
    assert [(e.seq, e.type) for e in new_part] == [(5, "delta"), (6, "done")]
    assert terminal.seq == 6 and (await log.tail(message_id)).seq == 6
    assert await log.text(message_id) == "cut short and done"
    assert await log.close_abandoned(message_id, "error", {"code": "x", "message": "m"}) == 6


async def test_closing_an_abandoned_continued_log_numbers_its_end_after_the_old_one(log):
    message_id = uuid.uuid4()
    await log.open(message_id, first_seq=5)

    seq = await log.close_abandoned(message_id, "error", {"code": "interrupted", "message": "m"})

    assert seq == 5
    assert [e.seq for e in await collect(log.read(message_id, after=2))] == [5]
