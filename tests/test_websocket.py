"""WebSocket transport through Channels' WebsocketCommunicator: the same events, stop, resume, ownership."""

from __future__ import annotations

import pytest
from channels.testing import WebsocketCommunicator

from chatbot.asgi import application
from chatbot_api.models import Message
from tests.support.clients import browser_session, receive_until_terminal, websocket
from tests.support.fake_openai import Script

pytestmark = [pytest.mark.django_db(transaction=True)]


async def connect(session_key: str | None = None) -> WebsocketCommunicator:
    return await websocket(session_key=session_key)


async def test_chat_streams_the_same_events(upstream, manager):
    upstream.enqueue(Script(chunks=["web", "socket"], usage={"prompt_tokens": 5, "completion_tokens": 2}))
    ws = await connect(await browser_session())

    await ws.send_json_to({"type": "chat", "message": "Hi", "request_id": "req-7"})
    accepted = await ws.receive_json_from(timeout=5)
    events = await receive_until_terminal(ws)

    assert accepted == {
        "type": "accepted",
        "request_id": "req-7",
        "message_id": events[0]["message_id"],
        "session_id": events[0]["session_id"],
    }

    assert [e["type"] for e in events] == ["meta", "delta", "delta", "usage", "done"]
    assert [e["seq"] for e in events] == [1, 2, 3, 4, 5]
    assert "".join(e["text"] for e in events if e["type"] == "delta") == "websocket"
    assert events[3]["prompt_tokens"] == 5 and events[-1]["status"] == "complete"
    message = await Message.objects.aget(pk=events[0]["message_id"])
    assert message.content == "websocket" and message.status == "complete"
    await ws.disconnect()


async def test_continue_conversation_and_resume(upstream, manager):
    session = await browser_session()
    ws = await connect(session)
    await ws.send_json_to({"type": "chat", "message": "one"})
    first = await receive_until_terminal(ws)

    upstream.enqueue(Script(chunks=["a", "b", "c", "d"]))
    await ws.send_json_to({"type": "chat", "message": "two", "session_id": first[0]["session_id"]})
    second = await receive_until_terminal(ws)
    assert upstream.history[-1].messages[-2] == {"role": "assistant", "content": "Hello world!"}

    await ws.send_json_to({"type": "resume", "message_id": second[0]["message_id"], "after": 2})
    resumed = await receive_until_terminal(ws)
    assert resumed == second[2:]
    await ws.disconnect()


async def test_stop_over_websocket(upstream, manager):
    upstream.enqueue(Script(chunks=["x", "y", "z"], hang_after=1))
    ws = await connect(await browser_session())
    await ws.send_json_to({"type": "chat", "message": "Hi"})
    head = await receive_until_terminal(ws, limit=2)

    await ws.send_json_to({"type": "stop", "message_id": head[0]["message_id"]})
    rest = await receive_until_terminal(ws)

    assert rest[-1]["type"] == "done" and rest[-1]["status"] == "stopped"
    assert (await upstream.wait_for_disconnect_async()).disconnected
    message = await Message.objects.aget(pk=head[0]["message_id"])
    assert (message.status, message.content) == ("stopped", "x")
    await ws.disconnect()


async def test_disconnect_leaves_the_answer_running(upstream, manager):
    upstream.enqueue(Script(chunks=["a", "b", "c"], interval=0.05))
    session = await browser_session()
    ws = await connect(session)
    await ws.send_json_to({"type": "chat", "message": "Hi"})
    head = await receive_until_terminal(ws, limit=2)
    await ws.disconnect()

    again = await connect(session)
    await again.send_json_to({"type": "resume", "message_id": head[0]["message_id"], "after": 2})
    rest = await receive_until_terminal(again)

    assert "".join(e["text"] for e in head + rest if e["type"] == "delta") == "abc"
    assert [e["seq"] for e in head + rest] == list(range(1, len(head + rest) + 1))
    await again.disconnect()


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ({"type": "chat", "message": ""}, "invalid"),
        ({"type": "chat", "message": "x" * 1001}, "invalid"),
        (
            {"type": "chat", "message": "hi", "session_id": "00000000-0000-0000-0000-000000000000"},
            "conversation_not_found",
        ),
        (
            {"type": "resume", "message_id": "00000000-0000-0000-0000-000000000000", "after": 0},
            "message_not_found",
        ),
        ({"type": "resume", "message_id": "00000000-0000-0000-0000-000000000000", "after": -1}, "invalid"),
        ({"type": "stop", "message_id": "nope"}, "message_not_found"),
        ({"type": "dance"}, "invalid"),
        ([1, 2], "invalid"),
    ],
)
async def test_bad_requests_get_error_frames(upstream, manager, frame, code):
    ws = await connect(await browser_session())
    await ws.send_json_to(frame if not isinstance(frame, dict) else {**frame, "request_id": "r1"})
    error = await ws.receive_json_from(timeout=5)
    assert error["type"] == "error" and error["code"] == code and error["message"]
    assert "seq" not in error
    if isinstance(frame, dict):
        assert error["request_id"] == "r1"
    await ws.disconnect()


async def test_another_session_cannot_resume_or_stop(upstream, manager):
    upstream.enqueue(Script(chunks=["secret"], hang_after=1))
    owner = await connect(await browser_session())
    await owner.send_json_to({"type": "chat", "message": "Hi"})
    head = await receive_until_terminal(owner, limit=2)
    stranger = await connect(await browser_session())

    for frame in [
        {"type": "resume", "message_id": head[0]["message_id"], "after": 0},
        {"type": "stop", "message_id": head[0]["message_id"]},
        {"type": "chat", "message": "mine now", "session_id": head[0]["session_id"]},
    ]:
        await stranger.send_json_to(frame)
        error = await stranger.receive_json_from(timeout=5)
        assert error["type"] == "error" and error["code"].endswith("not_found")
    assert (await Message.objects.aget(pk=head[0]["message_id"])).status in ("pending", "streaming")
    await owner.send_json_to({"type": "stop", "message_id": head[0]["message_id"]})
    await receive_until_terminal(owner)
    await owner.disconnect()
    await stranger.disconnect()


async def test_foreign_origin_is_refused(manager):
    communicator = WebsocketCommunicator(
        application, "/ws/chat/", headers=[(b"origin", b"http://evil.example"), (b"host", b"localhost")]
    )
    connected, _ = await communicator.connect()
    assert not connected


async def test_regenerate_over_websocket(upstream, manager):
    ws = await connect(await browser_session())
    await ws.send_json_to({"type": "chat", "message": "Hi"})
    first = await receive_until_terminal(ws)
    upstream.enqueue(Script(chunks=["again"]))

    await ws.send_json_to({"type": "regenerate", "message_id": first[0]["message_id"], "request_id": "g1"})
    accepted = await ws.receive_json_from(timeout=5)
    events = await receive_until_terminal(ws)

    assert accepted["type"] == "accepted" and accepted["request_id"] == "g1"
    assert accepted["message_id"] == events[0]["message_id"] != first[0]["message_id"]
    assert "".join(e["text"] for e in events if e["type"] == "delta") == "again"
    assert not await Message.objects.filter(pk=first[0]["message_id"]).aexists()
    await ws.disconnect()


async def test_a_busy_database_is_an_error_frame_to_retry(upstream, manager, monkeypatch):
    from django.db import OperationalError

    from chatbot_api import services

    def busy(**kwargs):
        raise OperationalError("couldn't get a connection after 30.00 sec")

    monkeypatch.setattr(services, "_create_turn", busy)
    ws = await connect(await browser_session())
    await ws.send_json_to({"type": "chat", "message": "Hi", "request_id": "r1"})
    error = await ws.receive_json_from(timeout=5)
    assert (error["type"], error["code"], error["retryable"], error["request_id"]) == (
        "error",
        "server_busy",
        True,
        "r1",
    )
    await ws.send_json_to({"type": "dance"})  # the socket stays usable
    assert (await ws.receive_json_from(timeout=5))["code"] == "invalid"
    await ws.disconnect()
