"""Small client helpers shared by the test modules."""

from __future__ import annotations

import asyncio
import time

from channels.testing import WebsocketCommunicator
from django.test import AsyncClient

from chatbot.asgi import application
from chatbot_api.models import Message


async def browser_session() -> str:
    """Open the page like a browser and return its session key."""
    client = AsyncClient()
    await client.get("/")
    return client.cookies["sessionid"].value


async def websocket(
    *, session_key: str | None = None, token: str | None = None, origin: bytes = b"http://localhost"
) -> WebsocketCommunicator:
    """A connected `/ws/chat/` communicator as a page (session cookie) or a script (token) opens it."""
    headers = [(b"origin", origin), (b"host", b"localhost")]
    if session_key:
        headers.append((b"cookie", f"sessionid={session_key}".encode()))
    if token:
        headers.append((b"authorization", f"Token {token}".encode()))
    communicator = WebsocketCommunicator(application, "/ws/chat/", headers=headers)
    connected, _ = await communicator.connect()
    assert connected
    return communicator


async def wait_for_status(message_id, statuses, timeout: float = 5.0) -> Message:
    """The message once its status is one of `statuses` (or as it is when `timeout` runs out)."""
    deadline = time.monotonic() + timeout
    while True:
        message = await Message.objects.aget(pk=message_id)
        if message.status in statuses or time.monotonic() > deadline:
            return message
        await asyncio.sleep(0.02)


async def post_chat(client: AsyncClient, body: dict | str = "Hi", **extra):
    """`POST /api/chat/` with `body` (a dict, or just the message) as JSON; `extra` as the client takes it."""
    if isinstance(body, str):
        body = {"message": body}
    return await client.post("/api/chat/", body, content_type="application/json", **extra)


async def start_sse(client: AsyncClient, body: dict | str = "Hi"):
    """An answer started over SSE: the streaming response, checked to be one."""
    response = await post_chat(client, body, headers={"Accept": "text/event-stream"})
    assert response.status_code == 200, response.content
    assert response["Content-Type"] == "text/event-stream"
    return response


async def receive_until_terminal(communicator, *, limit: int | None = None, timeout: float = 5) -> list[dict]:
    """A WebSocket's frames (without `accepted`) to the first terminal event, or `limit` of them."""
    events = []
    while True:
        event = await communicator.receive_json_from(timeout=timeout)
        if event["type"] == "accepted":
            continue
        events.append(event)
        if event["type"] in ("done", "error") or (limit and len(events) >= limit):
            return events
