"""WebSocket transport: the same services and the same events as the HTTP API."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from uuid import UUID

from channels.generic.websocket import AsyncJsonWebsocketConsumer
from rest_framework.exceptions import ValidationError

from . import selectors, services
from .admission import admit_websocket_answer
from .errors import UNAVAILABLE_ERRORS, ChatbotError, api_exception_handler
from .identity import owner_for_scope
from .parsers import loads_frame
from .serializers import ChatRequestSerializer
from .streaming.follow import follow_events
from .streaming.transports import pump_websocket

logger = logging.getLogger("chatbot.websocket")

# Close code for "not allowed": the WebSocket twin of HTTP 403.
CLOSE_FORBIDDEN = 4403


class ChatConsumer(AsyncJsonWebsocketConsumer):
    """`/ws/chat/`: send `chat`, `stop` and `resume` requests, receive the answers' events.

    Several answers may stream on one socket; every event carries its `message_id`.
    A `chat` request is first answered with `{"type": "accepted", "request_id",
    "message_id", "session_id"}` (no `seq`: it is not one of the answer's events).
    Request-level errors come back as `{"type": "error", "code", "message", ...}`
    without a `seq`, echoing the request's `request_id` when one was given.
    """

    async def connect(self):
        """Called when a client opens the socket: accept it if it may chat."""
        self.owner = await owner_for_scope(self.scope)
        self.followers: dict[UUID, asyncio.Task] = {}
        if self.owner is None:
            await self.close(code=CLOSE_FORBIDDEN)
            return
        await self.accept()

    async def receive(self, text_data=None, bytes_data=None, **kwargs):
        """Called for each frame: anything but a JSON text frame gets an error frame, not a drop."""
        if text_data is None:
            await self._send_error({}, ChatbotError("Send JSON text frames, not binary.", code="invalid"))
            return
        try:
            content = loads_frame(text_data)
        except ValueError as error:
            await self._send_error({}, ChatbotError(f"Each frame must be JSON ({error}).", code="invalid"))
            return
        await self.receive_json(content, **kwargs)

    async def receive_json(self, content, **kwargs):
        """Called for each JSON frame the client sends."""
        if not isinstance(content, dict):
            await self._send_error({}, ChatbotError("Each frame must be a JSON object.", code="invalid"))
            return
        handler = {
            "chat": self._chat,
            "regenerate": self._regenerate,
            "continue": self._continue,
            "stop": self._stop,
            "resume": self._resume,
        }.get(content.get("type"))
        try:
            if handler is None:
                raise ChatbotError(
                    "`type` must be one of: chat, regenerate, continue, stop, resume.", code="invalid"
                )
            await handler(content)
        except (ChatbotError, ValidationError, *UNAVAILABLE_ERRORS) as error:
            await self._send_error(content, error)
        except Exception:  # a bug must not drop the socket and every answer it follows
            logger.exception("WebSocket request %r failed", content.get("type"))
            await self._send_error(content, ChatbotError("Internal server error.", code="server_error"))

    async def disconnect(self, code):
        """Called when the socket closes: stop following; the answers themselves go on."""
        for task in self.followers.values():
            task.cancel()
        for task in list(self.followers.values()):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _chat(self, content):
        fields = ("message", "session_id", "answer_id", "model")
        serializer = ChatRequestSerializer(data={key: content[key] for key in fields if key in content})
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        await self._start(
            content,
            functools.partial(
                services.chat_start,
                owner=self.owner,
                text=data["message"],
                session_id=data.get("session_id"),
                transport="websocket",
                answer_id=data.get("answer_id"),
                model=data.get("model"),
            ),
        )

    async def _regenerate(self, content):
        await self._start_on_answer(content, services.answer_regenerate)

    async def _continue(self, content):
        await self._start_on_answer(content, services.answer_continue)

    async def _start_on_answer(self, content, service) -> None:
        """`regenerate` and `continue`: a new answer (or part) for the one `message_id` names."""
        await self._start(
            content,
            functools.partial(
                service, owner=self.owner, message_id=content.get("message_id"), transport="websocket"
            ),
        )

    async def _start(self, content, start) -> None:
        """Start an answer through the worker's load-shedding gate, as an HTTP start would:
        refused (`server_busy`, nothing saved) while the worker starts too many at once."""
        release = admit_websocket_answer(self.scope)
        try:
            turn = await start()
        finally:
            release()
        await self._accept_and_follow(content, turn)

    async def _accept_and_follow(self, content, turn) -> None:
        # Tells the client which answer its request started, before the answer's first event.
        await self.send_json(
            {
                "type": "accepted",
                "request_id": content.get("request_id"),
                "message_id": str(turn.assistant_message.id),
                "session_id": str(turn.conversation.id),
            }
        )
        self._follow(turn.assistant_message, after=0)

    async def _stop(self, content):
        await services.message_stop(owner=self.owner, message_id=content.get("message_id"))

    async def _resume(self, content):
        after = content.get("after", 0)
        if not isinstance(after, int) or isinstance(after, bool) or after < 0:
            raise ChatbotError("`after` must be a non-negative integer.", code="invalid")
        message = await selectors.message_get(owner=self.owner, message_id=content.get("message_id"))
        self._follow(message, after=after)

    def _follow(self, message, *, after: int) -> None:
        previous = self.followers.pop(message.id, None)
        if previous is not None:
            previous.cancel()  # a resume replaces an older reader of the same answer
        task = asyncio.create_task(self._pump(message, after))
        self.followers[message.id] = task
        task.add_done_callback(lambda done: self._forget(message.id, done))

    def _forget(self, message_id: UUID, task: asyncio.Task) -> None:
        if self.followers.get(message_id) is task:
            del self.followers[message_id]

    async def _pump(self, message, after: int) -> None:
        await pump_websocket(
            follow_events(message=message, after=after), lambda text: self.send(text_data=text)
        )

    async def _send_error(self, content: dict, error: Exception) -> None:
        response = api_exception_handler(error, {})
        frame = {"type": "error", **{k: v for k, v in response.data.items() if k != "success"}}
        frame["message"] = frame.pop("error")
        frame.setdefault("retryable", False)
        if "request_id" in content:
            frame["request_id"] = content["request_id"]
        await self.send_json(frame)
