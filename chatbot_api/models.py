import uuid

from django.conf import settings
from django.db import models


class Conversation(models.Model):
    """A chat: its id is the `session_id` of the seed's API.

    Owned by a signed-in user, or, for anonymous use, by the browser session that
    started it (`session_key`).
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="conversations",
    )
    session_key = models.CharField(max_length=40, blank=True, db_index=True)
    title = models.CharField(max_length=200, blank=True)
    # The model its answers are asked of, when the user picked one ("": the configured default).
    model = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True, db_index=True)

    class Meta:
        ordering = ["-updated_at"]

    def __str__(self):
        return self.title or str(self.id)


class Message(models.Model):
    class Role(models.TextChoices):
        USER = "user"
        ASSISTANT = "assistant"

    class Status(models.TextChoices):
        PENDING = "pending"
        STREAMING = "streaming"
        COMPLETE = "complete"
        STOPPED = "stopped"
        FAILED = "failed"
        INTERRUPTED = "interrupted"

    LIVE_STATUSES = (Status.PENDING, Status.STREAMING)

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    conversation = models.ForeignKey(Conversation, on_delete=models.CASCADE, related_name="messages")
    role = models.CharField(max_length=16, choices=Role.choices)
    content = models.TextField(blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.COMPLETE, db_index=True)

    # Generation facts, for assistant messages.
    provider = models.CharField(max_length=32, blank=True)
    model = models.CharField(max_length=200, blank=True)
    prompt_tokens = models.PositiveIntegerField(null=True, blank=True)
    completion_tokens = models.PositiveIntegerField(null=True, blank=True)
    tokens_estimated = models.BooleanField(
        default=False, help_text="True when the provider sent no usage and the counts are estimates."
    )
    ttft_ms = models.FloatField("time to first token (ms)", null=True, blank=True)
    duration_ms = models.FloatField(null=True, blank=True)
    finish_reason = models.CharField(max_length=32, blank=True)
    error_code = models.CharField(max_length=64, blank=True)
    error_message = models.TextField(blank=True)

    # Which process runs the generation and when it last said so; the orphan sweep
    # marks `streaming` messages whose owner went quiet as `interrupted`.
    worker = models.CharField(max_length=128, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    # Whom the answer is charged to, and whether it holds a concurrency slot: whoever
    # ends it (its worker, or the sweep after that worker died) gives the slot back.
    client_key = models.CharField(max_length=128, blank=True)
    holds_slot = models.BooleanField(default=False)
    # How the client asked for the answer ("json", "sse", "ndjson", "websocket") and the
    # seed's `streaming` flag, so a page shows it the same way after a reload.
    transport = models.CharField(max_length=16, blank=True)
    streaming = models.BooleanField(default=False)
    # The seq of the answer's terminal event, once it ended: a resume at or past it has
    # nothing left to read, and events rebuilt from the database keep the log's numbering.
    last_seq = models.PositiveIntegerField(null=True, blank=True)
    # How many times the answer was continued after the token limit cut it: the part being
    # written now is this number (0: the first), and each part has its own usage record.
    continuations = models.PositiveSmallIntegerField(default=0)

    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["created_at"]
        indexes = [models.Index(fields=["status", "heartbeat_at"])]

    def __str__(self):
        return f"{self.role}: {self.content[:60]}"

    @property
    def is_live(self) -> bool:
        return self.status in self.LIVE_STATUSES


class UsageRecord(models.Model):
    """One answer's cost and outcome, kept for accounting even if its conversation is deleted."""

    message = models.ForeignKey(
        Message, null=True, blank=True, on_delete=models.SET_NULL, related_name="usage_records"
    )
    # Which part of the answer: 0 the answer as first written, n its n-th continuation.
    part = models.PositiveSmallIntegerField(default=0)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="usage_records",
    )
    # Anonymous answers: the browser session that asked (the usage page shows it its own).
    session_key = models.CharField(max_length=40, blank=True, db_index=True)
    # The rate-limit identity: "user:<id>" or "ip:<address>" for anonymous use.
    client_key = models.CharField(max_length=128, db_index=True)
    provider = models.CharField(max_length=32)
    model = models.CharField(max_length=200)
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    estimated = models.BooleanField(default=False)
    ttft_ms = models.FloatField("time to first token (ms)", null=True, blank=True)
    duration_ms = models.FloatField(null=True, blank=True)
    outcome = models.CharField(max_length=16, choices=Message.Status.choices, db_index=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            # One record per part: the generation and the orphan sweep may both try to write it.
            models.UniqueConstraint(fields=["message", "part"], name="one_usage_record_per_answer_part")
        ]

    def __str__(self):
        return f"{self.client_key} {self.model} {self.prompt_tokens}+{self.completion_tokens}"

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class UserQuota(models.Model):
    """Per-user overrides of the rate limits; empty fields use the defaults from settings (0 = unlimited)."""

    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="chat_quota")
    requests_per_minute = models.PositiveIntegerField(null=True, blank=True)
    concurrent_streams = models.PositiveIntegerField(null=True, blank=True)
    tokens_per_day = models.PositiveIntegerField(null=True, blank=True)

    def __str__(self):
        return f"quota of {self.user}"
