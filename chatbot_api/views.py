"""HTTP API: thin views that validate, call one service, and pick a transport."""

from __future__ import annotations

from adrf.views import APIView as AsyncAPIView
from asgiref.sync import sync_to_async
from django.conf import settings
from django.http import HttpResponse
from drf_spectacular.openapi import AutoSchema
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from drf_spectacular.views import SpectacularAPIView
from rest_framework import status
from rest_framework.authtoken.views import ObtainAuthToken
from rest_framework.exceptions import UnsupportedMediaType
from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.parsers import FormParser, MultiPartParser
from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response
from rest_framework.settings import api_settings

from . import __version__, admission, export, login_throttle, selectors, services
from .authentication import BearerTokenAuthentication, CsrfSessionAuthentication, TokenAuthentication
from .errors import ChatbotError, api_exception_handler, error_body, status_for_code
from .identity import owner_for
from .lookups import MISSING, token_users
from .models import Message
from .parsers import SafeJSONParser
from .permissions import ChatAccess
from .providers import get_provider
from .serializers import (
    ChatRequestSerializer,
    ChatResponseSerializer,
    ConversationDetailSerializer,
    ConversationSerializer,
    ConversationUpdateSerializer,
    EditRequestSerializer,
    MessageSerializer,
    ModelListSerializer,
    RegenerateRequestSerializer,
    StopResponseSerializer,
    StreamEventSerializer,
    TokenRequestSerializer,
    UsageReportSerializer,
)
from .streaming import follow, transports

EVENTS_DESCRIPTION = (
    "Events are JSON objects with `type`, `seq` and `message_id`: `meta`, `delta` {text}, `usage`, then "
    "exactly one terminal `done` {status, finish_reason} or `error` {code, message, retryable}. "
    "See docs/streaming.md."
)


class _WithoutFormatOverride:
    """DRF's settings, minus `?format=`: the API picks renderers by the Accept header alone."""

    URL_FORMAT_OVERRIDE = None

    def __getattr__(self, name):
        return getattr(api_settings, name)


class AcceptOnlyNegotiation(DefaultContentNegotiation):
    settings = _WithoutFormatOverride()


class ApiPolicy:
    """The API's own DRF policy, so a site's REST_FRAMEWORK settings never change it."""

    content_negotiation_class = AcceptOnlyNegotiation
    metadata_class = None  # no OPTIONS metadata: 405, as for any method an endpoint lacks

    authentication_classes = [TokenAuthentication, BearerTokenAuthentication, CsrfSessionAuthentication]
    permission_classes = [ChatAccess]
    parser_classes = [SafeJSONParser]
    renderer_classes = [JSONRenderer]
    schema = AutoSchema()

    def get_exception_handler(self):
        return api_exception_handler

    @classmethod
    def busy_body(cls, message: str, code: str, status: int) -> dict:
        """The error body of a request refused before it reached the view (`admission`).

        `retry_safe`: nothing of it was read or saved, so sending it again as is cannot
        repeat the question (the page does, after Retry-After)."""
        return error_body(message, code, retryable=True, retry_safe=True)


# Authenticators that query nothing for a request without a session cookie and with no API
# token or a remembered one: `initial()` may run them on the event loop.
INLINE_AUTHENTICATION = (TokenAuthentication, CsrfSessionAuthentication)


class ApiView(ApiPolicy, AsyncAPIView):
    """Base of the API views: errors are always JSON, whatever the client asked to receive."""

    async def async_dispatch(self, request, *args, **kwargs):
        """adrf's, except that `initial()` (negotiation, authentication, permissions) runs on the
        event loop when it needs no database; adrf always runs it on a thread, a hop on the
        path of every answer's first token."""
        self.args, self.kwargs = args, kwargs
        request = self.initialize_request(request, *args, **kwargs)
        self.request = request
        self.headers = self.default_response_headers
        try:
            if self.initial_needs_database(request):
                await sync_to_async(self.initial)(request, *args, **kwargs)
            else:
                self.initial(request, *args, **kwargs)
            method = request.method.lower()
            handler = getattr(self, method, None) if method in self.http_method_names else None
            if handler is None:
                self.http_method_not_allowed(request)  # raises: 405 in the error shape
            response = await handler(request, *args, **kwargs)  # Django: an async view's are all async
        except Exception as exc:
            response = self.handle_exception(exc)
        self.response = self.finalize_response(request, response, *args, **kwargs)
        return self.response

    def initial_needs_database(self, request) -> bool:
        """Whether authenticating this request may query: a session cookie (its session and user
        are loaded), an API token not remembered (`lookups`), a site's throttles, or an
        authenticator not known to need none. When it needs none, the remembered token is pinned
        on this request's token authenticators, so that they use what was decided on."""
        if self.throttle_classes or settings.SESSION_COOKIE_NAME in request._request.COOKIES:
            return True
        if not all(issubclass(kind, INLINE_AUTHENTICATION) for kind in self.authentication_classes):
            return True
        kind, _, key = request._request.headers.get("Authorization", "").partition(" ")
        kind, key = kind.lower(), key.strip()
        if kind == "token" or (kind == "bearer" and key not in ("", "anonymous")):
            found = token_users.get(key)
            if found is MISSING:
                return True
            for authenticator in request.authenticators:  # this request's own instances
                if isinstance(authenticator, TokenAuthentication):
                    authenticator.pinned = (key, found)
        return False

    def finalize_response(self, request, response, *args, **kwargs):
        if isinstance(response, Response) and response.status_code >= 400:
            request.accepted_renderer = JSONRenderer()
            request.accepted_media_type = JSONRenderer.media_type
        return super().finalize_response(request, response, *args, **kwargs)


# The new answer of chat, regenerate and edit, in each negotiated transport.
ANSWER_RESPONSES = {
    (200, "application/json"): OpenApiResponse(
        ChatResponseSerializer, description="The assembled answer (the seed's contract)."
    ),
    (200, "text/event-stream"): OpenApiResponse(
        StreamEventSerializer,
        description="Server-Sent Events: `event:` type, `id:` seq, `data:` the event. " + EVENTS_DESCRIPTION,
    ),
    (200, "application/x-ndjson"): OpenApiResponse(
        StreamEventSerializer, description="One event per line. " + EVENTS_DESCRIPTION
    ),
}
# `after` / `Last-Event-ID`: a seq to read after.
SEQ_SCHEMA = {"type": "integer", "minimum": 0}


class ChatView(ApiView):
    starts_answer = True  # admission: counted while it starts, refused when too many do
    renderer_classes = [JSONRenderer, transports.EventStreamRenderer, transports.NDJSONRenderer]

    @extend_schema(
        request=ChatRequestSerializer,
        responses={
            **ANSWER_RESPONSES,
            400: OpenApiResponse(description="Invalid input: `{success: false, error, code, details}`."),
            404: OpenApiResponse(description="Unknown `session_id`."),
            502: OpenApiResponse(description="The model server failed; the message is saved as failed."),
            504: OpenApiResponse(description="A generation time limit was hit."),
        },
    )
    async def post(self, request):
        """Send a message; get the answer assembled (JSON) or streamed (SSE / NDJSON)."""
        serializer = ChatRequestSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        owner = await owner_for(request)
        transport = request.accepted_renderer.format
        turn = await services.chat_start(
            owner=owner,
            text=data["message"],
            session_id=data.get("session_id"),
            transport=transport,
            streaming=data["streaming"],
            answer_id=data.get("answer_id"),
            model=data.get("model"),
        )
        return await answer_response(request, turn, transport=transport, is_streaming=data["streaming"])


async def answer_response(request, turn: services.Turn, *, transport: str, is_streaming: bool):
    """The new answer in the negotiated transport: a stream, or the seed's assembled JSON."""
    admission.started(request)  # its model request is out: what follows is relaying
    message = turn.assistant_message
    if transport == "sse":
        return transports.sse_response(follow.follow_events(message=message, keepalives=True))
    if transport == "ndjson":
        return transports.ndjson_response(follow.follow_events(message=message, keepalives=True))
    answer = await transports.collect(follow.follow_events(message=message))
    body = {
        "response": answer.text,
        "session_id": str(turn.conversation.id),
        "message_id": str(turn.assistant_message.id),
        "question_id": str(turn.user_message.id),
        "success": answer.terminal.type == "done",
        "is_streaming": is_streaming,
        "is_final": True,
        "status": answer.terminal.data.get("status", Message.Status.FAILED),
        "finish_reason": answer.terminal.data.get("finish_reason", "error"),
        "model": answer.meta.get("model", ""),
        "provider": answer.meta.get("provider", ""),
        "usage": answer.usage,
    }
    if answer.terminal.type == "error":
        terminal = answer.terminal.data
        body.update(error=terminal["message"], code=terminal["code"], retryable=terminal["retryable"])
        return Response(body, status=status_for_code(terminal["code"]))
    return Response(body)


class MessageRegenerateView(ApiView):
    starts_answer = True
    renderer_classes = ChatView.renderer_classes

    @extend_schema(
        request=RegenerateRequestSerializer,
        responses={
            **ANSWER_RESPONSES,
            409: OpenApiResponse(description="The answer is still being written."),
        },
    )
    async def post(self, request, message_id):
        """Answer the last question again: the last answer is replaced, in any transport."""
        transport = request.accepted_renderer.format
        try:
            body = request.data or {}
        except UnsupportedMediaType:  # the body is optional: a bare POST (any content type) is fine
            body = {}
        serializer = RegenerateRequestSerializer(data=body)
        serializer.is_valid(raise_exception=True)
        turn = await services.answer_regenerate(
            owner=await owner_for(request),
            message_id=message_id,
            transport=transport,
            answer_id=serializer.validated_data.get("answer_id"),
        )
        return await answer_response(request, turn, transport=transport, is_streaming=transport != "json")


class MessageContinueView(ApiView):
    starts_answer = True
    renderer_classes = ChatView.renderer_classes

    @extend_schema(
        request=None,
        responses={
            **ANSWER_RESPONSES,
            409: OpenApiResponse(description="The answer is being written (or continued) already."),
        },
    )
    async def post(self, request, message_id):
        """Continue the last answer where the token limit cut it: the same answer grows.

        Streams (or assembles) the whole answer: its text so far comes first, as a `snapshot`.
        """
        transport = request.accepted_renderer.format
        turn = await services.answer_continue(
            owner=await owner_for(request), message_id=message_id, transport=transport
        )
        return await answer_response(request, turn, transport=transport, is_streaming=transport != "json")


class MessageEditView(ApiView):
    starts_answer = True
    renderer_classes = ChatView.renderer_classes

    @extend_schema(
        request=EditRequestSerializer,
        responses={
            **ANSWER_RESPONSES,
            409: OpenApiResponse(description="An answer of the conversation is being written."),
        },
    )
    async def post(self, request, message_id):
        """Send an edited question in place of a sent one; it and every later turn are replaced."""
        serializer = EditRequestSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        transport = request.accepted_renderer.format
        turn = await services.question_edit(
            owner=await owner_for(request),
            message_id=message_id,
            text=serializer.validated_data["message"],
            transport=transport,
            answer_id=serializer.validated_data.get("answer_id"),
        )
        return await answer_response(request, turn, transport=transport, is_streaming=transport != "json")


def after_from(request) -> int:
    raw = request.headers.get("Last-Event-ID") or request.query_params.get("after") or "0"
    try:
        after = int(raw)
    except ValueError:
        after = -1
    if after < 0:
        raise ChatbotError("`after` / Last-Event-ID must be a non-negative integer.", code="invalid")
    return min(after, MAX_SEQ)  # any larger value is past the end of every answer


MAX_SEQ = 2**53


class MessageEventsView(ApiView):
    renderer_classes = [transports.EventStreamRenderer, JSONRenderer]

    @extend_schema(
        parameters=[
            OpenApiParameter("after", SEQ_SCHEMA, description="Resume after this seq (default 0)."),
            OpenApiParameter(
                "Last-Event-ID",
                SEQ_SCHEMA,
                OpenApiParameter.HEADER,
                description="Sent by EventSource on reconnect; wins over `after`.",
            ),
        ],
        responses={
            (200, "text/event-stream"): OpenApiResponse(
                StreamEventSerializer, description=EVENTS_DESCRIPTION
            ),
            204: OpenApiResponse(
                description="The answer ended and the client already has its terminal event "
                "(`after` is at or past it): nothing to read. Makes `EventSource` stop reconnecting."
            ),
            404: OpenApiResponse(description="Unknown message, or someone else's."),
            503: OpenApiResponse(description="The shared event log (Redis) is unreachable: retry."),
        },
    )
    async def get(self, request, message_id):
        """Replay a message's events after an offset, then follow it live to its terminal event."""
        after = after_from(request)
        message = await selectors.message_get(owner=await owner_for(request), message_id=message_id)
        if not await follow.events_after(message=message, after=after):
            return HttpResponse(status=status.HTTP_204_NO_CONTENT)
        return transports.sse_response(follow.follow_events(message=message, after=after, keepalives=True))


class MessageDetailView(ApiView):
    @extend_schema(responses=MessageSerializer)
    async def get(self, request, message_id):
        """One message with its status, text so far and generation facts."""
        message = await selectors.message_get(owner=await owner_for(request), message_id=message_id)
        return Response(MessageSerializer(message).data)


class MessageStopView(ApiView):
    @extend_schema(request=None, responses=StopResponseSerializer)
    async def post(self, request, message_id):
        """Stop an answer: the model stops, the partial text is kept as `stopped`. Idempotent."""
        message = await services.message_stop(owner=await owner_for(request), message_id=message_id)
        return Response(
            {
                "success": True,
                "message_id": str(message.id),
                "status": message.status,
                "response": message.content,
            }
        )


class TokenView(ApiPolicy, ObtainAuthToken):
    """`POST /api/token/` {username, password} -> {token}; throttled after repeated failures."""

    permission_classes = ()  # signing in needs no permission, even where anonymous chat is off
    parser_classes = (FormParser, MultiPartParser, SafeJSONParser)
    serializer_class = TokenRequestSerializer

    def post(self, request, *args, **kwargs):
        username = request.data.get("username") if isinstance(request.data, dict) else None
        try:
            login_throttle.check(request, username if isinstance(username, str) else None)
        except login_throttle.LoginThrottled as throttled:
            raise ChatbotError(
                str(throttled.args[0]),
                code="login_throttled",
                status_code=429,
                retryable=True,
                headers={"Retry-After": str(throttled.retry_after)},
            ) from None
        return super().post(request, *args, **kwargs)


class ModelsView(ApiView):
    @extend_schema(responses=ModelListSerializer)
    async def get(self, request):
        """The models answers can be asked of: the configured default, then any the provider lists."""
        await owner_for(request)
        provider = get_provider()
        return Response({"default": provider.model_id, "models": await provider.list_models()})


class UsageView(ApiView):
    @extend_schema(responses=UsageReportSerializer)
    async def get(self, request):
        """The caller's usage: today's totals, limits, and answers/tokens per day and model (30 days)."""
        report = await sync_to_async(selectors.usage_report)(owner=await owner_for(request))
        return Response(UsageReportSerializer(report).data)


class ConversationListView(ApiView):
    @extend_schema(
        parameters=[
            OpenApiParameter(
                "q",
                {"type": "string", "maxLength": selectors.SEARCH_MAX_LENGTH},
                description="Only conversations whose title or messages match these words.",
            )
        ],
        responses=ConversationSerializer(many=True),
    )
    async def get(self, request):
        """The caller's conversations, newest first (at most 200), optionally searched."""
        owner = await owner_for(request)
        query = request.query_params.get("q", "")
        conversations = [c async for c in selectors.conversation_list(owner=owner, query=query)[:200]]
        return Response(ConversationSerializer(conversations, many=True).data)


class ConversationDetailView(ApiView):
    @extend_schema(responses=ConversationDetailSerializer)
    async def get(self, request, session_id):
        """A conversation with its messages."""
        conversation = await selectors.conversation_get(
            owner=await owner_for(request), conversation_id=session_id
        )
        messages = [m async for m in selectors.conversation_messages(conversation=conversation)]
        data = ConversationSerializer(conversation).data
        data["messages"] = MessageSerializer(messages, many=True).data
        return Response(data)

    @extend_schema(request=ConversationUpdateSerializer, responses=ConversationSerializer)
    async def patch(self, request, session_id):
        """Rename a conversation."""
        serializer = ConversationUpdateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        conversation = await services.conversation_rename(
            owner=await owner_for(request),
            conversation_id=session_id,
            title=serializer.validated_data["title"],
        )
        return Response(ConversationSerializer(conversation).data)

    @extend_schema(responses={204: None})
    async def delete(self, request, session_id):
        """Delete a conversation and its messages (a running answer is stopped first)."""
        await services.conversation_delete(owner=await owner_for(request), conversation_id=session_id)
        return Response(status=status.HTTP_204_NO_CONTENT)


class ConversationExportView(ApiView):
    @extend_schema(
        parameters=[
            OpenApiParameter("as", str, enum=sorted(export.EXPORT_FORMATS), description="File format.")
        ],
        responses={
            (200, "text/markdown"): OpenApiResponse(OpenApiTypes.STR, description="As Markdown."),
            (200, "application/json"): OpenApiResponse(OpenApiTypes.OBJECT, description="As JSON."),
        },
    )
    async def get(self, request, session_id):
        """Download a conversation as a Markdown or JSON file."""
        kind = request.query_params.get("as", "markdown")
        if kind not in export.EXPORT_FORMATS:
            raise ChatbotError(f"`as` must be one of {', '.join(export.EXPORT_FORMATS)}.", code="invalid")
        conversation = await selectors.conversation_get(
            owner=await owner_for(request), conversation_id=session_id
        )
        messages = [m async for m in selectors.conversation_messages(conversation=conversation)]
        content_type, extension = export.EXPORT_FORMATS[kind]
        body = (export.as_json if kind == "json" else export.as_markdown)(conversation, messages)
        response = HttpResponse(body, content_type=content_type)
        response["Content-Disposition"] = f'attachment; filename="{export.filename(conversation, extension)}"'
        return response


class SchemaView(SpectacularAPIView):
    """`GET /api/schema/`: the chat API's OpenAPI document, whatever else the site serves."""

    custom_settings = {
        "TITLE": "Streaming Chatbot API",
        "DESCRIPTION": (
            "Chat with a language model. Answers stream as Server-Sent Events, NDJSON or "
            "WebSocket frames; every transport carries the same event schema "
            "(see docs/streaming.md)."
        ),
        "VERSION": __version__,
        "ENUM_NAME_OVERRIDES": {"MessageStatusEnum": "chatbot_api.models.Message.Status"},
        "PREPROCESSING_HOOKS": ["chatbot_api.schema.only_chatbot_endpoints"],
        "POSTPROCESSING_HOOKS": [
            "drf_spectacular.hooks.postprocess_schema_enums",
            "chatbot_api.schema.document_errors",
        ],
        "COMPONENT_SPLIT_PATCH": False,  # PATCH takes the same fields, required as they are
    }
