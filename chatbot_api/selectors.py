"""Reads: ownership-checked lookups of conversations and messages, the model's context, usage.

(Reading an answer's events is `streaming.follow`.)"""

from __future__ import annotations

from datetime import timedelta
from uuid import UUID

from django.db import connection
from django.db.models import Count, Q, QuerySet, Sum
from django.db.models.functions import TruncDate
from django.utils import timezone

from .errors import NotFound
from .identity import Owner
from .limits import rate_limiter
from .models import Conversation, Message, UsageRecord

COMPLETION_ID_PREFIX = "chatcmpl-"  # the OpenAI API names an answer chatcmpl-<message id>


def _uuid(value) -> UUID | None:
    if isinstance(value, UUID):
        return value
    try:
        return UUID(str(value).removeprefix(COMPLETION_ID_PREFIX))
    except (TypeError, ValueError, AttributeError):
        return None


SEARCH_MAX_LENGTH = 200


def conversation_list(*, owner: Owner, query: str = "") -> QuerySet[Conversation]:
    """The owner's conversations, newest first; with `query`, those whose title or text match it.

    On PostgreSQL the text is searched with its full-text search (stems and word order:
    "cats running" finds "the cat runs"), plus a plain substring match on titles; elsewhere
    (SQLite) a case-insensitive substring match on titles and messages.
    """
    conversations = Conversation.objects.filter(**owner.lookup)
    query = " ".join(query.split())[:SEARCH_MAX_LENGTH]
    if query:
        conversations = conversations.filter(pk__in=_matching(query)).distinct()
    return conversations.order_by("-updated_at")


def _matching(query: str) -> QuerySet:
    if connection.vendor == "postgresql":
        from django.contrib.postgres.search import SearchQuery, SearchVector

        words = SearchQuery(query, search_type="websearch", config="simple")
        texts = Message.objects.annotate(text=SearchVector("content", config="simple")).filter(text=words)
        titled = Conversation.objects.annotate(text=SearchVector("title", config="simple")).filter(text=words)
        return (
            Conversation.objects.filter(
                Q(pk__in=texts.values("conversation_id"))
                | Q(pk__in=titled.values("pk"))
                | Q(title__icontains=query)
            )
        ).values("pk")
    return Conversation.objects.filter(
        Q(title__icontains=query) | Q(messages__content__icontains=query)
    ).values("pk")


async def conversation_get(*, owner: Owner, conversation_id) -> Conversation:
    """The owner's conversation, or `NotFound`: someone else's looks the same as a missing one."""
    pk = _uuid(conversation_id)
    conversation = pk and await Conversation.objects.filter(pk=pk, **owner.lookup).afirst()
    if not conversation:
        raise NotFound(
            "Conversation not found: the session_id is unknown or belongs to someone else. "
            "Omit session_id to start a new conversation.",
            code="conversation_not_found",
        )
    return conversation


async def message_get(*, owner: Owner, message_id) -> Message:
    pk = _uuid(message_id)
    lookup = {f"conversation__{key}": value for key, value in owner.lookup.items()}
    message = pk and await Message.objects.filter(pk=pk, **lookup).select_related("conversation").afirst()
    if not message:
        raise NotFound("Message not found.", code="message_not_found")
    return message


def conversation_messages(*, conversation: Conversation) -> QuerySet[Message]:
    return conversation.messages.order_by("created_at")


async def conversation_context(*, conversation: Conversation, fits, before=None) -> list[dict]:
    """The earlier turns to send to the model, newest kept first, as many as `fits` allows.

    `fits(content)` answers whether one more message still fits the token budget (and
    counts it if so); turns with no text (failed before the first token) are skipped.
    """
    turns: list[dict] = []
    query = conversation.messages.exclude(content="")
    if before is not None:
        query = query.filter(created_at__lt=before)
    query = query.order_by("-created_at").values_list("role", "content")
    async for role, content in query:
        if not fits(content):
            break
        turns.append({"role": role, "content": content})
    turns.reverse()
    return turns


def usage_summary(*, owner: Owner, days: int = 30) -> list[dict]:
    """The owner's answers and tokens per UTC day and model, newest first."""
    since = timezone.now() - timedelta(days=days)
    lookup = (
        {"user_id": owner.user_id}
        if owner.user_id is not None
        else {"user__isnull": True, "session_key": owner.session_key}
    )
    return list(
        UsageRecord.objects.filter(created_at__gte=since, **lookup)
        .annotate(date=TruncDate("created_at"))
        .values("date", "provider", "model")
        .annotate(
            answers=Count("id"),
            prompt_tokens=Sum("prompt_tokens"),
            completion_tokens=Sum("completion_tokens"),
            estimated_answers=Count("id", filter=Q(estimated=True)),
        )
        .order_by("-date", "provider", "model")
    )


def usage_report(*, owner: Owner) -> dict:
    """Today's totals, the owner's limits and what the daily quota counted, and 30 days by model."""
    days = usage_summary(owner=owner)
    limits = rate_limiter.limits_for(owner.user_id)
    today = timezone.now().date()
    todays = [row for row in days if row["date"] == today]
    return {
        "today": {
            "date": today,
            "answers": sum(row["answers"] for row in todays),
            "prompt_tokens": sum(row["prompt_tokens"] for row in todays),
            "completion_tokens": sum(row["completion_tokens"] for row in todays),
        },
        "limits": {
            "requests_per_minute": limits.requests_per_minute,
            "concurrent_streams": limits.concurrent_streams,
            "tokens_per_day": limits.tokens_per_day,
            "tokens_used_today": rate_limiter.tokens_used_today(owner.rate_key),
            # Anonymous visitors share their address's limits; their own usage is `today`.
            "counted_per": "user" if owner.user_id is not None else "address",
        },
        "days": days,
    }
