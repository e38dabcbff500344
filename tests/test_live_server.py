"""The product under a real uvicorn on loopback: SSE bytes, a real WebSocket client, real disconnects."""

from __future__ import annotations

import asyncio
import json
import statistics
import threading
import time
from contextlib import AsyncExitStack, asynccontextmanager

import httpx
import pytest
import websockets

from tests.support.clients import wait_for_status
from tests.support.fake_openai import Script
from tests.support.servers import answer_admission, lagging_loop
from tests.support.sse import frames_in, parse_sse

pytestmark = [pytest.mark.django_db(transaction=True)]


@asynccontextmanager
async def new_browser(base_url: str):
    """An httpx client holding the page's session and CSRF cookies, like a browser tab."""
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
        await client.get("/")
        client.headers["X-CSRFToken"] = client.cookies["csrftoken"]
        client.headers["Referer"] = base_url + "/"
        yield client


async def sse_frames(response):
    """Each SSE frame of an httpx streaming response as it arrives: (arrival time, frame)."""
    async for frame in frames_in(response.aiter_raw()):
        yield time.monotonic(), frame


def stream_chat(client: httpx.AsyncClient):
    return client.stream(
        "POST", "/api/chat/", json={"message": "Hi"}, headers={"Accept": "text/event-stream"}
    )


async def test_sse_reaches_the_socket_frame_by_frame(upstream, live_server_url):
    upstream.enqueue(Script(chunks=[f"c{i}" for i in range(5)], interval=0.1))
    async with new_browser(live_server_url) as client:
        async with stream_chat(client) as response:
            assert response.status_code == 200
            assert response.headers["content-type"] == "text/event-stream"
            assert response.headers["cache-control"] == "no-cache"
            assert response.headers["x-accel-buffering"] == "no"
            assert "content-encoding" not in response.headers
            arrivals = [item async for item in sse_frames(response)]
    deltas = [(t, f) for t, f in arrivals if f["event"] == "delta"]
    assert [f["data"]["text"] for _, f in deltas] == ["c0", "c1", "c2", "c3", "c4"]
    assert deltas[0][0] < upstream.history[-1].closed_at - 0.25, "first token before the upstream finished"
    gaps = [b[0] - a[0] for a, b in zip(deltas, deltas[1:], strict=False)]
    assert statistics.median(gaps) > 0.05, ("each delta reached the socket on its own", gaps)
    assert arrivals[-1][1]["event"] == "done"


async def test_csrf_is_enforced_for_cookie_sessions(upstream, live_server_url):
    async with new_browser(live_server_url) as client:
        del client.headers["X-CSRFToken"]
        response = await client.post("/api/chat/", json={"message": "Hi"})
    assert response.status_code == 403
    assert response.json()["success"] is False and "CSRF" in response.json()["error"]


async def test_disconnect_then_resume_over_http(upstream, live_server_url):
    upstream.enqueue(Script(chunks=[f"{i} " for i in range(20)], interval=0.03))
    async with new_browser(live_server_url) as client:
        seen = []
        async with stream_chat(client) as response:
            async for _, frame in sse_frames(response):
                seen.append(frame)
                if len(seen) == 6:
                    break  # the network drops
        message_id = seen[0]["data"]["message_id"]
        resumed = await client.get(
            f"/api/messages/{message_id}/events", headers={"Last-Event-ID": seen[-1]["id"]}
        )
    frames = seen + parse_sse(resumed.content)
    assert [int(f["id"]) for f in frames] == list(range(1, len(frames) + 1))
    text = "".join(f["data"]["text"] for f in frames if f["event"] == "delta")
    message = await wait_for_status(message_id, {"complete"})
    assert text == message.content == "".join(f"{i} " for i in range(20))


async def test_real_disconnect_stops_the_answer_when_configured(upstream, live_server_url, chatbot_settings):
    chatbot_settings(CANCEL_ON_DISCONNECT=True)
    upstream.enqueue(Script(chunks=["a", "b", "c"], hang_after=2))
    async with new_browser(live_server_url) as client:
        seen = []
        async with stream_chat(client) as response:
            async for _, frame in sse_frames(response):
                seen.append(frame)
                if frame["event"] == "delta" and frame["data"]["text"] == "b":
                    break  # the client goes away
    message_id = seen[0]["data"]["message_id"]
    message = await wait_for_status(message_id, {"stopped"})
    assert (message.status, message.content) == ("stopped", "ab")
    assert (await upstream.wait_for_disconnect_async()).disconnected


async def test_an_open_stream_holds_no_thread_of_its_own(upstream, live_server_url, chatbot_settings):
    """Django keeps a request's sync thread until its response ends; a stream gives it back
    once it has started, so a worker's threads do not grow with the streams it holds open."""
    chatbot_settings(CONCURRENT_STREAMS=10, CANCEL_ON_DISCONNECT=True)  # the held streams end with the test
    upstream.enqueue(Script(chunks=["warm"]))
    async with new_browser(live_server_url) as client:
        assert (await client.post("/api/chat/", json={"message": "Hi"})).status_code == 200
        baseline = threading.active_count()
        streams = 6
        for _ in range(streams):
            upstream.enqueue(Script(chunks=["open", "never"], hang_after=1))
        async with AsyncExitStack() as open_streams:
            readers = []  # not closed until the count: closing one would close its response
            for _ in range(streams):
                response = await open_streams.enter_async_context(stream_chat(client))
                readers.append(sse_frames(response))
                while (await anext(readers[-1]))[1]["event"] != "delta":
                    pass
            held = threading.active_count()
            for reader in readers:
                await reader.aclose()
        # Sync work after the streams (a normal request, each stream's end) still has a thread.
        upstream.enqueue(Script(chunks=["after"]))
        after = await client.post("/api/chat/", json={"message": "Hi"})
    assert held <= baseline + 1, (baseline, held, streams)  # was one more per open stream
    assert after.json()["response"] == "after"


async def test_real_websocket_client(upstream, live_server_url):
    upstream.enqueue(Script(chunks=["real", " ws"], interval=0.02))
    async with new_browser(live_server_url) as client:
        cookie = "; ".join(f"{k}={v}" for k, v in client.cookies.items())
    ws_url = live_server_url.replace("http://", "ws://") + "/ws/chat/"
    async with websockets.connect(
        ws_url, additional_headers={"Cookie": cookie}, origin=live_server_url
    ) as ws:
        await ws.send(json.dumps({"type": "chat", "message": "Hi"}))
        events = []
        while not events or events[-1]["type"] not in ("done", "error"):
            events.append(json.loads(await asyncio.wait_for(ws.recv(), 5)))
    assert [e["type"] for e in events] == ["accepted", "meta", "delta", "delta", "usage", "done"]
    assert "".join(e["text"] for e in events if e["type"] == "delta") == "real ws"


async def test_a_worker_whose_event_loop_lags_refuses_new_answers_until_it_catches_up(
    live_server_url, upstream, chatbot_settings
):
    # The server's event loop is really kept busy (a callback that blocks it 150 ms at a
    # time, as a saturated worker's would be); a new answer is refused at once, in the
    # error shape, and accepted again once the loop keeps up.
    chatbot_settings(MAX_STARTING_ANSWERS=8, MAX_LOOP_LAG=0.1)
    gate = answer_admission()
    async with httpx.AsyncClient(base_url=live_server_url, timeout=20) as client:
        first = await client.post("/api/chat/", json={"message": "Hi"})
        assert first.status_code == 200  # and the gate's lag probe runs on the server's loop
        with lagging_loop(gate):
            async with asyncio.timeout(10):
                while gate.loop_lag <= 0.1:  # noqa: ASYNC110 (another thread's value)
                    await asyncio.sleep(0.05)
            client.cookies.clear()
            refused = await client.post("/api/chat/", json={"message": "Hi again"})
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
        assert refused.json()["code"] == "server_busy" and refused.json()["retryable"] is True
        metrics = (await client.get("/metrics")).text
        assert 'chatbot_answers_shed_total{cause="loop_lag"}' in metrics
        async with asyncio.timeout(10):
            while gate.loop_lag > 0.1:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        client.cookies.clear()
        again = await client.post("/api/chat/", json={"message": "Hi once more"})
        assert again.status_code == 200 and again.json()["success"] is True
    assert gate.starting == 0


async def test_a_lagging_worker_refuses_a_websocket_answer_in_a_frame_and_keeps_the_socket(
    live_server_url, upstream, chatbot_settings
):
    # The WebSocket's starts pass the same gate as HTTP's: refused in an error frame that
    # says when to retry, nothing saved, and the socket (with its other answers) stays open.
    from chatbot_api.models import Message

    chatbot_settings(MAX_STARTING_ANSWERS=8, MAX_LOOP_LAG=0.1)
    gate = answer_admission()
    async with new_browser(live_server_url) as client:
        cookie = "; ".join(f"{k}={v}" for k, v in client.cookies.items())
    ws_url = live_server_url.replace("http://", "ws://") + "/ws/chat/"

    async def answer(ws, text: str) -> str:
        await ws.send(json.dumps({"type": "chat", "message": text}))
        events = []
        while not events or events[-1]["type"] not in ("done", "error"):
            events.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
        return "".join(e["text"] for e in events if e["type"] == "delta")

    async with websockets.connect(
        ws_url, additional_headers={"Cookie": cookie}, origin=live_server_url
    ) as ws:
        upstream.enqueue(Script(chunks=["first"]))
        assert await answer(ws, "Hi") == "first"  # and the gate's lag probe runs on the server's loop
        with lagging_loop(gate):
            async with asyncio.timeout(10):
                while gate.loop_lag <= 0.1:  # noqa: ASYNC110 (another thread's value)
                    await asyncio.sleep(0.05)
            await ws.send(json.dumps({"type": "chat", "message": "Refused", "request_id": "r2"}))
            refused = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert {
            k: refused[k] for k in ("type", "code", "retryable", "retry_safe", "retry_after", "request_id")
        } == {
            "type": "error",
            "code": "server_busy",
            "retryable": True,
            "retry_safe": True,
            "retry_after": 1,
            "request_id": "r2",
        }
        async with asyncio.timeout(10):
            while gate.loop_lag > 0.1:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        upstream.enqueue(Script(chunks=["again"]))
        assert await answer(ws, "Hi again") == "again"
    assert not await Message.objects.filter(content="Refused").aexists()
    assert gate.starting == 0


async def test_a_json_mode_answer_stops_counting_as_starting_once_its_model_request_is_out(
    live_server_url, upstream, chatbot_settings
):
    # A JSON-mode answer holds its response until the answer is whole; the gate must count
    # it only while it starts, or one slow JSON answer would refuse everybody else.
    chatbot_settings(MAX_STARTING_ANSWERS=1, MAX_LOOP_LAG=0)
    upstream.enqueue(Script(chunks=["Piano", " piano"], interval=0.5))
    gate = answer_admission()
    async with httpx.AsyncClient(base_url=live_server_url, timeout=20) as client:
        slow = asyncio.create_task(client.post("/api/chat/", json={"message": "Slowly"}))
        await asyncio.to_thread(upstream.wait_for_request, 1, 10)
        async with asyncio.timeout(10):
            while gate.starting:  # noqa: ASYNC110 (another thread's counter)
                await asyncio.sleep(0.01)
        assert not slow.done()  # still being written, no longer starting
        quick = await client.post(
            "/api/chat/", json={"message": "Meanwhile"}
        )  # no cookie yet: the slow one has not answered
        assert quick.status_code == 200 and quick.json()["success"] is True
        answer = await slow
        assert answer.status_code == 200 and answer.json()["response"] == "Piano piano"
    assert gate.starting == 0
