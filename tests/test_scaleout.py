"""Several workers sharing Redis: any worker resumes or stops an answer another one generates."""

from __future__ import annotations

import pytest
from django.test import AsyncClient

from chatbot_api.models import Message
from chatbot_api.streaming import manager as generation
from chatbot_api.streaming.eventlog_redis import RedisEventLog
from chatbot_api.streaming.manager import GenerationManager
from tests.support.clients import wait_for_status
from tests.support.fake_openai import Script
from tests.support.sse import parse_sse

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.redis]

REDIS_URL = "redis://127.0.0.1:6379/15"


@pytest.fixture
async def two_workers(settings, chatbot_settings, upstream):
    """Worker A (the process's manager) and worker B, both on the Redis event log."""
    settings.REDIS_URL = REDIS_URL
    chatbot_settings(EVENT_LOG="redis")
    generation.reset_manager()
    worker_a = generation.get_manager()
    try:
        await worker_a.log._redis().ping()
    except OSError:
        pytest.skip("Redis is not running on 127.0.0.1:6379")
    worker_b = GenerationManager(RedisEventLog(url=REDIS_URL, ttl=60, max_age=600))
    yield worker_a, worker_b
    for worker in (worker_a, worker_b):
        await worker.shutdown(grace=1)


def as_worker(manager: GenerationManager) -> None:
    """Route the next requests to `manager`, as a load balancer would to another process."""
    generation._manager = manager
    manager.ensure_housekeeping()


async def start_answer(client: AsyncClient, count: int) -> list[dict]:
    response = await client.post(
        "/api/chat/",
        {"message": "Hi"},
        content_type="application/json",
        headers={"Accept": "text/event-stream"},
    )
    stream = aiter(response.streaming_content)
    frames = []
    while len(frames) < count:
        frames += parse_sse(await anext(stream))
    await stream.aclose()
    return frames


async def test_another_worker_resumes_the_answer(two_workers, upstream):
    worker_a, worker_b = two_workers
    upstream.enqueue(Script(chunks=[f"{n} " for n in range(10)], interval=0.03))
    client = AsyncClient()
    as_worker(worker_a)
    head = await start_answer(client, 3)
    message_id = head[0]["data"]["message_id"]

    as_worker(worker_b)
    response = await client.get(
        f"/api/messages/{message_id}/events", headers={"Last-Event-ID": head[-1]["id"]}
    )
    rest = parse_sse(b"".join([chunk async for chunk in response.streaming_content]))

    frames = head + rest
    assert [int(f["id"]) for f in frames] == list(range(1, len(frames) + 1))
    assert worker_a.is_running(message_id) or not worker_b.is_running(message_id)
    message = await wait_for_status(message_id, {"complete"})
    assert "".join(f["data"]["text"] for f in frames if f["event"] == "delta") == message.content


async def test_another_worker_stops_the_answer(two_workers, upstream):
    worker_a, worker_b = two_workers
    upstream.enqueue(Script(chunks=["a", "b", "c"], hang_after=1))
    client = AsyncClient()
    as_worker(worker_a)
    head = await start_answer(client, 2)
    message_id = head[0]["data"]["message_id"]

    as_worker(worker_b)
    stop = await client.post(f"/api/messages/{message_id}/stop")

    assert stop.json()["status"] == "stopped" and stop.json()["response"] == "a"
    assert (await upstream.wait_for_disconnect_async()).disconnected
    assert (await Message.objects.aget(pk=message_id)).status == "stopped"
