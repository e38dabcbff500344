"""The fault suite across processes: workers killed mid-answer, Redis killed, emptied and frozen.

Every fault is real: worker processes (uvicorn, as `make run` starts them) on the test's
PostgreSQL database, sharing a private `redis-server` that the test kills with SIGKILL,
restarts empty or stops with SIGSTOP. The machine's shared Redis is never touched. Each
test checks the three promises of `tests.support.invariants`. Runs in the PostgreSQL +
Redis pass (`scripts/test-backends.sh`); skipped on SQLite.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time

import httpx
import pytest
import redis
import websockets
from django.contrib.auth.models import User
from django.db import connection
from rest_framework.authtoken.models import Token

from chatbot_api.models import Message, UsageRecord
from tests.support.cluster import RedisServer, Worker
from tests.support.fake_openai import Script
from tests.support.invariants import (
    assert_no_leaked_slot,
    assert_one_terminal,
    assert_seqs_unbroken,
    assert_stored_covers,
    final_message,
    seen_text,
)
from tests.support.sse import frames_in

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.postgres, pytest.mark.redis]

SSE = {"Accept": "text/event-stream"}
ORPHAN_AFTER = 2
# A reader must end this soon after its answer's worker died (sweep period + margins).
READER_BOUND = ORPHAN_AFTER * 4 + 5


@pytest.fixture
def redis_server():
    if not RedisServer.available():
        pytest.skip("redis-server is not installed")
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture
async def api_user(transactional_db):
    user = await User.objects.acreate(username="fault-suite")
    token = await Token.objects.acreate(user=user)
    return user, {"Authorization": f"Token {token.key}"}


@pytest.fixture
def cluster(redis_server, upstream, fake_server):
    """`start(name, **env)` starts a worker process on the test database and the private Redis."""
    if connection.vendor != "postgresql":
        pytest.skip("needs PostgreSQL: run through scripts/test-backends.sh")
    db = connection.settings_dict
    env = {
        "DJANGO_SETTINGS_MODULE": "chatbot.settings",
        "CHATBOT_DEV_DEFAULTS": "1",
        "DATABASE_URL": (
            f"postgres://{db['USER']}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"
        ),
        "DATABASE_POOL_SIZE": "5",
        "REDIS_URL": redis_server.url,
        "CHATBOT_PROVIDER": "openai",
        "OPENAI_API_KEY": "sk-test-not-a-real-key",
        "OPENAI_BASE_URL": fake_server.url,
        "OPENAI_MAX_RETRIES": "0",
        "CHATBOT_ORPHAN_AFTER": str(ORPHAN_AFTER),
        "CHATBOT_KEEPALIVE_INTERVAL": "1",
        "CHATBOT_SHUTDOWN_GRACE": "2",
        "CHATBOT_CONCURRENT_STREAMS": "500",
        "CHATBOT_REQUESTS_PER_MINUTE": "0",
        # Storms of 200 answers at once test other things than load shedding (test_faults.py does).
        "CHATBOT_MAX_STARTING_ANSWERS": "0",
        "DJANGO_ALLOWED_HOSTS": "127.0.0.1,localhost",
        "DJANGO_LOG_LEVEL": "WARNING",
        "PYTHONUNBUFFERED": "1",
    }
    workers: list[Worker] = []

    def start(name: str, **extra: str) -> Worker:
        worker = Worker({**env, **extra}, name=name, graceful=10).start()
        workers.append(worker)
        return worker

    yield start
    upstream.abort_streams()
    for worker in workers:
        worker.stop()


def slot_counter(redis_server: RedisServer, user: User):
    """The user's stream slots as the workers count them in Redis (Django's cache key format)."""
    client = redis.Redis.from_url(redis_server.url, socket_timeout=2)

    def slots() -> int:
        value = client.get(f":1:chatbot:rl:streams:user:{user.pk}")
        return int(value or 0)

    return slots


class Reader:
    """A client reading one SSE response in the background, keeping what it saw even if cut."""

    def __init__(self, http: httpx.AsyncClient, method: str, url: str, **kwargs):
        self.events: list[dict] = []
        self.status: int | None = None
        self.cut = False
        self.task = asyncio.create_task(self._read(http, method, url, kwargs))

    async def _read(self, http, method, url, kwargs):
        headers = {**SSE, **kwargs.pop("headers", {})}
        try:
            async with http.stream(method, url, headers=headers, **kwargs) as response:
                self.status = response.status_code
                async for frame in frames_in(response.aiter_raw()):
                    self.events.append(frame["data"])
        except httpx.HTTPError:
            self.cut = True  # the worker under it died

    async def until(self, count: int, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while len(self.events) < count:
            assert time.monotonic() < deadline, f"only {len(self.events)} events after {timeout} s"
            assert not self.task.done() or len(self.events) >= count, "the stream ended early"
            await asyncio.sleep(0.02)

    async def finish(self, timeout: float) -> list[dict]:
        await asyncio.wait_for(self.task, timeout)
        return self.events


async def read_all(http, url: str, timeout: float = READER_BOUND, **kwargs) -> tuple[int, list[dict]]:
    reader = Reader(http, "GET", url, **kwargs)
    events = await reader.finish(timeout)
    return reader.status, events


def long_answer(chunks: int = 300, interval: float = 0.02) -> Script:
    return Script(chunks=[f"{n} " for n in range(chunks)], interval=interval)


# --- Workers die ------------------------------------------------------------------------------


async def test_a_worker_killed_mid_answer_ends_every_reader_and_keeps_what_was_seen(
    cluster, upstream, api_user, redis_server
):
    user, auth = api_user
    a, b = cluster("a"), cluster("b")
    upstream.enqueue(long_answer())
    async with httpx.AsyncClient(headers=auth, timeout=30) as http:
        on_a = Reader(http, "POST", f"{a.origin}/api/chat/", json={"message": "Hi"})
        await on_a.until(20)
        message_id = on_a.events[0]["message_id"]
        on_b = Reader(http, "GET", f"{b.origin}/api/messages/{message_id}/events")
        await on_b.until(25)

        a.kill(signal.SIGKILL)
        await on_a.finish(5)
        started = time.monotonic()
        follower = await on_b.finish(READER_BOUND)
        ended_after = time.monotonic() - started
        cut_at = on_a.events[-1]["seq"]
        status, resumed = await read_all(
            http,
            f"{b.origin}/api/messages/{message_id}/events",
            headers={"Last-Event-ID": str(cut_at)},
        )
        _, fresh = await read_all(http, f"{b.origin}/api/messages/{message_id}/events")

    assert on_a.cut, "the client of the killed worker lost its connection"
    assert assert_one_terminal(follower)["code"] == "interrupted", follower[-1]
    assert ended_after < READER_BOUND
    assert status == 200 and assert_one_terminal(resumed)["code"] == "interrupted"
    assert_seqs_unbroken(resumed, after=cut_at)
    assert_one_terminal(fresh)
    assert_seqs_unbroken(fresh)
    message = await final_message(message_id)
    assert message.status == "interrupted"
    assert_stored_covers(message, seen_text(on_a.events), seen_text(follower), seen_text(fresh))
    assert seen_text(fresh) == message.content
    await assert_no_leaked_slot(slot_counter(redis_server, user))


async def test_sigterm_with_clients_connected_is_bounded_by_the_grace_period(
    cluster, upstream, api_user, redis_server
):
    user, auth = api_user
    a, b = cluster("a"), cluster("b")
    upstream.enqueue(long_answer(chunks=1000, interval=0.02), long_answer(chunks=400, interval=0.02))
    async with httpx.AsyncClient(headers=auth, timeout=30) as http:
        here = Reader(http, "POST", f"{a.origin}/api/chat/", json={"message": "Hi"})  # runs on A
        elsewhere = Reader(http, "POST", f"{b.origin}/api/chat/", json={"message": "Hi"})  # runs on B
        await here.until(5)
        await elsewhere.until(5)
        follower = Reader(http, "GET", f"{a.origin}/api/messages/{elsewhere.events[0]['message_id']}/events")
        await follower.until(10)

        started = time.monotonic()
        a.kill(signal.SIGTERM)
        code = await asyncio.to_thread(a.wait, 15)
        took = time.monotonic() - started
        local = await here.finish(5)
        remote = await follower.finish(5)
        resumed_at = remote[-2]["seq"]
        status, rest = await read_all(
            http,
            f"{b.origin}/api/messages/{elsewhere.events[0]['message_id']}/events",
            headers={"Last-Event-ID": str(resumed_at)},
            timeout=30,
        )

    # uvicorn re-raises the SIGTERM it handled once it has shut down: -15 is its clean exit.
    assert code in (0, -signal.SIGTERM) and took < 2 + 4, f"shutdown took {took:.1f} s with a 2 s grace"
    assert assert_one_terminal(local)["code"] == "interrupted"  # its answer ran here: kept, ended
    terminal = assert_one_terminal(remote)
    assert (terminal["code"], terminal["retryable"], terminal.get("seq")) == ("server_shutdown", True, None)
    assert status == 200 and assert_one_terminal(rest)["type"] == "done"
    assert_seqs_unbroken(rest, after=resumed_at)
    interrupted = await final_message(local[0]["message_id"])
    assert interrupted.status == "interrupted"
    assert_stored_covers(interrupted, seen_text(local))
    finished = await final_message(elsewhere.events[0]["message_id"], timeout=30)
    assert_stored_covers(finished, seen_text(remote[:-1]) + seen_text(rest))
    await assert_no_leaked_slot(slot_counter(redis_server, user), timeout=30)


# --- Redis fails ------------------------------------------------------------------------------


async def test_redis_restarted_empty_mid_answer_leaves_no_gap(cluster, upstream, api_user, redis_server):
    user, auth = api_user
    a, b = cluster("a"), cluster("b")
    upstream.enqueue(long_answer(chunks=250))
    async with httpx.AsyncClient(headers=auth, timeout=30) as http:
        on_a = Reader(http, "POST", f"{a.origin}/api/chat/", json={"message": "Hi"})
        await on_a.until(30)
        message_id = on_a.events[0]["message_id"]
        events_url = f"{b.origin}/api/messages/{message_id}/events"

        redis_server.kill()
        during = await http.get(events_url, headers={**SSE, "Last-Event-ID": "10"})
        new_answer = await http.post(f"{b.origin}/api/chat/", json={"message": "Hi"})
        seen_before_restart = len(on_a.events)
        redis_server.start()  # empty: every stream and counter is gone
        await on_a.until(seen_before_restart + 20)
        status, resumed = await read_all(http, events_url, headers={"Last-Event-ID": "10"}, timeout=30)
        local = await on_a.finish(30)

    for busy in (during, new_answer):  # a resume elsewhere, a new answer: 503, try again shortly
        assert busy.status_code == 503 and busy.json()["code"] == "server_busy", busy.text
        assert busy.headers["Retry-After"]
    assert assert_one_terminal(local)["type"] == "done"
    assert_seqs_unbroken(local)
    assert status == 200 and assert_one_terminal(resumed)["type"] == "done"
    assert_seqs_unbroken(resumed, after=10)  # no silent jump over what the new Redis never got
    message = await final_message(message_id)
    assert message.content == seen_text(local) == seen_text(local[:10]) + seen_text(resumed)
    await assert_no_leaked_slot(slot_counter(redis_server, user))


async def test_frozen_redis_stalls_nothing_and_everything_recovers(cluster, upstream, api_user, redis_server):
    user, auth = api_user
    a, b = cluster("a"), cluster("b")
    upstream.enqueue(long_answer(chunks=300), Script(chunks=["short"], first_delay=0.5))
    async with httpx.AsyncClient(headers=auth, timeout=30) as http:
        on_a = Reader(http, "POST", f"{a.origin}/api/chat/", json={"message": "Hi"})
        await on_a.until(20)
        message_id = on_a.events[0]["message_id"]
        # Another answer on the same worker ends while Redis is frozen: its slot goes back to
        # Redis, which must hold up neither the database thread nor the heartbeat of the first.
        short = Reader(http, "POST", f"{a.origin}/api/chat/", json={"message": "Hi"})
        await short.until(1)

        redis_server.freeze()
        frozen_at, count_at = time.monotonic(), len(on_a.events)
        refused = await http.post(f"{a.origin}/api/chat/", json={"message": "Hi"})
        await asyncio.sleep(ORPHAN_AFTER + 0.5)  # longer than a worker may go quiet
        grown = len(on_a.events) - count_at
        still_live = (await Message.objects.aget(pk=message_id)).status
        short_events = await short.finish(1)
        redis_server.thaw()
        local = await on_a.finish(30)
        status, resumed = await read_all(
            http, f"{b.origin}/api/messages/{message_id}/events", headers={"Last-Event-ID": "5"}
        )

    took = time.monotonic() - frozen_at
    assert grown > 50, f"the reader on the generating worker stalled: {grown} events in {took:.1f} s"
    assert still_live == "streaming", "the heartbeat kept going, nobody swept the live answer"
    assert refused.status_code == 503 and refused.json()["code"] == "server_busy", refused.text
    assert assert_one_terminal(short_events)["type"] == "done", "it ended while Redis was frozen"
    assert assert_one_terminal(local)["type"] == "done"
    assert status == 200 and assert_one_terminal(resumed)["type"] == "done"
    assert_seqs_unbroken(resumed, after=5)
    message = await final_message(message_id)
    assert message.status == "complete"
    assert message.content == seen_text(local) == seen_text(local[:5]) + seen_text(resumed)
    await assert_no_leaked_slot(slot_counter(redis_server, user), timeout=20)


async def test_redis_killed_after_the_end_loses_nothing(cluster, upstream, api_user, redis_server):
    user, auth = api_user
    a, b = cluster("a"), cluster("b")
    upstream.enqueue(long_answer(chunks=40, interval=0.01))
    async with httpx.AsyncClient(headers=auth, timeout=30) as http:
        on_a = Reader(http, "POST", f"{a.origin}/api/chat/", json={"message": "Hi"})
        local = await on_a.finish(30)
        redis_server.restart_empty()
        message_id = local[0]["message_id"]
        status, replay = await read_all(http, f"{b.origin}/api/messages/{message_id}/events")
        past_end = await http.get(
            f"{b.origin}/api/messages/{message_id}/events",
            headers={"Last-Event-ID": str(local[-1]["seq"])},
        )

    message = await final_message(message_id)
    assert message.content == seen_text(local) == seen_text(replay)
    assert assert_one_terminal(replay)["seq"] == local[-1]["seq"], "the database keeps the log's numbering"
    assert past_end.status_code == 204


# --- Races across workers ---------------------------------------------------------------------


async def test_delete_on_another_worker_stops_the_answer_charges_it_and_frees_the_slot(
    cluster, upstream, api_user, redis_server
):
    user, auth = api_user
    a, b = cluster("a"), cluster("b")
    upstream.enqueue(long_answer())
    async with httpx.AsyncClient(headers=auth, timeout=30) as http:
        on_a = Reader(http, "POST", f"{a.origin}/api/chat/", json={"message": "Hi"})
        await on_a.until(10)
        deleted = await http.delete(f"{b.origin}/api/conversations/{on_a.events[0]['session_id']}")
        local = await on_a.finish(15)

    assert deleted.status_code == 204
    assert assert_one_terminal(local)["status"] == "stopped"
    assert (await upstream.wait_for_disconnect_async()).disconnected
    from chatbot_api.models import UsageRecord

    record = await UsageRecord.objects.aget(user=user)
    assert record.outcome == "stopped" and record.completion_tokens > 0 and record.message_id is None
    await assert_no_leaked_slot(slot_counter(redis_server, user))


async def test_concurrent_regenerates_on_two_workers_make_one_answer(cluster, upstream, api_user):
    user, auth = api_user
    a, b = cluster("a"), cluster("b")
    upstream.enqueue(Script(chunks=["first"]))
    upstream.default = Script(chunks=["again"], interval=0.05)
    async with httpx.AsyncClient(headers=auth, timeout=30) as http:
        first = (await http.post(f"{a.origin}/api/chat/", json={"message": "Hi"})).json()
        url = f"/api/messages/{first['message_id']}/regenerate"
        responses = await asyncio.gather(*(http.post((a if n % 2 else b).origin + url) for n in range(10)))
    statuses = sorted(response.status_code for response in responses)
    # The losers learn the answer is gone (404), being replaced (409) or no longer the last (400).
    assert statuses.count(200) == 1 and set(statuses) <= {200, 400, 404, 409}, statuses
    answers = [m async for m in Message.objects.filter(role="assistant")]
    assert len(answers) == 1 and answers[0].content == "again"


async def test_a_worker_killed_mid_continuation_keeps_both_parts_and_another_worker_continues_it(
    cluster, upstream, api_user, redis_server
):
    user, auth = api_user
    a, b = cluster("a"), cluster("b")
    upstream.enqueue(Script(chunks=["Part one."], finish_reason="length"))
    async with httpx.AsyncClient(headers=auth, timeout=30) as http:
        first = (await http.post(f"{a.origin}/api/chat/", json={"message": "Hi"})).json()
        message_id = first["message_id"]
        old_end = (await Message.objects.aget(pk=message_id)).last_seq
        upstream.enqueue(long_answer())
        on_a = Reader(http, "POST", f"{a.origin}/api/messages/{message_id}/continue")
        await on_a.until(12)
        # A reader on another worker that had read the answer to its old end: only the new part.
        on_b = Reader(
            http,
            "GET",
            f"{b.origin}/api/messages/{message_id}/events",
            headers={"Last-Event-ID": str(old_end)},
        )
        await on_b.until(5)

        a.kill(signal.SIGKILL)
        await on_a.finish(5)
        follower = await on_b.finish(READER_BOUND)
        interrupted = await final_message(message_id)
        upstream.enqueue(Script(chunks=[" The end."]))
        again = (await http.post(f"{b.origin}/api/messages/{message_id}/continue")).json()

    assert on_a.cut and [e["type"] for e in on_a.events[:2]] == ["meta", "snapshot"]
    assert assert_one_terminal(follower)["code"] == "interrupted"
    assert_seqs_unbroken(follower, after=old_end)
    assert interrupted.status == "interrupted"
    assert_stored_covers(interrupted, seen_text(on_a.events), "Part one." + seen_text(follower))
    assert again["success"] and again["response"] == interrupted.content + " The end."
    message = await final_message(message_id)
    assert (message.content, message.continuations) == (again["response"], 2)
    parts = [
        part
        async for part in UsageRecord.objects.filter(message_id=message_id).values_list("part", flat=True)
    ]
    assert sorted(parts) == [0, 1, 2]
    await assert_no_leaked_slot(slot_counter(redis_server, user))


# --- WebSockets and crowds ----------------------------------------------------------------------


async def test_idle_websockets_live_with_redis_configured(cluster, upstream, api_user):
    """The unused channels-redis layer closed every socket after ~5 s; ten idle ones live a minute."""
    user, auth = api_user
    a = cluster("a")
    url = a.origin.replace("http://", "ws://") + "/ws/chat/"
    sockets = [
        await websockets.connect(url, additional_headers=auth, origin=a.origin, ping_interval=None)
        for _ in range(10)
    ]
    try:
        await asyncio.sleep(60)
        upstream.default = Script(chunks=["still", " open"])
        for ws in sockets:
            await ws.send(json.dumps({"type": "chat", "message": "Hi"}))
            frames = []
            while not frames or frames[-1]["type"] not in ("done", "error"):
                frames.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
            assert frames[-1]["type"] == "done" and seen_text(frames) == "still open"
    finally:
        for ws in sockets:
            await ws.close()


async def test_a_disconnect_storm_leaves_no_row_stuck_and_no_slot_held(
    cluster, upstream, api_user, redis_server
):
    user, auth = api_user
    a = cluster("a", CHATBOT_CANCEL_ON_DISCONNECT="true")
    b = cluster("b")  # its clients leave, its answers run to the end
    upstream.default = Script(chunks=[f"{n} " for n in range(40)], interval=0.05)
    limits = httpx.Limits(max_connections=300, max_keepalive_connections=0)
    async with httpx.AsyncClient(headers=auth, timeout=60, limits=limits) as http:

        async def leave_early(n: int) -> list[dict]:
            worker = a if n % 2 else b
            events = []
            async with http.stream(
                "POST", f"{worker.origin}/api/chat/", json={"message": "Hi"}, headers=SSE
            ) as r:
                assert r.status_code == 200, await r.aread()
                async for frame in frames_in(r.aiter_raw()):
                    events.append(frame["data"])
                    if len(events) >= 2 + n % 5:
                        return events  # the client goes away mid-answer

        seen = await asyncio.gather(*(leave_early(n) for n in range(200)))

    deadline = time.monotonic() + 30
    while await Message.objects.filter(status__in=Message.LIVE_STATUSES).aexists():
        assert time.monotonic() < deadline, "answers stuck live after the storm"
        await asyncio.sleep(0.2)
    for events in seen:
        message = await Message.objects.aget(pk=events[0]["message_id"])
        assert message.status in ("stopped", "complete"), message.status
        assert_stored_covers(message, seen_text(events))
    await assert_no_leaked_slot(slot_counter(redis_server, user), timeout=30)
