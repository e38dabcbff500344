"""The OpenAI wire format: what a request may say, and the answer's events as OpenAI objects.

A stream is `data:` lines of `chat.completion.chunk` objects (role first, then content,
then one chunk with the finish reason, then the usage chunk when asked) and `data:
[DONE]`, as the official SDK parses them. Each frame also carries the answer's `seq` in
an SSE `id:` field (the SDK ignores it): a client that drops resumes from it with
`Last-Event-ID`. An error after the stream started is a `data: {"error": {...}}` frame,
which the SDK raises as `APIError`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from ..models import Message
from ..selectors import COMPLETION_ID_PREFIX
from ..streaming import events as ev
from ..streaming.eventlog import KEEPALIVE
from ..streaming.transports import SSE_KEEPALIVE, release_request_thread

DONE_FRAME = b"data: [DONE]\n\n"
# Request fields this server does not implement: refused, never silently ignored.
UNSUPPORTED = {
    "tools": "tools",
    "tool_choice": "tools",
    "functions": "function calling",
    "function_call": "function calling",
    "response_format": "structured output (response_format)",
    "logprobs": "logprobs",
    "top_logprobs": "logprobs",
    "audio": "audio output",
}
ROLES = {"system", "developer", "user", "assistant"}
MAX_STOP_SEQUENCES = 4
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


def error_object(message: str, code: str, status: int, param: str | None = None) -> dict:
    """OpenAI's error shape: `{"error": {"message", "type", "param", "code"}}`."""
    error_type = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


GAP_ERROR = error_object(
    "The stream's events expired: read the whole answer with GET on this completion's URL.", "resume_gap", 409
)


def completion_id(message: Message) -> str:
    return f"{COMPLETION_ID_PREFIX}{message.id}"


def _text_content(content) -> str:
    """A message's text: a string, or a list of text parts (images and audio are refused)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise serializers.ValidationError("only text content parts are supported")
            texts.append(part["text"])
        return "".join(texts)
    raise serializers.ValidationError("content must be a string or a list of text parts")


TEXT_PART = {
    "type": "object",
    "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}},
    "required": ["type", "text"],
}


@extend_schema_field(
    {
        "type": "object",
        "properties": {
            "role": {"type": "string", "enum": sorted(ROLES)},
            "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": TEXT_PART}]},
        },
        "required": ["role", "content"],
    }
)
class ChatMessageField(serializers.Field):
    def to_internal_value(self, data):
        if not isinstance(data, dict):
            raise serializers.ValidationError("each message is an object with role and content")
        role = data.get("role")
        if not isinstance(role, str):
            raise serializers.ValidationError("role must be a string")
        if role in {"tool", "function"}:
            raise serializers.ValidationError("tool and function messages are not supported")
        if role not in ROLES:
            raise serializers.ValidationError(f"role must be one of {', '.join(sorted(ROLES))}")
        return {
            "role": "system" if role == "developer" else role,
            "content": _text_content(data.get("content")),
        }


@extend_schema_field(
    {
        "oneOf": [
            {"type": "string", "minLength": 1},
            {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": 4},
        ],
        "nullable": True,
    }
)
class StopField(serializers.Field):
    """`stop`: one string or up to four, as OpenAI takes them; always a list inside."""

    def to_internal_value(self, data):
        stops = [data] if isinstance(data, str) else data
        if not isinstance(stops, list) or not all(isinstance(stop, str) and stop for stop in stops):
            raise serializers.ValidationError("stop must be a non-empty string or a list of them")
        if len(stops) > MAX_STOP_SEQUENCES:
            raise serializers.ValidationError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        return stops


class StreamOptionsSerializer(serializers.Serializer):
    include_usage = serializers.BooleanField(required=False, default=False)


class ChatCompletionRequestSerializer(serializers.Serializer):
    """`POST /v1/chat/completions`. Unknown fields (user, seed, top_p, ...) are accepted and ignored."""

    model = serializers.CharField(min_length=1, max_length=200)
    messages = serializers.ListField(child=ChatMessageField(), min_length=1, max_length=500)
    stream = serializers.BooleanField(required=False, default=False)
    stream_options = StreamOptionsSerializer(required=False, allow_null=True)
    max_tokens = serializers.IntegerField(required=False, allow_null=True, min_value=1)
    max_completion_tokens = serializers.IntegerField(required=False, allow_null=True, min_value=1)
    temperature = serializers.FloatField(required=False, allow_null=True, min_value=0, max_value=2)
    n = serializers.IntegerField(required=False, allow_null=True, min_value=1, max_value=1)
    stop = StopField(required=False, allow_null=True)
    conversation_id = serializers.UUIDField(required=False, allow_null=True)

    def to_internal_value(self, data):
        if isinstance(data, dict):
            for field, feature in UNSUPPORTED.items():
                if data.get(field) not in (None, False, [], {"type": "text"}):
                    raise serializers.ValidationError({field: f"{feature} is not supported by this server"})
        return super().to_internal_value(data)

    def validate_messages(self, messages):
        if messages[-1]["role"] != "user":
            raise serializers.ValidationError("the last message must be the user's")
        if not messages[-1]["content"].strip():
            raise serializers.ValidationError("the last message is empty")
        return messages

    def validate(self, attrs):
        attrs["token_limit"] = attrs.get("max_completion_tokens") or attrs.get("max_tokens")
        attrs["include_usage"] = bool((attrs.get("stream_options") or {}).get("include_usage"))
        return attrs


def _finish_reason(terminal: ev.Event) -> str:
    reason = terminal.data.get("finish_reason") or "stop"
    return reason if reason in {"stop", "length", "content_filter"} else "stop"


def _usage_object(usage: dict | None) -> dict | None:
    if not usage:
        return None
    prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _frame(payload: dict, seq: int | None) -> bytes:
    data = ev.encode_json(payload)
    return (f"id: {seq}\ndata: {data}\n\n" if seq is not None else f"data: {data}\n\n").encode()


async def completion_chunks(
    events: AsyncIterator, *, message: Message, include_usage: bool, after: int = 0
) -> AsyncIterator[bytes]:
    """The answer's events (from `follow_events`) as OpenAI stream frames, from seq `after` on."""
    base = {
        "id": completion_id(message),
        "object": "chat.completion.chunk",
        "created": int(message.created_at.timestamp()),
        "model": message.model,
        "system_fingerprint": None,
    }

    def chunk(delta: dict, finish_reason: str | None = None) -> dict:
        return {
            **base,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }

    usage = None
    async with aclosing(events):
        await release_request_thread()
        async for item in events:
            if item is KEEPALIVE:
                yield SSE_KEEPALIVE
            elif item.type == ev.META:
                base["model"] = item.data.get("model") or base["model"]
                yield _frame(chunk({"role": "assistant", "content": ""}), item.seq)
            elif item.type == ev.DELTA:
                yield _frame(chunk({"content": item.data["text"]}), item.seq)
            elif item.type == ev.SNAPSHOT:
                if after:  # the client had part of the text, and a chunk cannot replace it
                    yield _frame(GAP_ERROR, None)
                    return
                yield _frame(chunk({"content": item.data["text"]}), item.seq)
            elif item.type == ev.USAGE:
                usage = _usage_object(item.data)  # OpenAI sends it after the finish chunk
            elif item.type == ev.DONE:
                yield _frame(chunk({}, _finish_reason(item)), item.seq)
                if include_usage:
                    yield _frame({**base, "choices": [], "usage": usage}, item.seq)
                yield DONE_FRAME
                return
            elif item.type == ev.ERROR:
                data = item.data
                status = 503 if data.get("retryable") and item.seq is None else 502
                yield _frame(error_object(data["message"], data["code"], status), item.seq)
                return


def completion_object(message: Message, *, text: str, terminal: ev.Event | None, usage: dict | None) -> dict:
    """A `chat.completion`: the whole answer."""
    return {
        "id": completion_id(message),
        "object": "chat.completion",
        "created": int(message.created_at.timestamp()),
        "model": message.model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": _finish_reason(terminal) if terminal is not None else None,
            }
        ],
        "usage": _usage_object(usage),
    }


def model_object(model_id: str, owned_by: str) -> dict:
    return {"id": model_id, "object": "model", "created": int(time.time()), "owned_by": owned_by}
