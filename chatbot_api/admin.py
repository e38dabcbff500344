from django.contrib import admin

from .models import Conversation, Message


class MessageInline(admin.TabularInline):
    model = Message
    extra = 0
    fields = ["role", "status", "content", "model", "prompt_tokens", "completion_tokens", "ttft_ms", "duration_ms"]
    readonly_fields = fields
    show_change_link = True
    can_delete = False


@admin.register(Conversation)
class ConversationAdmin(admin.ModelAdmin):
    list_display = ["title", "user", "session_key", "created_at", "updated_at"]
    list_filter = ["created_at"]
    search_fields = ["title", "user__username", "id"]
    readonly_fields = ["id", "created_at", "updated_at"]
    inlines = [MessageInline]


@admin.register(Message)
class MessageAdmin(admin.ModelAdmin):
    list_display = [
        "id", "role", "status", "provider", "model", "prompt_tokens", "completion_tokens", "tokens_estimated",
        "ttft_ms", "duration_ms", "created_at",
    ]
    list_filter = ["role", "status", "provider", "model", "tokens_estimated", "created_at"]
    search_fields = ["id", "conversation__id", "conversation__title"]
    readonly_fields = [
        "id", "conversation", "role", "provider", "model", "prompt_tokens", "completion_tokens",
        "tokens_estimated", "ttft_ms", "duration_ms", "finish_reason", "error_code", "error_message", "worker",
        "heartbeat_at", "created_at", "updated_at",
    ]
    date_hierarchy = "created_at"
