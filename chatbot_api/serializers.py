"""Request and response shapes. The seed's fields stay; new ones are additive."""

import copy

from django.core.validators import RegexValidator
from rest_framework import serializers
from rest_framework.authtoken.serializers import AuthTokenSerializer

from .models import Conversation, Message


class StrictCharField(serializers.CharField):
    """A CharField that refuses numbers and booleans instead of quietly turning them into text."""

    default_error_messages = {"invalid": "Must be a string."}

    def to_internal_value(self, data):
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictBooleanField(serializers.BooleanField):
    """A BooleanField that takes only JSON's true and false, not "yes", 1 or "on"."""

    default_error_messages = {"invalid": "Must be true or false."}

    def to_internal_value(self, data):
        if not isinstance(data, bool):
            self.fail("invalid")
        return data


# Text that is not only whitespace (DRF trims it, then refuses the empty rest); also in the schema.
NOT_BLANK = RegexValidator(r"\S", message="This field may not be blank.")


class FlatRequestSerializer(serializers.Serializer):
    """A request of plain fields (no nested serializers), validated once per request.

    DRF deep-copies every declared field for each serializer instance, which was most of
    an answer's input validation (docs/benchmarks.md). Plain fields keep no state between
    requests, so a shallow copy per field, bound afresh to this instance, is enough.
    """

    def get_fields(self):
        return {name: copy.copy(field) for name, field in self._declared_fields.items()}


class ChatRequestSerializer(FlatRequestSerializer):
    message = StrictCharField(min_length=1, max_length=1000, validators=[NOT_BLANK])
    session_id = StrictCharField(max_length=100, required=False, allow_blank=True, allow_null=True)
    streaming = StrictBooleanField(required=False, default=False)
    answer_id = serializers.UUIDField(
        required=False,
        help_text="The id the new answer gets (a UUID the client makes): it can be stopped by it "
        "before the answer comes back. 409 if it is taken.",
    )
    model = StrictCharField(
        required=False,
        min_length=1,
        max_length=200,
        help_text="One of GET /api/models/ (404 model_not_found otherwise); remembered by the "
        "conversation. Default: the conversation's, else the configured one.",
    )


class EditRequestSerializer(FlatRequestSerializer):
    message = StrictCharField(min_length=1, max_length=1000, validators=[NOT_BLANK])
    answer_id = serializers.UUIDField(required=False, help_text="As for POST /api/chat/.")


class RegenerateRequestSerializer(FlatRequestSerializer):
    answer_id = serializers.UUIDField(required=False, help_text="As for POST /api/chat/.")


class TokenUsageSerializer(serializers.Serializer):
    prompt_tokens = serializers.IntegerField()
    completion_tokens = serializers.IntegerField()
    estimated = serializers.BooleanField()


class ChatResponseSerializer(serializers.Serializer):
    response = serializers.CharField(allow_blank=True)
    session_id = serializers.CharField()
    question_id = serializers.UUIDField(required=False, help_text="The question this answers.")
    success = serializers.BooleanField()
    is_streaming = serializers.BooleanField(default=False)
    is_final = serializers.BooleanField(default=True)
    error = serializers.CharField(required=False)
    message_id = serializers.UUIDField()
    status = serializers.ChoiceField(choices=Message.Status.choices)
    finish_reason = serializers.CharField(
        required=False, help_text="stop, length (cut at CHATBOT_MAX_TOKENS), stopped or error"
    )
    model = serializers.CharField(required=False, allow_blank=True)
    provider = serializers.CharField(required=False, allow_blank=True)
    usage = TokenUsageSerializer(required=False, allow_null=True)
    code = serializers.CharField(required=False)


class MessageSerializer(serializers.ModelSerializer):
    class Meta:
        model = Message
        fields = [
            "id",
            "conversation",
            "role",
            "content",
            "status",
            "provider",
            "model",
            "prompt_tokens",
            "completion_tokens",
            "tokens_estimated",
            "ttft_ms",
            "duration_ms",
            "finish_reason",
            "error_code",
            "error_message",
            "transport",
            "streaming",
            "created_at",
        ]
        read_only_fields = fields


class ConversationSerializer(serializers.ModelSerializer):
    session_id = serializers.UUIDField(source="id", read_only=True)

    class Meta:
        model = Conversation
        fields = ["session_id", "title", "model", "created_at", "updated_at"]
        read_only_fields = ["session_id", "model", "created_at", "updated_at"]


class ConversationDetailSerializer(ConversationSerializer):
    messages = MessageSerializer(many=True, read_only=True)

    class Meta(ConversationSerializer.Meta):
        fields = [*ConversationSerializer.Meta.fields, "messages"]


class ConversationUpdateSerializer(serializers.Serializer):
    title = StrictCharField(min_length=1, max_length=200, validators=[NOT_BLANK])


class StopResponseSerializer(serializers.Serializer):
    success = serializers.BooleanField()
    message_id = serializers.UUIDField()
    status = serializers.ChoiceField(choices=Message.Status.choices)
    response = serializers.CharField(allow_blank=True)


class UsageDaySerializer(serializers.Serializer):
    date = serializers.DateField()
    provider = serializers.CharField()
    model = serializers.CharField()
    answers = serializers.IntegerField()
    prompt_tokens = serializers.IntegerField()
    completion_tokens = serializers.IntegerField()
    estimated_answers = serializers.IntegerField()


class UsageTodaySerializer(serializers.Serializer):
    date = serializers.DateField()
    answers = serializers.IntegerField()
    prompt_tokens = serializers.IntegerField()
    completion_tokens = serializers.IntegerField()


class UsageLimitsSerializer(serializers.Serializer):
    requests_per_minute = serializers.IntegerField(help_text="0 = unlimited")
    concurrent_streams = serializers.IntegerField(help_text="0 = unlimited")
    tokens_per_day = serializers.IntegerField(help_text="0 = unlimited")
    tokens_used_today = serializers.IntegerField(help_text="What the daily quota counts (per client).")
    counted_per = serializers.ChoiceField(
        choices=["user", "address"],
        help_text="Whose usage the limits count: a signed-in user's, or (anonymous) the client address's, "
        "shared by every visitor from it; the visitor's own is `today`.",
    )


class UsageReportSerializer(serializers.Serializer):
    today = UsageTodaySerializer()
    limits = UsageLimitsSerializer()
    days = UsageDaySerializer(many=True)


class StreamEventSerializer(serializers.Serializer):
    """One event of an answer's stream (SSE `data:`, an NDJSON line, or a WebSocket frame).

    Fields beyond `type`, `seq` and `message_id` depend on the type: meta (session_id,
    message_id, model, provider), delta (text), usage (prompt_tokens, completion_tokens,
    estimated), done (status, finish_reason), error (code, message, retryable).
    Exactly one terminal event (done or error) ends every stream.
    """

    type = serializers.ChoiceField(choices=["meta", "delta", "snapshot", "usage", "done", "error"])
    seq = serializers.IntegerField(
        required=False,
        help_text="Strictly increasing per message, from 1; the SSE `id:`. Absent on an `error` that "
        "ends one reader's stream, not the answer (server_shutdown, server_busy): resume.",
    )
    message_id = serializers.UUIDField()
    session_id = serializers.UUIDField(required=False, help_text="meta")
    model = serializers.CharField(required=False, help_text="meta")
    provider = serializers.CharField(required=False, help_text="meta")
    text = serializers.CharField(required=False, help_text="delta; snapshot: the whole text so far")
    prompt_tokens = serializers.IntegerField(required=False, help_text="usage")
    completion_tokens = serializers.IntegerField(required=False, help_text="usage")
    estimated = serializers.BooleanField(required=False, help_text="usage: the provider sent no counts")
    status = serializers.ChoiceField(
        choices=["complete", "stopped", "failed", "interrupted"],
        required=False,
        help_text="done: complete | stopped; error: failed | interrupted",
    )
    finish_reason = serializers.CharField(required=False, help_text="done")
    code = serializers.CharField(required=False, help_text="error")
    message = serializers.CharField(required=False, help_text="error")
    retryable = serializers.BooleanField(required=False, help_text="error")


class TokenRequestSerializer(AuthTokenSerializer):
    """`POST /api/token/`: DRF's, with the lengths in the schema (wrong credentials stay a 400)."""

    username = serializers.CharField(min_length=1, max_length=150, write_only=True)
    password = serializers.CharField(
        min_length=1, max_length=4096, trim_whitespace=False, style={"input_type": "password"}
    )


class ModelListSerializer(serializers.Serializer):
    default = serializers.CharField(help_text="The model answers use unless one is picked.")
    models = serializers.ListField(child=serializers.CharField(), help_text="The default first.")
