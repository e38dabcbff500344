"""Real-time transports through the ASGI app: SSE, NDJSON, resume, stop, timeouts, orphans."""

from __future__ import annotations

import asyncio
import json
import socket
import statistics
import time
from datetime import timedelta

import pytest
from django.test import AsyncClient
from django.utils import timezone

from chatbot_api.models import Conversation, Message
from chatbot_api.streaming.manager import sweep_orphans
from chatbot_api.streaming.store import _write_partials
from tests.support.clients import start_sse, wait_for_status
from tests.support.fake_openai import Script
from tests.support.sse import parse_sse, read_frames, text_of

pytestmark = [pytest.mark.django_db(transaction=True)]

SSE = {"headers": {"Accept": "text/event-stream"}}


async def test_sse_frames_arrive_one_by_one_before_upstream_finishes(upstream, manager):
    upstream.enqueue(Script(chunks=[f"t{i} " for i in range(6)], interval=0.08))
    response = await start_sse(AsyncClient(), {"message": "Hi", "streaming": True})

    frames = await read_frames(response)

    kinds = [f["event"] for _, f in frames]
    assert kinds == ["meta", *["delta"] * 6, "usage", "done"]
    assert [int(f["id"]) for _, f in frames] == list(range(1, 10))
    assert all(f["data"]["seq"] == int(f["id"]) for _, f in frames)
    assert text_of(frames) == "t0 t1 t2 t3 t4 t5 "
    upstream_request = upstream.history[-1]
    first_delta_at = next(t for t, f in frames if f["event"] == "delta")
    assert first_delta_at < upstream_request.closed_at - 0.2, (
        "the first token must arrive while upstream streams"
    )
    delta_times = [t for t, f in frames if f["event"] == "delta"]
    gaps = [b - a for a, b in zip(delta_times, delta_times[1:], strict=False)]
    # Relayed as produced, not batched (the median copes with a busy machine delaying one frame).
    assert statistics.median(gaps) > 0.04, gaps
    assert frames[-1][1]["data"] == {
        "type": "done",
        "seq": 9,
        "message_id": frames[0][1]["data"]["message_id"],
        "status": "complete",
        "finish_reason": "stop",
    }
    meta = frames[0][1]["data"]
    assert meta["model"] == "gpt-4.1-nano" and meta["provider"] == "openai"
    message = await wait_for_status(meta["message_id"], {"complete"})
    assert message.content == text_of(frames)


async def test_sse_headers(upstream, manager):
    response = await start_sse(AsyncClient(), {"message": "Hi"})
    await read_frames(response)
    assert response["Cache-Control"] == "no-cache"
    assert response["X-Accel-Buffering"] == "no"
    assert not response.has_header("Content-Encoding")


async def test_ndjson_is_the_same_event_stream(upstream, manager):
    upstream.enqueue(Script(chunks=["a", "b"]))
    response = await AsyncClient().post(
        "/api/chat/",
        {"message": "Hi"},
        content_type="application/json",
        headers={"Accept": "application/x-ndjson"},
    )
    assert response["Content-Type"] == "application/x-ndjson"
    raw = b"".join([chunk async for chunk in response.streaming_content])
    events = [json.loads(line) for line in raw.decode().splitlines() if line]
    assert [e["type"] for e in events] == ["meta", "delta", "delta", "usage", "done"]
    assert [e["seq"] for e in events] == [1, 2, 3, 4, 5]


async def test_keepalive_comment_while_waiting(upstream, manager, chatbot_settings):
    chatbot_settings(KEEPALIVE_INTERVAL=0.05)
    upstream.enqueue(Script(chunks=["late"], first_delay=0.3))
    response = await start_sse(AsyncClient(), {"message": "Hi"})
    raw = b"".join([chunk async for chunk in response.streaming_content])
    assert b": keep-alive\n\n" in raw
    assert [f["event"] for f in parse_sse(raw)] == ["meta", "delta", "usage", "done"]


async def test_disconnect_then_resume_gives_exactly_the_missing_events(upstream, manager):
    upstream.enqueue(Script(chunks=[f"w{i} " for i in range(12)], interval=0.03))
    client = AsyncClient()
    response = await start_sse(client, {"message": "Hi"})
    first = await read_frames(response, limit=5)  # the client goes away mid-answer
    message_id = first[0][1]["data"]["message_id"]
    last_seen = int(first[-1][1]["id"])

    resumed = await client.get(
        f"/api/messages/{message_id}/events", headers={"Last-Event-ID": str(last_seen)}
    )
    rest = await read_frames(resumed)

    seqs = [int(f["id"]) for _, f in first + rest]
    assert seqs == list(range(1, len(seqs) + 1)), "no duplicate and no missing sequence number"
    message = await wait_for_status(message_id, {"complete"})
    assert text_of(first + rest) == message.content == "".join(f"w{i} " for i in range(12))


async def test_resume_with_after_and_replay_after_the_end(upstream, manager):
    upstream.enqueue(Script(chunks=["x", "y", "z"]))
    client = AsyncClient()
    frames = await read_frames(await start_sse(client, {"message": "Hi"}))
    message_id = frames[0][1]["data"]["message_id"]

    replay = await read_frames(await client.get(f"/api/messages/{message_id}/events"))
    tail = await read_frames(await client.get(f"/api/messages/{message_id}/events?after=3"))

    assert [f["data"] for _, f in replay] == [f["data"] for _, f in frames]
    assert [f["data"] for _, f in tail] == [f["data"] for _, f in frames[3:]]


async def test_disconnect_does_not_stop_the_answer_by_default(upstream, manager):
    upstream.enqueue(Script(chunks=["a", "b", "c", "d"], interval=0.05))
    response = await start_sse(AsyncClient(), {"message": "Hi"})
    frames = await read_frames(response, limit=2)

    message = await wait_for_status(frames[0][1]["data"]["message_id"], {"complete"})

    assert message.status == "complete" and message.content == "abcd"


async def test_stop_cancels_upstream_and_keeps_the_partial_text(upstream, manager):
    upstream.enqueue(Script(chunks=["one ", "two ", "three"], hang_after=2))
    client = AsyncClient()
    response = await start_sse(client, {"message": "Hi"})
    frames = await read_frames(response, limit=3)
    message_id = frames[0][1]["data"]["message_id"]
    reader = asyncio.create_task(read_frames(response))

    stopped_at = time.monotonic()
    stop = await client.post(f"/api/messages/{message_id}/stop")

    assert stop.status_code == 200
    assert stop.json() == {
        "success": True,
        "message_id": message_id,
        "status": "stopped",
        "response": "one two ",
    }
    upstream_request = await upstream.wait_for_disconnect_async(timeout=2)
    assert upstream_request.disconnected and upstream_request.closed_at - stopped_at < 1.0
    rest = await asyncio.wait_for(reader, 2)
    assert rest[-1][1]["event"] == "done" and rest[-1][1]["data"]["status"] == "stopped"
    message = await Message.objects.aget(pk=message_id)
    assert (message.status, message.content, message.finish_reason) == ("stopped", "one two ", "stopped")
    again = await client.post(f"/api/messages/{message_id}/stop")
    assert again.json()["status"] == "stopped", "stop is idempotent"


async def test_stop_of_a_finished_answer_changes_nothing(upstream, manager):
    client = AsyncClient()
    body = (await client.post("/api/chat/", {"message": "Hi"}, content_type="application/json")).json()
    stop = await client.post(f"/api/messages/{body['message_id']}/stop")
    assert stop.json()["status"] == "complete" and stop.json()["response"] == "Hello world!"


@pytest.mark.parametrize(
    ("limits", "script", "limit", "partial"),
    [
        ({"FIRST_TOKEN_TIMEOUT": 0.2}, Script(chunks=["late"], first_delay=1.0), "first_token", ""),
        ({"IDLE_TIMEOUT": 0.2}, Script(chunks=["a", "b", "c"], hang_after=2), "idle", "ab"),
        ({"TOTAL_TIMEOUT": 0.5}, Script(chunks=["x"] * 100, interval=0.05), "total", None),
    ],
)
async def test_each_timeout_ends_the_answer_with_its_error(
    upstream, manager, chatbot_settings, limits, script, limit, partial
):
    chatbot_settings(**limits)
    upstream.enqueue(script)

    frames = await read_frames(await start_sse(AsyncClient(), {"message": "Hi"}))

    terminal = frames[-1][1]
    assert terminal["event"] == "error"
    assert terminal["data"]["code"] == f"timeout_{limit}"
    assert limit.replace("_", " ") in terminal["data"]["message"]
    message = await Message.objects.aget(pk=terminal["data"]["message_id"])
    assert message.status == "failed" and message.error_code == f"timeout_{limit}"
    assert message.content == text_of(frames)
    if partial is not None:
        assert message.content == partial
    else:
        assert 3 <= len(message.content) < 100


async def test_connect_timeout(upstream, manager, chatbot_settings, settings):
    # A listening socket whose accept queue is full: the kernel drops further SYNs, so connect hangs.
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(0)
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(blackhole.getsockname())
        fillers.append(filler)
    try:
        settings.OPENAI_BASE_URL = f"http://127.0.0.1:{blackhole.getsockname()[1]}/v1"
        chatbot_settings(CONNECT_TIMEOUT=0.3)
        frames = await read_frames(await start_sse(AsyncClient(), {"message": "Hi"}))
    finally:
        for s in [*fillers, blackhole]:
            s.close()
    assert frames[-1][1]["data"]["code"] == "timeout_connect"


async def test_upstream_failure_mid_stream_gives_error_event_and_failed_message(upstream, manager):
    upstream.enqueue(Script(chunks=["par", "tial", "never"], drop_after=2))

    frames = await read_frames(await start_sse(AsyncClient(), {"message": "Hi"}))

    assert [f["event"] for _, f in frames] == ["meta", "delta", "delta", "usage", "error"]
    error = frames[-1][1]["data"]
    assert error["code"] == "upstream_unavailable" and error["retryable"] is True
    message = await Message.objects.aget(pk=error["message_id"])
    assert (message.status, message.content) == ("failed", "partial")


async def test_partial_text_is_flushed_in_batches_not_per_token(upstream, manager, chatbot_settings):
    chatbot_settings(FLUSH_INTERVAL=0.1)
    upstream.enqueue(Script(chunks=["x"] * 300))
    fast = await read_frames(await start_sse(AsyncClient(), {"message": "Hi"}))
    fast_flushes = manager.store.flush_count

    upstream.enqueue(Script(chunks=["y"] * 10, interval=0.06))
    client = AsyncClient()
    response = await start_sse(client, {"message": "Hi"})
    frames = await read_frames(response, limit=5)
    await asyncio.sleep(0.15)
    partial = await Message.objects.aget(pk=frames[0][1]["data"]["message_id"])
    await read_frames(await client.get(f"/api/messages/{partial.id}/events?after=5"))
    slow_flushes = manager.store.flush_count - fast_flushes

    assert len(text_of(fast)) == 300 and fast_flushes <= 2, "300 tokens at once: one or two writes, not 300"
    assert 3 <= slow_flushes <= 8, "a 0.6 s answer flushed about every 0.1 s"
    assert partial.status == "streaming" and 1 <= len(partial.content) < 10, (
        "partial text reaches the database"
    )
    final = await wait_for_status(partial.id, ("complete",))
    assert final.content == "y" * 10, "the tokens after each flush are all in the saved answer"


def test_batched_flush_writes_live_answers_and_never_a_finished_one():
    conversation = Conversation.objects.create(session_key="s" * 32)
    live = [
        Message.objects.create(conversation=conversation, role="assistant", status=s)
        for s in ("pending", "streaming")
    ]
    done = Message.objects.create(
        conversation=conversation, role="assistant", status="complete", content="final"
    )
    before = timezone.now()

    _write_partials({live[0].id: "it's ", live[1].id: "half \u00e8 %s", done.id: "late"})

    for message in live:
        message.refresh_from_db()
        assert message.status == "streaming" and message.heartbeat_at >= before
    assert [m.content for m in live] == ["it's ", "half \u00e8 %s"], "quotes and placeholders are data"
    done.refresh_from_db()
    assert (done.status, done.content) == ("complete", "final"), "a late flush never overwrites an outcome"


async def test_orphan_sweep_marks_interrupted_and_keeps_text(manager):
    conversation = await Conversation.objects.acreate(session_key="s" * 32)
    stale = await Message.objects.acreate(
        conversation=conversation,
        role="assistant",
        status="streaming",
        content="half an ans",
        heartbeat_at=timezone.now() - timedelta(minutes=5),
    )
    fresh = await Message.objects.acreate(
        conversation=conversation, role="assistant", status="streaming", heartbeat_at=timezone.now()
    )

    assert await sweep_orphans(older_than=30) == 1

    await stale.arefresh_from_db()
    await fresh.arefresh_from_db()
    assert (stale.status, stale.content, stale.error_code) == ("interrupted", "half an ans", "interrupted")
    assert fresh.status == "streaming"


async def test_events_of_an_interrupted_answer_end_with_an_error(manager):
    client = AsyncClient()
    await client.get("/")
    session_key = client.cookies["sessionid"].value
    conversation = await Conversation.objects.acreate(session_key=session_key)
    message = await Message.objects.acreate(
        conversation=conversation,
        role="assistant",
        status="interrupted",
        content="cut",
        error_code="interrupted",
        error_message="The server stopped.",
    )

    url = f"/api/messages/{message.id}/events"
    resumed = await read_frames(await client.get(f"{url}?after=7"))  # its log and numbering are gone
    fresh = await read_frames(await client.get(url))
    past_the_end = await client.get(f"{url}?after={resumed[-1][1]['id']}")

    # A reader that had part of the lost log gets the whole text and the end, after what it had.
    assert [(f["event"], int(f["id"])) for _, f in resumed] == [("snapshot", 8), ("error", 9)]
    assert resumed[0][1]["data"]["text"] == "cut" and resumed[-1][1]["data"]["code"] == "interrupted"
    # That numbering is kept: a fresh replay ends at the same seq, and past it there is nothing.
    assert [(f["event"], int(f["id"])) for _, f in fresh] == [("meta", 1), ("delta", 8), ("error", 9)]
    assert past_the_end.status_code == 204


async def test_a_resume_of_a_saved_answer_keeps_the_log_numbering(manager):
    client = AsyncClient()
    await client.get("/")
    conversation = await Conversation.objects.acreate(session_key=client.cookies["sessionid"].value)
    message = await Message.objects.acreate(
        conversation=conversation,
        role="assistant",
        status="complete",
        content="whole answer",
        finish_reason="stop",
        prompt_tokens=3,
        completion_tokens=2,
        last_seq=9,
    )
    url = f"/api/messages/{message.id}/events"

    fresh = await read_frames(await client.get(url))
    resumed = await read_frames(await client.get(url, headers={"Last-Event-ID": "4"}))

    assert [(f["event"], int(f["id"])) for _, f in fresh] == [
        ("meta", 1),
        ("delta", 7),
        ("usage", 8),
        ("done", 9),
    ]
    # A client that had part of the text gets all of it once, as a snapshot that replaces its own.
    assert [(f["event"], int(f["id"])) for _, f in resumed] == [("snapshot", 7), ("usage", 8), ("done", 9)]
    assert resumed[0][1]["data"]["text"] == "whole answer"
    for after in ("9", "10", "99999999999999999999"):
        assert (await client.get(url, headers={"Last-Event-ID": after})).status_code == 204


async def test_shutdown_saves_running_answers_as_interrupted(upstream, manager):
    upstream.enqueue(Script(chunks=["a", "b", "c"], hang_after=1))
    response = await start_sse(AsyncClient(), {"message": "Hi"})
    frames = await read_frames(response, limit=2)

    await manager.shutdown(grace=0)

    message = await Message.objects.aget(pk=frames[0][1]["data"]["message_id"])
    assert (message.status, message.content, message.error_code) == ("interrupted", "a", "interrupted")


async def test_another_session_cannot_read_resume_or_stop(upstream, manager):
    upstream.enqueue(Script(chunks=["secret"], hang_after=1))
    owner = AsyncClient()
    frames = await read_frames(await start_sse(owner, {"message": "Hi"}), limit=2)
    message_id = frames[0][1]["data"]["message_id"]
    stranger = AsyncClient()
    await stranger.get("/")

    for response in [
        await stranger.get(f"/api/messages/{message_id}/events"),
        await stranger.get(f"/api/messages/{message_id}/events?after=1"),
        await stranger.get(f"/api/messages/{message_id}"),
        await stranger.post(f"/api/messages/{message_id}/stop"),
        await stranger.get(f"/api/conversations/{frames[0][1]['data']['session_id']}"),
    ]:
        assert response.status_code == 404
        assert response.json()["success"] is False
    assert (await Message.objects.aget(pk=message_id)).status in ("pending", "streaming")
    await owner.post(f"/api/messages/{message_id}/stop")


async def test_bad_resume_offset_is_a_clear_error(upstream, manager):
    client = AsyncClient()
    body = (await client.post("/api/chat/", {"message": "Hi"}, content_type="application/json")).json()
    response = await client.get(f"/api/messages/{body['message_id']}/events?after=-3", headers=SSE["headers"])
    assert response.status_code == 400
    assert response["Content-Type"] == "application/json" and response.json()["code"] == "invalid"
