from django.contrib import admin
from django.contrib.auth import get_user_model
from django.contrib.auth.admin import UserAdmin

from .models import Conversation, Message, UsageRecord, UserQuota


class MessageInline(admin.TabularInline):
    model = Message
    extra = 0
    fields = [
        "role",
        "status",
        "content",
        "model",
        "prompt_tokens",
        "completion_tokens",
        "ttft_ms",
        "duration_ms",
    ]
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
        "id",
        "role",
        "status",
        "provider",
        "model",
        "prompt_tokens",
        "completion_tokens",
        "tokens_estimated",
        "ttft_ms",
        "duration_ms",
        "created_at",
    ]
    list_filter = ["role", "status", "provider", "model", "tokens_estimated", "created_at"]
    search_fields = ["id", "conversation__id", "conversation__title"]
    # Staff may correct the text or the status (e.g. of a stuck answer); the facts stay as recorded.
    readonly_fields = [f.name for f in Message._meta.fields if f.name not in ("content", "status")]
    date_hierarchy = "created_at"


@admin.register(UsageRecord)
class UsageRecordAdmin(admin.ModelAdmin):
    list_display = [
        "created_at",
        "user",
        "client_key",
        "provider",
        "model",
        "prompt_tokens",
        "completion_tokens",
        "estimated",
        "ttft_ms",
        "duration_ms",
        "outcome",
    ]
    list_filter = ["outcome", "provider", "model", "estimated", "created_at", "user"]
    search_fields = ["user__username", "client_key", "model"]
    date_hierarchy = "created_at"
    readonly_fields = [f.name for f in UsageRecord._meta.fields]

    def has_add_permission(self, request):
        return False


@admin.register(UserQuota)
class UserQuotaAdmin(admin.ModelAdmin):
    list_display = ["user", "requests_per_minute", "concurrent_streams", "tokens_per_day"]
    search_fields = ["user__username"]
    autocomplete_fields = ["user"]


class UserQuotaInline(admin.StackedInline):
    model = UserQuota
    can_delete = True
    verbose_name_plural = "Chat rate limits (empty = default, 0 = unlimited)"


User = get_user_model()
if admin.site.is_registered(User):
    user_admin_class = type(admin.site._registry[User])
    admin.site.unregister(User)
else:  # pragma: no cover  (a project without the auth admin)
    user_admin_class = UserAdmin


@admin.register(User)
class ChatUserAdmin(user_admin_class):
    inlines = [*user_admin_class.inlines, UserQuotaInline]
