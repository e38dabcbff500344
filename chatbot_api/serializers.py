"""Request and response shapes. The seed's fields stay; new ones are additive."""

from rest_framework import serializers

from .models import Conversation, Message


class StrictCharField(serializers.CharField):
    """A CharField that refuses numbers and booleans instead of quietly turning them into text."""

    default_error_messages = {"invalid": "Must be a string."}

    def to_internal_value(self, data):
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


class ChatRequestSerializer(serializers.Serializer):
    message = StrictCharField(max_length=1000)
    session_id = StrictCharField(max_length=100, required=False, allow_blank=True, allow_null=True)
    streaming = serializers.BooleanField(required=False, default=False)


class UsageSerializer(serializers.Serializer):
    prompt_tokens = serializers.IntegerField()
    completion_tokens = serializers.IntegerField()
    estimated = serializers.BooleanField()


class ChatResponseSerializer(serializers.Serializer):
    response = serializers.CharField(allow_blank=True)
    session_id = serializers.CharField()
    success = serializers.BooleanField()
    is_streaming = serializers.BooleanField(default=False)
    is_final = serializers.BooleanField(default=True)
    error = serializers.CharField(required=False)
    message_id = serializers.UUIDField()
    status = serializers.ChoiceField(choices=Message.Status.choices)
    model = serializers.CharField(required=False, allow_blank=True)
    provider = serializers.CharField(required=False, allow_blank=True)
    usage = UsageSerializer(required=False, allow_null=True)
    code = serializers.CharField(required=False)


class MessageSerializer(serializers.ModelSerializer):
    class Meta:
        model = Message
        fields = [
            "id", "conversation", "role", "content", "status", "provider", "model", "prompt_tokens",
            "completion_tokens", "tokens_estimated", "ttft_ms", "duration_ms", "finish_reason",
            "error_code", "error_message", "created_at",
        ]
        read_only_fields = fields


class ConversationSerializer(serializers.ModelSerializer):
    session_id = serializers.UUIDField(source="id", read_only=True)

    class Meta:
        model = Conversation
        fields = ["session_id", "title", "created_at", "updated_at"]
        read_only_fields = ["session_id", "created_at", "updated_at"]


class ConversationDetailSerializer(ConversationSerializer):
    messages = MessageSerializer(many=True, read_only=True)

    class Meta(ConversationSerializer.Meta):
        fields = [*ConversationSerializer.Meta.fields, "messages"]


class ConversationUpdateSerializer(serializers.Serializer):
    title = StrictCharField(max_length=200)


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


class UsageSerializer(serializers.Serializer):
    today = UsageTodaySerializer()
    limits = UsageLimitsSerializer()
    days = UsageDaySerializer(many=True)
