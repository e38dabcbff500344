"""The fault suite, in one process: a misbehaving upstream, hostile input, races, resumes past the end.

Each fault is caused for real (a fake upstream that sends the bad bytes, a database trigger
that refuses the save, concurrent requests) and each test checks the three promises of
`tests.support.invariants`. The faults that need several processes or a Redis server to
kill live in `test_faults_cluster.py`.
"""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from asgiref.sync import sync_to_async
from django.db import connection
from django.test import AsyncClient

from chatbot_api.limits import rate_limiter
from chatbot_api.models import Conversation, Message, UsageRecord
from tests.support.clients import browser_session, receive_until_terminal, start_sse, websocket
from tests.support.fake_openai import Script, chunk_frame
from tests.support.invariants import (
    assert_no_leaked_slot,
    assert_one_terminal,
    assert_seqs_unbroken,
    assert_stored_covers,
    final_message,
    seen_text,
)
from tests.support.servers import answer_admission, closed_port
from tests.support.sse import frames_in, read_frames

pytestmark = [pytest.mark.django_db(transaction=True)]

CLIENT_KEY = "ip:127.0.0.1"  # Django's test client


def events_of(frames) -> list[dict]:
    return [frame["data"] for _, frame in frames]


async def slots() -> int:
    return await sync_to_async(rate_limiter.streams_in_use)(CLIENT_KEY)


async def answer_over_sse(client: AsyncClient | None = None, body: dict | None = None) -> list[dict]:
    response = await start_sse(client or AsyncClient(), body or {"message": "Hi"})
    return events_of(await read_frames(response))


async def check_invariants(events: list[dict]) -> Message:
    """One terminal event, the stored text covers what was seen, no slot held; returns the message."""
    terminal = assert_one_terminal(events)
    assert_seqs_unbroken(events)
    message = await final_message(events[0]["message_id"])
    assert terminal["status"] == message.status, "the terminal event says how the answer ended"
    assert_stored_covers(message, seen_text(events))
    await assert_no_leaked_slot(slots)
    return message


# --- The upstream misbehaves ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("script", "status", "code", "text"),
    [
        pytest.param(Script(status=500), "failed", "upstream_error", "", id="http-500"),
        pytest.param(Script(status=429), "failed", "upstream_rate_limited", "", id="http-429"),
        pytest.param(Script(status=401), "failed", "upstream_auth", "", id="http-401"),
        pytest.param(
            Script(chunks=["a", "b", "c"], malformed_after=2),
            "failed",
            "upstream_protocol",
            "ab",
            id="bad-json",
        ),
        pytest.param(
            Script(chunks=["a", "b", "c"], drop_after=2),
            "failed",
            "upstream_unavailable",
            "ab",
            id="cut-body",
        ),
        pytest.param(
            Script(chunks=["a", "b"], raw_frames=[b'data: {"choices": [{"index": 0, "delta": {"con']),
            "failed",
            "upstream_protocol",
            "ab",
            id="cut-mid-frame",
        ),
        pytest.param(
            Script(chunks=["a"], raw_frames=[chunk_frame(content=123)]),
            "failed",
            "upstream_protocol",
            "a",
            id="number-content",
        ),
        pytest.param(
            Script(chunks=["a"], raw_frames=[chunk_frame(content={"text": "b"})]),
            "failed",
            "upstream_protocol",
            "a",
            id="object-content",
        ),
        pytest.param(
            Script(chunks=["a", "b"], usage={"prompt_tokens": -5, "completion_tokens": 2}),
            "complete",
            "",
            "ab",
            id="negative-usage",
        ),
        pytest.param(
            Script(chunks=["a", "b"], usage={"prompt_tokens": "many", "completion_tokens": "2"}),
            "complete",
            "",
            "ab",
            id="string-usage",
        ),
        pytest.param(
            Script(chunks=["a", "b"], usage={"prompt_tokens": 10**20, "completion_tokens": 10**20}),
            "complete",
            "",
            "ab",
            id="huge-usage",
        ),
        pytest.param(
            Script(chunks=["a"], raw_frames=[chunk_frame(usage="lots")]),
            "complete",
            "",
            "a",
            id="usage-not-object",
        ),
        pytest.param(Script(chunks=["nul\x00", "byte"]), "complete", "", "nul\ufffdbyte", id="nul-byte"),
        pytest.param(
            Script(
                chunks=["a"],
                raw_frames=[b'data: {"choices":[{"index":0,"delta":{"content":"\\ud800!"}}]}\n\n'],
            ),
            "complete",
            "",
            "a\ufffd!",
            id="lone-surrogate",
        ),
        pytest.param(
            Script(
                chunks=["a"],
                raw_frames=[b'data: {"choices":[{"index":0,"delta":{"content":"\xff\xfe"}}]}\n\n'],
            ),
            None,
            None,
            None,
            id="bad-utf8",
        ),
        pytest.param(
            Script(chunks=["a", "b"], finish_reason="x" * 500), "complete", "", "ab", id="long-finish-reason"
        ),
        pytest.param(
            Script(chunks=["y" * 1_000_000, "!"]), "complete", "", "y" * 1_000_000 + "!", id="1mb-chunk"
        ),
    ],
)
async def test_a_misbehaving_upstream_never_breaks_the_promises(
    upstream, manager, chatbot_settings, script, status, code, text
):
    chatbot_settings(CONCURRENT_STREAMS=2)
    upstream.enqueue(script)

    events = await answer_over_sse()

    message = await check_invariants(events)
    if status is not None:  # bad UTF-8: either decoded with replacement characters or refused
        assert (message.status, message.error_code) == (status, code)
        assert message.content == seen_text(events) == text
    assert len(message.finish_reason) <= 32
    assert message.prompt_tokens is None or 0 <= message.prompt_tokens < 10**9
    record = await UsageRecord.objects.aget(message_id=message.id)
    assert 0 <= record.total_tokens < 10**9


async def test_bad_usage_is_estimated_not_trusted(upstream, manager):
    upstream.enqueue(Script(chunks=["a b c"], usage={"prompt_tokens": -1, "completion_tokens": 10**20}))

    events = await answer_over_sse()

    usage = next(event for event in events if event["type"] == "usage")
    assert usage["estimated"] is True and usage["completion_tokens"] < 100
    message = await check_invariants(events)
    assert message.tokens_estimated is True


async def test_a_refused_connection_and_a_stall_end_with_their_errors(
    upstream, manager, chatbot_settings, settings
):
    from chatbot_api.providers import reset_provider

    served_at = settings.OPENAI_BASE_URL
    settings.OPENAI_BASE_URL = f"http://127.0.0.1:{closed_port()}/v1"
    reset_provider()
    refused = await answer_over_sse()
    assert (await check_invariants(refused)).error_code == "upstream_unavailable"

    settings.OPENAI_BASE_URL = served_at
    reset_provider()
    chatbot_settings(IDLE_TIMEOUT=0.3)
    upstream.enqueue(Script(chunks=["a", "b", "c"], hang_after=2))
    stalled = await answer_over_sse()
    message = await check_invariants(stalled)
    assert (message.error_code, message.content) == ("timeout_idle", "ab")


# --- The database refuses the save ------------------------------------------------------------


def _refuse_complete_saves():
    """A real database trigger that makes saving an answer as complete fail (as a full disk would)."""
    table = Message._meta.db_table
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(
                "CREATE OR REPLACE FUNCTION refuse_complete() RETURNS trigger AS $$ BEGIN "
                "RAISE EXCEPTION 'disk full'; END; $$ LANGUAGE plpgsql"
            )
            cursor.execute(
                f"CREATE TRIGGER refuse_complete BEFORE UPDATE ON {table} FOR EACH ROW "
                "WHEN (NEW.status = 'complete') EXECUTE FUNCTION refuse_complete()"
            )
        else:
            cursor.execute(
                f"CREATE TRIGGER refuse_complete BEFORE UPDATE ON {table} "
                "WHEN NEW.status = 'complete' BEGIN SELECT RAISE(ABORT, 'disk full'); END"
            )


def _allow_saves():
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(f"DROP TRIGGER IF EXISTS refuse_complete ON {Message._meta.db_table}")
        else:
            cursor.execute("DROP TRIGGER IF EXISTS refuse_complete")


async def test_an_outcome_that_cannot_be_saved_ends_with_an_error_and_frees_the_slot(
    upstream, manager, chatbot_settings, caplog
):
    chatbot_settings(CONCURRENT_STREAMS=1)
    await sync_to_async(_refuse_complete_saves)()
    try:
        upstream.enqueue(Script(chunks=["lost", " or", " not"], interval=0.05))
        with caplog.at_level(logging.ERROR, logger="chatbot.generation"):
            events = await answer_over_sse()
    finally:
        await sync_to_async(_allow_saves)()

    terminal = assert_one_terminal(events)
    assert (terminal["type"], terminal["code"], terminal["retryable"]) == ("error", "save_failed", True)
    message = await final_message(events[0]["message_id"])
    assert (message.status, message.error_code) == ("failed", "save_failed"), "never left pending"
    assert_stored_covers(message, seen_text(events))
    assert any("saving message" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)
    await assert_no_leaked_slot(slots)
    upstream.enqueue(Script(chunks=["next"]))
    assert await check_invariants(await answer_over_sse())  # the user is not locked out


# --- Resume offsets at and past the end -------------------------------------------------------


async def test_resuming_at_or_past_the_end_is_204_live_log_or_saved(upstream, manager):
    client = AsyncClient()
    await client.get("/")
    upstream.enqueue(Script(chunks=["a", "b"]))
    events = await answer_over_sse(client)
    last = events[-1]["seq"]
    url = f"/api/messages/{events[0]['message_id']}/events"

    for after in (last, last + 1, 99999999999999999999):
        response = await client.get(url, headers={"Last-Event-ID": str(after)})
        assert response.status_code == 204, after
        response = await client.get(f"{url}?after={after}")
        assert response.status_code == 204, after
    tail = events_of(await read_frames(await client.get(url, headers={"Last-Event-ID": str(last - 1)})))
    assert [event["seq"] for event in tail] == [last] and tail[0]["type"] == "done"

    await expire_log(manager.log, events[0]["message_id"])  # the same answers from the database
    assert (await client.get(url, headers={"Last-Event-ID": str(last)})).status_code == 204
    tail = events_of(await read_frames(await client.get(url, headers={"Last-Event-ID": str(last - 1)})))
    assert [event["seq"] for event in tail] == [last] and tail[0]["type"] == "done"


async def test_a_websocket_resume_past_the_end_sends_nothing_and_the_socket_lives(upstream, manager):
    upstream.enqueue(Script(chunks=["a", "b"]))
    session = await browser_session()
    ws = await websocket(session_key=session)
    await ws.send_json_to({"type": "chat", "message": "Hi"})
    events = await receive_until_terminal(ws)
    message_id, last = events[0]["message_id"], events[-1]["seq"]

    await ws.send_json_to({"type": "resume", "message_id": message_id, "after": last})
    await ws.send_json_to({"type": "resume", "message_id": message_id, "after": last - 1})

    assert (await ws.receive_json_from(timeout=5))["seq"] == last
    assert await ws.receive_nothing(timeout=0.3)
    await ws.disconnect()


async def expire_log(log, message_id) -> None:
    """Make a log disappear as its TTL would (in this process's memory, and in Redis if shared)."""
    from uuid import UUID

    from chatbot_api.streaming.eventlog_redis import RedisEventLog

    if isinstance(log, RedisEventLog):
        await log._redis().delete(log._key(UUID(message_id)))
        log = log._local
    log._streams.pop(UUID(message_id), None)


# --- Races --------------------------------------------------------------------------------------


async def test_ten_concurrent_regenerates_make_one_answer(upstream, manager, chatbot_settings):
    chatbot_settings(CONCURRENT_STREAMS=0, REQUESTS_PER_MINUTE=0)
    client = AsyncClient()
    await client.get("/")
    upstream.enqueue(Script(chunks=["first"]))
    events = await answer_over_sse(client)
    upstream.default = Script(chunks=["again"], interval=0.05)
    url = f"/api/messages/{events[0]['message_id']}/regenerate"

    responses = await asyncio.gather(*(client.post(url) for _ in range(10)))

    statuses = sorted(response.status_code for response in responses)
    # The losers learn the answer is gone (404), being replaced (409) or no longer the last (400).
    assert statuses.count(200) == 1 and set(statuses) <= {200, 400, 404, 409}, statuses
    for response in responses:
        if response.status_code != 200:
            assert response.json()["code"] in ("conflict", "message_not_found", "invalid")
    winner = next(response for response in responses if response.status_code == 200).json()
    await final_message(winner["message_id"])
    answers = [m async for m in Message.objects.filter(role="assistant")]
    assert len(answers) == 1 and answers[0].content == "again"


async def test_deleting_a_conversation_stops_its_answer_charges_it_and_frees_the_slot(
    upstream, manager, chatbot_settings
):
    chatbot_settings(CONCURRENT_STREAMS=1)
    client = AsyncClient()
    await client.get("/")
    upstream.enqueue(Script(chunks=["a", "b", "c"], hang_after=2))
    response = await start_sse(client, {"message": "Hi"})
    head = events_of(await read_frames(response, limit=3))

    deleted = await client.delete(f"/api/conversations/{head[0]['session_id']}")

    assert deleted.status_code == 204
    assert (await upstream.wait_for_disconnect_async()).disconnected, "the model was stopped"
    assert not await Conversation.objects.filter(pk=head[0]["session_id"]).aexists()
    record = await UsageRecord.objects.aget(client_key=CLIENT_KEY)
    assert record.outcome == "stopped" and record.completion_tokens > 0
    await assert_no_leaked_slot(slots)


async def test_concurrency_refusals_do_not_spend_the_minute(upstream, manager, chatbot_settings):
    chatbot_settings(CONCURRENT_STREAMS=1, REQUESTS_PER_MINUTE=5)
    client = AsyncClient()
    await client.get("/")
    upstream.enqueue(Script(chunks=["a", "b"], hang_after=1))
    running = events_of(await read_frames(await start_sse(client, {"message": "Hi"}), limit=2))

    burst = [
        await client.post("/api/chat/", {"message": "Hi"}, content_type="application/json") for _ in range(20)
    ]

    assert {r.json()["limit"] for r in burst} == {"concurrent_streams"}
    await client.post(f"/api/messages/{running[0]['message_id']}/stop")
    upstream.default = Script(chunks=["ok"])
    for _ in range(4):  # the minute's other four requests are still there
        response = await client.post("/api/chat/", {"message": "Hi"}, content_type="application/json")
        assert response.status_code == 200, response.json()
    refused = await client.post("/api/chat/", {"message": "Hi"}, content_type="application/json")
    assert refused.status_code == 429 and refused.json()["limit"] == "requests_per_minute"
    await assert_no_leaked_slot(slots)


# --- Hostile input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 60_000,
        b'{"message": ' + b"[" * 20_000 + b"]" * 20_000 + b"}",
        b'{"message": "hi", "streaming": "yes"}',
        b'{"message": "hi", "streaming": 1}',
        b'{"message": "\xff\xfe"}',
    ],
    ids=["deep-array", "deep-message", "streaming-yes", "streaming-1", "bad-utf8"],
)
async def test_hostile_bodies_get_400_in_the_error_shape(upstream, manager, raw):
    response = await AsyncClient().generic("POST", "/api/chat/", raw, content_type="application/json")

    assert response.status_code == 400
    body = response.json()
    assert body["success"] is False and body["code"] in ("invalid", "parse_error") and body["error"]
    assert await Message.objects.acount() == 0


@pytest.mark.parametrize(
    "frame",
    [
        {"text_data": "not json"},
        {"bytes_data": b"\x00\x01binary"},
        {"text_data": "[" * 100_000},
        {"text_data": json.dumps({"type": "chat", "message": "x"})[:-1] + ", " + "[" * 5000},
        {"text_data": "[1, 2]"},
        {"text_data": json.dumps({"type": "resume", "message_id": "x", "after": 10**30})},
    ],
    ids=["not-json", "binary", "deep", "cut", "array", "huge-after"],
)
async def test_bad_websocket_frames_get_an_error_frame_and_the_socket_lives(upstream, manager, frame):
    ws = await websocket(session_key=await browser_session())

    await ws.send_to(**frame)

    error = await ws.receive_json_from(timeout=5)
    assert error["type"] == "error" and error["code"] in ("invalid", "message_not_found") and error["message"]
    upstream.enqueue(Script(chunks=["still", " here"]))
    await ws.send_json_to({"type": "chat", "message": "Hi"})
    frames = [await ws.receive_json_from(timeout=5) for _ in range(5)]
    assert frames[0]["type"] == "accepted" and seen_text(frames) == "still here"
    await ws.disconnect()


async def test_an_edit_while_an_answer_is_written_is_refused_and_the_answer_lives_on(upstream, manager):
    client = AsyncClient()
    await client.get("/")
    upstream.enqueue(Script(chunks=["First."]), Script(chunks=["Still", " going"], hang_after=1))
    first = await answer_over_sse(client, {"message": "One"})
    session = first[0]["session_id"]
    question = await Message.objects.aget(conversation_id=session, role="user")
    head = events_of(
        await read_frames(await start_sse(client, {"message": "Two", "session_id": session}), limit=2)
    )

    edit = await client.post(f"/api/messages/{question.id}/edit", {"message": "One, edited"},
                             content_type="application/json")  # fmt: skip

    assert edit.status_code == 409 and edit.json()["code"] == "conflict"
    live = await Message.objects.aget(pk=head[0]["message_id"])
    assert live.is_live and await Message.objects.filter(conversation_id=session).acount() == 4
    await client.post(f"/api/messages/{live.id}/stop")
    await live.arefresh_from_db()
    assert live.status == Message.Status.STOPPED
    assert_stored_covers(live, "".join(e["text"] for e in head if e["type"] == "delta"))
    await assert_no_leaked_slot(slots)


async def test_a_worker_starting_too_many_answers_refuses_more_at_once_and_frees_its_slots(
    live_server_url, upstream, chatbot_settings
):
    # Two answers hang while they start, for real: another connection locks the table the
    # turn's INSERT writes to. The third is refused by the gate before Django sees it.
    if connection.vendor != "postgresql":
        pytest.skip("needs PostgreSQL (a table lock that makes INSERTs wait): run scripts/test-backends.sh")
    import httpx
    import psycopg

    chatbot_settings(MAX_STARTING_ANSWERS=2, MAX_LOOP_LAG=0, CONCURRENT_STREAMS=0, REQUESTS_PER_MINUTE=0)
    upstream.default = Script(chunks=["Ciao", " a", " tutti"])
    db = connection.settings_dict
    locker = await psycopg.AsyncConnection.connect(
        host=db["HOST"] or "127.0.0.1", port=db["PORT"] or 5432, user=db["USER"], dbname=db["NAME"]
    )
    await locker.execute("BEGIN")
    await locker.execute("LOCK TABLE chatbot_api_conversation IN EXCLUSIVE MODE")

    async def waiting_inserts() -> int:
        await locker.execute("SELECT pg_stat_clear_snapshot()")  # a transaction sees one snapshot
        row = await (
            await locker.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = %s",
                [db["NAME"]],
            )
        ).fetchone()
        return row[0]

    async with httpx.AsyncClient(base_url=live_server_url, timeout=20) as client:

        async def chat() -> list[dict]:
            async with client.stream(
                "POST", "/api/chat/", json={"message": "Hi"}, headers={"Accept": "text/event-stream"}
            ) as response:
                assert response.status_code == 200
                return [frame["data"] async for frame in frames_in(response.aiter_raw())]

        held = [asyncio.create_task(chat()) for _ in range(2)]
        try:
            async with asyncio.timeout(10):
                while await waiting_inserts() < 2 or answer_admission().starting < 2:  # noqa: ASYNC110
                    await asyncio.sleep(0.02)  # polling PostgreSQL: no event to wait for
            refused = await client.post("/api/chat/", json={"message": "One too many"})
            completions = await client.post(
                "/v1/chat/completions",
                json={"model": "gpt-4.1-nano", "messages": [{"role": "user", "content": "Hi"}]},
            )
            assert answer_admission().starting == 2
        finally:
            await locker.rollback()  # the held answers go on
            await locker.close()
        async with asyncio.timeout(20):
            streams = await asyncio.gather(*held)

        assert refused.status_code == 503
        assert refused.headers["Retry-After"] == "1"
        assert refused.json() == {
            "success": False,
            "error": "This server is starting too many answers at once; try again in a moment.",
            "code": "server_busy",
            "retryable": True,
            "retry_safe": True,  # refused before anything was read: the page sends it again
        }
        assert completions.status_code == 503
        assert completions.json()["error"]["code"] == "server_busy"  # OpenAI's error shape there
        for events in streams:
            assert assert_one_terminal(events)["type"] == "done"
            message = await final_message(events[0]["message_id"])
            assert_stored_covers(message, seen_text(events))
        await assert_no_leaked_slot(lambda: answer_admission().starting)
        client.cookies.clear()  # cookie-less, as the others: a session cookie would need CSRF
        again = await client.post("/api/chat/", json={"message": "Now there is room"})
        assert again.status_code == 200 and again.json()["success"] is True
    assert await Message.objects.acount() == 6  # the refused requests saved nothing
