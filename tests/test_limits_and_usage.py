"""Rate limits, token quotas, usage accounting (issue: users, rate limits, token quotas)."""

from __future__ import annotations

import asyncio

import pytest
from django.contrib.auth.models import User
from django.test import AsyncClient

from chatbot_api.limits import RateLimiter, rate_limiter
from chatbot_api.models import Conversation, Message, UsageRecord, UserQuota
from tests.support.clients import browser_session, post_chat, websocket
from tests.support.fake_openai import Script

pytestmark = [pytest.mark.django_db(transaction=True)]

DAY = 86400


@pytest.fixture
def clock(monkeypatch):
    """A pinned clock for the rate limiter: `clock.now += 60` instead of sleeping."""

    class Clock:
        now = 1_800_000_000.0 + 30  # 30 s into a minute

    monkeypatch.setattr(RateLimiter, "clock", staticmethod(lambda: Clock.now))
    return Clock


class ClientAt(AsyncClient):
    """A test client whose requests come from another IP address."""

    def __init__(self, ip: str, **kwargs):
        super().__init__(**kwargs)
        self.ip = ip

    def _base_scope(self, **request):
        return {**super()._base_scope(**request), "client": [self.ip, 40000]}


async def test_requests_per_minute(upstream, manager, chatbot_settings, clock):
    chatbot_settings(REQUESTS_PER_MINUTE=2)
    client = AsyncClient()
    assert (await post_chat(client)).status_code == 200
    assert (await post_chat(client)).status_code == 200

    refused = await post_chat(client)

    assert refused.status_code == 429
    assert refused["Retry-After"] == "30"
    body = refused.json()
    assert body["success"] is False and body["code"] == "rate_limited"
    assert (
        body["limit"] == "requests_per_minute" and body["retry_after"] == 30 and "2 a minute" in body["error"]
    )
    assert await Message.objects.acount() == 4, "nothing is half-started"
    assert len(upstream.history) == 2

    clock.now += 30
    assert (await post_chat(client)).status_code == 200


async def test_anonymous_limits_count_per_ip_not_per_session(upstream, manager, chatbot_settings, clock):
    chatbot_settings(REQUESTS_PER_MINUTE=1)
    assert (await post_chat(AsyncClient())).status_code == 200
    assert (await post_chat(AsyncClient())).status_code == 429, "a fresh cookie does not reset the limit"
    other_ip = ClientAt("10.0.0.9")
    assert (await post_chat(other_ip)).status_code == 200


async def test_concurrent_streams_under_real_parallel_streams(upstream, manager, chatbot_settings):
    chatbot_settings(CONCURRENT_STREAMS=2)
    upstream.enqueue(Script(chunks=["a", "b"], hang_after=1), Script(chunks=["c", "d"], hang_after=1))
    client = AsyncClient()
    running = [await post_chat(client, headers={"Accept": "text/event-stream"}) for _ in range(2)]
    await upstream.wait_for_request_async(2)

    refused = await post_chat(client, headers={"Accept": "text/event-stream"})

    assert refused.status_code == 429 and refused.json()["limit"] == "concurrent_streams"
    assert refused["Content-Type"] == "application/json"
    first = await anext(aiter(running[0].streaming_content))  # the preamble
    assert first.startswith(b"retry:")
    message_ids = [m.pk async for m in Message.objects.filter(role="assistant")]
    await client.post(f"/api/messages/{message_ids[0]}/stop")
    assert (await post_chat(client)).status_code == 200, "a finished answer frees its slot"
    await client.post(f"/api/messages/{message_ids[1]}/stop")


async def test_token_quota_counts_real_usage_and_resets_at_midnight(
    upstream, manager, chatbot_settings, clock
):
    chatbot_settings(TOKENS_PER_DAY=30)
    upstream.enqueue(Script(chunks=["x"], usage={"prompt_tokens": 20, "completion_tokens": 15}))
    client = AsyncClient()
    assert (await post_chat(client)).status_code == 200
    assert rate_limiter.tokens_used_today("ip:127.0.0.1") == 35

    refused = await post_chat(client)

    assert refused.status_code == 429 and refused.json()["limit"] == "tokens_per_day"
    assert int(refused["Retry-After"]) == DAY - int(clock.now) % DAY
    usage = (await client.get("/api/usage/")).json()
    assert usage["limits"]["tokens_used_today"] == 35 and usage["limits"]["tokens_per_day"] == 30

    clock.now += DAY
    assert (await post_chat(client)).status_code == 200


async def test_local_model_usage_is_counted(manager, chatbot_settings):
    chatbot_settings(PROVIDER="local", MAX_TOKENS=8, TEMPERATURE=0.0)
    client = AsyncClient()

    body = (await post_chat(client, "Say hello")).json()

    assert body["success"] is True and body["provider"] == "local"
    record = await UsageRecord.objects.aget(message_id=body["message_id"])
    assert record.prompt_tokens > 5 and 0 < record.completion_tokens <= 8 and record.estimated is False
    assert body["usage"] == {
        "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.completion_tokens,
        "estimated": False,
    }
    assert rate_limiter.tokens_used_today("ip:127.0.0.1") == record.total_tokens


async def test_usage_endpoint_per_day_and_model(upstream, manager):
    client = AsyncClient()
    for _ in range(2):
        upstream.enqueue(Script(chunks=["x"], usage={"prompt_tokens": 10, "completion_tokens": 3}))
        await post_chat(client)
    upstream.enqueue(Script(chunks=["y"], send_usage=False))
    await post_chat(client)
    await post_chat(ClientAt("10.1.1.1"))  # someone else

    usage = (await client.get("/api/usage/")).json()

    assert usage["today"]["answers"] == 3 and usage["today"]["prompt_tokens"] >= 20
    [day] = usage["days"]
    assert (day["model"], day["provider"], day["answers"], day["estimated_answers"]) == (
        "gpt-4.1-nano",
        "openai",
        3,
        1,
    )


async def test_usage_record_survives_deleting_the_conversation(upstream, manager):
    client = AsyncClient()
    body = (await post_chat(client)).json()
    assert (await client.delete(f"/api/conversations/{body['session_id']}")).status_code == 204
    assert await Conversation.objects.acount() == 0
    record = await UsageRecord.objects.aget()
    assert record.message_id is None and record.outcome == "complete"


async def test_staff_override_per_user(upstream, manager, chatbot_settings, clock):
    chatbot_settings(REQUESTS_PER_MINUTE=5)
    alice = await User.objects.acreate_user("alice", password="pw-alice-123")
    await UserQuota.objects.acreate(user=alice, requests_per_minute=1)
    client = AsyncClient()
    await client.aforce_login(alice)

    assert (await post_chat(client)).status_code == 200
    assert (await post_chat(client)).status_code == 429


async def test_websocket_rate_limited_error_frame(upstream, manager, chatbot_settings, clock):
    chatbot_settings(REQUESTS_PER_MINUTE=1)
    ws = await websocket(session_key=await browser_session())
    await ws.send_json_to({"type": "chat", "message": "one"})
    while (await ws.receive_json_from(timeout=5))["type"] not in ("done", "error"):
        pass

    await ws.send_json_to({"type": "chat", "message": "two"})
    error = await ws.receive_json_from(timeout=5)

    assert error["type"] == "error" and error["code"] == "rate_limited"
    assert (
        error["limit"] == "requests_per_minute" and error["retry_after"] >= 1 and error["retryable"] is True
    )
    await ws.disconnect()


async def test_stream_slot_is_released_on_every_outcome(upstream, manager, chatbot_settings):
    chatbot_settings(CONCURRENT_STREAMS=1, IDLE_TIMEOUT=0.1)
    client = AsyncClient()
    for script in [Script(status=500), Script(chunks=["a", "b"], hang_after=1), Script(chunks=["ok"])]:
        upstream.enqueue(script)
        response = await post_chat(client)
        assert response.status_code != 429
    await asyncio.sleep(0)
    assert (await post_chat(client)).status_code == 200


# The outcome's own write (`AnswerStore.save_outcome`): its SQL is built from the models'
# fields, so these run it against the real database and read the rows back.


async def _streaming_answer() -> Message:
    conversation = await Conversation.objects.acreate(title="t")
    return await Message.objects.acreate(
        conversation=conversation, role="assistant", status="streaming", client_key=CLIENT_KEY
    )


def _outcome_fields(**overrides) -> dict:
    from django.utils import timezone

    return {
        "content": "Hello, wörld 🙂",
        "status": "complete",
        "finish_reason": "stop",
        "prompt_tokens": 12,
        "completion_tokens": 3,
        "tokens_estimated": False,
        "heartbeat_at": timezone.now(),
        "holds_slot": False,
        "last_seq": 5,
        **overrides,
    }


def _record(message_id, **overrides) -> UsageRecord:
    fields = {
        "message_id": message_id, "part": 0, "client_key": CLIENT_KEY, "provider": "openai",
        "model": "m", "prompt_tokens": 12, "completion_tokens": 3, "ttft_ms": 1.5, "duration_ms": 20.0,
        "outcome": "complete",
    }  # fmt: skip
    return UsageRecord(**fields | overrides)


CLIENT_KEY = "ip:127.0.0.9"


async def save_outcome(message: Message, record: UsageRecord | None = None) -> bool:
    """What a generation's end writes, through its own store (its database thread)."""
    from chatbot_api.streaming.store import AnswerStore

    store = AnswerStore()
    try:
        return await store.save_outcome(message.id, _outcome_fields(), record or _record(message.id))
    finally:
        await store.close()


async def test_outcome_saved_with_its_usage_record():
    message = await _streaming_answer()
    assert await save_outcome(message) is True
    await message.arefresh_from_db()
    assert (message.status, message.content, message.finish_reason, message.last_seq) == (
        "complete", "Hello, wörld 🙂", "stop", 5,
    )  # fmt: skip
    assert (message.prompt_tokens, message.completion_tokens, message.holds_slot) == (12, 3, False)
    record = await UsageRecord.objects.aget()
    assert (record.message_id, record.part, record.client_key, record.ttft_ms, record.outcome) == (
        message.id, 0, CLIENT_KEY, 1.5, "complete",
    )  # fmt: skip
    assert record.created_at is not None


async def test_outcome_keeps_the_usage_record_the_sweep_wrote_first():
    message = await _streaming_answer()
    await UsageRecord.objects.acreate(
        message_id=message.id, part=0, client_key=CLIENT_KEY, provider="openai", model="m",
        completion_tokens=2, estimated=True, outcome="interrupted",
    )  # fmt: skip
    assert await save_outcome(message) is True
    await message.arefresh_from_db()
    assert message.status == "complete", "the outcome is still saved"
    record = await UsageRecord.objects.aget()
    assert (record.outcome, record.completion_tokens) == ("interrupted", 2), "one record per part: the first"


async def test_outcome_of_a_deleted_answer_still_charges_its_usage():
    message = await _streaming_answer()
    await Conversation.objects.all().adelete()
    assert await save_outcome(message) is True
    record = await UsageRecord.objects.aget()
    assert record.message_id is None and record.completion_tokens == 3


async def test_outcome_the_database_refuses_is_not_ignored():
    """Only the duplicate is ignored: a value the database refuses fails the save, which says so."""
    message = await _streaming_answer()
    saved = await save_outcome(message, _record(message.id, completion_tokens=-1))
    assert saved is False
    assert await UsageRecord.objects.acount() == 0
    await message.arefresh_from_db()
    assert (message.status, message.error_code, message.content) == (
        "failed",
        "save_failed",
        "Hello, wörld 🙂",
    )
