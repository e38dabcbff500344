"""`/v1/`: chat completions, their resumable streams, and the model list, as OpenAI serves them."""

from __future__ import annotations

import logging

from django.http import HttpResponse
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework.response import Response

from .. import admission, selectors, services
from ..authentication import BearerTokenAuthentication, TokenAuthentication
from ..errors import NotFound, api_exception_handler, status_for_code
from ..identity import owner_for
from ..models import Message
from ..providers import get_provider
from ..streaming import follow, transports
from ..views import SEQ_SCHEMA, ApiView, after_from
from . import wire

logger = logging.getLogger("chatbot.openai_api")

STREAM_DESCRIPTION = (
    "`stream: true`: `data:` lines of `chat.completion.chunk` objects and `data: [DONE]`, each "
    "frame with an SSE `id:` (the answer's seq) to resume from with `Last-Event-ID` on "
    "`GET /v1/chat/completions/{completion_id}`. An error after the first frame is a "
    '`data: {"error": {...}}` frame.'
)


def openai_exception_handler(exc, context):
    """Every failure in OpenAI's error shape, with the status the SDK maps to its exceptions."""
    response = api_exception_handler(exc, context)
    if response is None:
        logger.exception("OpenAI API request failed", exc_info=exc)
        return Response(wire.error_object("The server had an error.", "internal", 500), status=500)
    body = response.data if isinstance(response.data, dict) else {}
    param = None
    details = body.get("details")
    if isinstance(details, dict) and details:
        param = next(iter(details))
    error = wire.error_object(
        body.get("error", "Error."), body.get("code", "error"), response.status_code, param
    )
    return Response(error, status=response.status_code, headers=dict(response.headers))


class OpenAIView(ApiView):
    # Keys only: OpenAI clients keep cookies, and a session cookie would make DRF ask them
    # for a CSRF token. Anonymous callers still get a session (their conversations' owner).
    authentication_classes = [BearerTokenAuthentication, TokenAuthentication]

    def get_exception_handler(self):
        return openai_exception_handler

    @classmethod
    def busy_body(cls, message: str, code: str, status: int) -> dict:
        return wire.error_object(message, code, status)


class ChatCompletionsView(OpenAIView):
    starts_answer = True  # admission: counted while it starts, refused when too many do

    @extend_schema(
        operation_id="openai_chat_completions",
        request=wire.ChatCompletionRequestSerializer,
        parameters=[
            OpenApiParameter(
                "X-Conversation-Id",
                str,
                OpenApiParameter.HEADER,
                description="Continue this stored conversation: send only the new question.",
            )
        ],
        responses={
            200: OpenApiResponse(
                description="A `chat.completion`, or with `stream: true` " + STREAM_DESCRIPTION
            ),
            400: OpenApiResponse(description="Invalid or unsupported request (OpenAI error shape)."),
            401: OpenApiResponse(description="Missing or unknown API token."),
            404: OpenApiResponse(description="Unknown model or conversation."),
            429: OpenApiResponse(description="A rate limit or quota: see Retry-After."),
            502: OpenApiResponse(description="The model server failed."),
            503: OpenApiResponse(description="Busy or shutting down: retry."),
            504: OpenApiResponse(description="A generation time limit was hit."),
        },
    )
    async def post(self, request):
        """Create a chat completion (OpenAI's `POST /v1/chat/completions`); saved as a conversation."""
        serializer = wire.ChatCompletionRequestSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        turn = await services.completion_start(
            owner=await owner_for(request),
            messages=data["messages"],
            model=data["model"],
            streaming=data["stream"],
            max_tokens=data["token_limit"],
            temperature=data.get("temperature"),
            stop=data.get("stop"),
            conversation_id=request.headers.get("X-Conversation-Id") or data.get("conversation_id"),
        )
        admission.started(request)  # its model request is out: what follows is relaying
        message = turn.assistant_message
        headers = {"X-Conversation-Id": str(turn.conversation.id)}
        if data["stream"]:
            events = follow.follow_events(message=message, keepalives=True)
            body = wire.completion_chunks(events, message=message, include_usage=data["include_usage"])
            response = transports.event_stream_response(body)
            for name, value in headers.items():
                response[name] = value
            return response
        return await _completion_response(message, headers=headers)


async def _completion_response(message: Message, *, headers: dict) -> Response:
    answer = await transports.collect(follow.follow_events(message=message))
    if answer.terminal.type == "error":
        terminal = answer.terminal.data
        status = status_for_code(terminal["code"])
        return Response(wire.error_object(terminal["message"], terminal["code"], status), status=status)
    body = wire.completion_object(message, text=answer.text, terminal=answer.terminal, usage=answer.usage)
    return Response(body, headers=headers)


class CompletionDetailView(OpenAIView):
    renderer_classes = [*ApiView.renderer_classes, transports.EventStreamRenderer]

    @extend_schema(
        operation_id="openai_chat_completion_retrieve",
        parameters=[
            OpenApiParameter(
                "Last-Event-ID",
                SEQ_SCHEMA,
                OpenApiParameter.HEADER,
                description="With `Accept: text/event-stream`: the frames after this seq, then live.",
            )
        ],
        responses={
            200: OpenApiResponse(
                description="The `chat.completion` so far, or its stream: " + STREAM_DESCRIPTION
            ),
            204: OpenApiResponse(description="Streaming, and the client already has the last frame."),
            404: OpenApiResponse(description="Unknown completion, or someone else's."),
        },
    )
    async def get(self, request, completion_id):
        """A completion by id: the stored answer (JSON), or its stream resumed (`Last-Event-ID`)."""
        message = await selectors.message_get(owner=await owner_for(request), message_id=completion_id)
        if message.role != Message.Role.ASSISTANT:
            raise NotFound("Completion not found.", code="not_found")
        if request.accepted_renderer.format == "sse":
            after = after_from(request)
            if not await follow.events_after(message=message, after=after):
                return HttpResponse(status=204)
            events = follow.follow_events(message=message, after=after, keepalives=True)
            body = wire.completion_chunks(events, message=message, include_usage=True, after=after)
            return transports.event_stream_response(body)
        if message.is_live:
            return Response(wire.completion_object(message, text=message.content, terminal=None, usage=None))
        return await _completion_response(message, headers={})


class ModelListView(OpenAIView):
    @extend_schema(
        operation_id="openai_models_list", responses={200: OpenApiResponse(description="A model list.")}
    )
    async def get(self, request):
        """The models this server answers with: the configured one, then the upstream's own."""
        await owner_for(request)
        provider = get_provider()
        models = [wire.model_object(model, provider.name) for model in await provider.list_models()]
        return Response({"object": "list", "data": models})


class ModelDetailView(OpenAIView):
    @extend_schema(
        operation_id="openai_models_retrieve",
        responses={
            200: OpenApiResponse(description="A model."),
            404: OpenApiResponse(description="Unknown."),
        },
    )
    async def get(self, request, model_id):
        await owner_for(request)
        provider = get_provider()
        if model_id not in await provider.list_models():
            raise NotFound(f"The model {model_id!r} does not exist here.", code="model_not_found")
        return Response(wire.model_object(model_id, provider.name))
