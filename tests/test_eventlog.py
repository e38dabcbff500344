"""The EventLog contract, run against every backend: in-memory and Redis Streams (a real server)."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from chatbot_api.eventlog import KEEPALIVE, InMemoryEventLog, LogNotFound
from chatbot_api.eventlog_redis import RedisEventLog

REDIS_URL = "redis://127.0.0.1:6379/15"


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def log(request):
    if request.param == "memory":
        yield InMemoryEventLog(ttl=60)
        return
    log = RedisEventLog(url=REDIS_URL, ttl=60, max_age=600)
    try:
        await log._redis().ping()
    except OSError:
        pytest.skip("Redis is not running on 127.0.0.1:6379")
    yield log
    await log.aclose()


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
    log = RedisEventLog(url=REDIS_URL, ttl=60, max_age=600)
    try:
        await log._redis().ping()
    except OSError:
        pytest.skip("Redis is not running on 127.0.0.1:6379")
    monkeypatch.setattr(RedisEventLog, "block_slice", 0.05)  # stands in for 4 s against a 5 s timeout
    message_id = uuid.uuid4()
    await log.open(message_id)

    async def write_late():
        await asyncio.sleep(0.45)
        await log.append(message_id, "done", {"status": "complete", "finish_reason": "stop"})

    writer = asyncio.create_task(write_late())
    items = [item async for item in log.read(message_id, keepalive=0.3)]
    await writer
    await log.aclose()
    kinds = [getattr(item, "type", "keepalive") for item in items]
    assert kinds[-1] == "done" and set(kinds[:-1]) == {"keepalive"}, kinds
