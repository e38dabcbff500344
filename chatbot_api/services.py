"""Business logic: start an answer, follow its events, stop it; manage conversations.

Views and consumers are thin wrappers around these functions. Every transport
(JSON, SSE, NDJSON, WebSocket) starts answers with `chat_start()` and reads them
with `follow_events()`: one flow, several views of it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from functools import partial

from asgiref.sync import sync_to_async
from django.db import transaction
from django.utils import timezone

from . import events as ev
from . import metrics
from .conf import chatbot_setting
from .errors import ChatbotError, unavailable_error
from .eventlog import KEEPALIVE, LogNotFound
from .generation import EarlyStream, GenerationRequest, get_manager, terminal_event
from .limits import RateLimited, rate_limiter
from .models import Conversation, Message
from .providers import Provider, get_provider
from .selectors import Owner, conversation_context, conversation_get, message_get

Status = Message.Status
# Chat-template overhead of one message (role markers, separators), in tokens.
MESSAGE_OVERHEAD_TOKENS = 4
TITLE_LENGTH = 60
# How long a stop waits for another worker to confirm (it stops within a token or two).
STOP_WAIT = 5.0


@dataclass(slots=True)
class Turn:
    conversation: Conversation
    user_message: Message
    assistant_message: Message


async def chat_start(
    *, owner: Owner, text: str, session_id: str | None = None, transport: str = "json"
) -> Turn:
    """Save the user's message, create the answer and start generating it in the background.

    Returns at once; the answer's events are read with `follow_events()`. Raises
    `NotFound` for a `session_id` the owner does not have and `RateLimited` when a
    limit is reached; in both cases nothing is saved or started.
    """
    provider = get_provider()
    conversation = await conversation_get(owner=owner, conversation_id=session_id) if session_id else None
    prompt = await build_prompt(provider=provider, conversation=conversation, text=text)
    return await _start_answer(
        owner=owner,
        provider=provider,
        prompt=prompt,
        transport=transport,
        create=partial(_create_turn, owner=owner, conversation=conversation, text=text, provider=provider),
    )


async def answer_regenerate(*, owner: Owner, message_id, transport: str = "json") -> Turn:
    """Replace the last answer of a conversation with a new one to the same question.

    The old answer is deleted (its usage record stays); the new one is generated from
    the same history, so the question is not repeated in the model's context.
    """
    old_answer = await message_get(owner=owner, message_id=message_id)
    conversation = old_answer.conversation
    last = await conversation.messages.order_by("-created_at").afirst()
    if old_answer.role != Message.Role.ASSISTANT or last.pk != old_answer.pk:
        raise ChatbotError("Only the last answer of a conversation can be regenerated.", code="invalid")
    if old_answer.is_live:
        raise ChatbotError(
            "This answer is still being written: stop it first.", code="conflict", status_code=409
        )
    question = (
        await conversation.messages.filter(role=Message.Role.USER, created_at__lt=old_answer.created_at)
        .order_by("-created_at")
        .afirst()
    )
    if question is None:
        raise ChatbotError("This answer has no question to answer again.", code="invalid")
    provider = get_provider()
    prompt = await build_prompt(
        provider=provider, conversation=conversation, text=question.content, before=question.created_at
    )
    return await _start_answer(
        owner=owner,
        provider=provider,
        prompt=prompt,
        transport=transport,
        create=partial(_replace_answer, old_answer=old_answer, question=question, provider=provider),
    )


async def _start_answer(
    *, owner: Owner, provider: Provider, prompt: list[dict], transport: str, create
) -> Turn:
    """Count the answer against the limits, save it with `create()`, start its generation.

    The model's request goes out as soon as the limits allow it, before the turn is
    saved, so the model's time to first token and the database's writes overlap. Should
    the save fail, the request is cancelled and nothing is left running.
    """
    await _acquire_slot(owner)
    max_tokens, temperature = chatbot_setting("MAX_TOKENS"), chatbot_setting("TEMPERATURE")
    stream = EarlyStream(provider.stream(prompt, max_tokens=max_tokens, temperature=temperature))
    try:
        conversation, user_message, assistant_message = await _create_or_release(owner, create)
    except BaseException:
        await asyncio.shield(stream.aclose())
        raise
    manager = get_manager()
    try:
        await manager.log.open(assistant_message.id)
    except BaseException as error:  # saved but never started: say so, and free the slot
        await asyncio.shield(stream.aclose())
        await asyncio.shield(_fail_unstarted(owner, assistant_message, error))
        raise
    metrics.CHAT_REQUESTS.labels(transport).inc()
    manager.start(
        GenerationRequest(
            message_id=assistant_message.id,
            conversation_id=conversation.id,
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=temperature,
            client_key=owner.rate_key,
            user_id=owner.user_id,
            session_key=owner.session_key or "",
        ),
        provider=provider,
        stream=stream,
    )
    return Turn(conversation, user_message, assistant_message)


@sync_to_async
def _acquire_slot(owner: Owner) -> None:
    try:
        rate_limiter.acquire(owner.rate_key, owner.user_id)
    except RateLimited as error:
        metrics.RATE_LIMITED.labels(error.limit).inc()
        raise


@sync_to_async
def _fail_unstarted(owner: Owner, answer: Message, error: BaseException) -> None:
    failure = unavailable_error(error) or ChatbotError("The answer could not be started.", code="internal")
    Message.objects.filter(pk=answer.pk).update(
        status=Status.FAILED,
        error_code=failure.code,
        error_message=failure.message,
        finish_reason="error",
        heartbeat_at=timezone.now(),
    )
    rate_limiter.release(owner.rate_key)


@sync_to_async
def _create_or_release(owner: Owner, create):
    """Run `create`; give the rate-limit slot back if it fails."""
    try:
        return create()
    except BaseException:
        rate_limiter.release(owner.rate_key)
        raise
    try:
        return create()
    except BaseException:
        rate_limiter.release(owner.rate_key)
        raise


async def build_prompt(
    *, provider: Provider, conversation: Conversation | None, text: str, before=None
) -> list[dict]:
    """System prompt, as much recent history (before `before`) as the budget allows, the new message."""
    system_prompt = chatbot_setting("SYSTEM_PROMPT")
    count = provider.count_tokens
    budget = chatbot_setting("HISTORY_TOKENS") or (
        provider.context_window
        - chatbot_setting("MAX_TOKENS")
        - count(system_prompt)
        - count(text)
        - 3 * MESSAGE_OVERHEAD_TOKENS
    )
    remaining = budget

    def fits(content: str) -> bool:
        nonlocal remaining
        cost = count(content) + MESSAGE_OVERHEAD_TOKENS
        if cost > remaining:
            return False
        remaining -= cost
        return True

    history = (
        await conversation_context(conversation=conversation, fits=fits, before=before)
        if conversation
        else []
    )
    prompt = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [*prompt, *history, {"role": "user", "content": text}]


def _create_turn(*, owner: Owner, conversation: Conversation | None, text: str, provider: Provider):
    with transaction.atomic():
        if conversation is None:
            conversation = Conversation.objects.create(title=_title(text), **owner.create_kwargs)
        user_message = Message.objects.create(
            conversation=conversation, role=Message.Role.USER, content=text, status=Status.COMPLETE
        )
        return conversation, user_message, _create_answer(conversation, provider)


def _replace_answer(*, old_answer: Message, question: Message, provider: Provider):
    with transaction.atomic():
        old_answer.delete()
        return old_answer.conversation, question, _create_answer(old_answer.conversation, provider)


def _create_answer(conversation: Conversation, provider: Provider) -> Message:
    """A pending answer (inside the caller's transaction); touches the conversation's `updated_at`."""
    now = timezone.now()
    Conversation.objects.filter(pk=conversation.pk).update(updated_at=now)
    return Message.objects.create(
        conversation=conversation,
        role=Message.Role.ASSISTANT,
        status=Status.PENDING,
        provider=provider.name,
        model=provider.model_id,
        worker=get_manager().worker_id,
        heartbeat_at=now,
    )


def _title(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= TITLE_LENGTH else line[: TITLE_LENGTH - 1].rstrip() + "…"


async def follow_events(*, message: Message, after: int = 0) -> AsyncIterator:
    """The message's events after `after`, live until the terminal one; `KEEPALIVE` when idle.

    With `CANCEL_ON_DISCONNECT`, a reader that leaves before the end stops the answer.
    """
    finished = False
    events = _message_events(message=message, after=after)
    try:
        async with aclosing(events):
            async for item in events:
                if item is not KEEPALIVE and item.is_terminal:
                    finished = True
                yield item
    finally:
        if not finished and chatbot_setting("CANCEL_ON_DISCONNECT"):
            # Not awaited: we may be inside a cancellation; the stop saves the partial text.
            get_manager().stop_soon(message.id)


async def _message_events(*, message: Message, after: int) -> AsyncIterator:
    log = get_manager().log
    reader = log.read(message.id, after=after, keepalive=chatbot_setting("KEEPALIVE_INTERVAL"))
    try:
        async with aclosing(reader):
            async for item in reader:
                yield item
        return
    except LogNotFound:
        pass
    # No log in this process (expired, or the server restarted): rebuild from the database.
    await message.arefresh_from_db()
    for event in stored_events(message, after=after):
        yield event


def stored_events(message: Message, *, after: int = 0) -> list[ev.Event]:
    """Events rebuilt from a saved message whose log is gone.

    From the start (`after=0`) that is meta, the whole text as one delta, usage and
    the terminal event. A client that had already read part of the original log only
    gets the terminal event (sequence numbers no longer map to the saved text); it
    re-reads the message for the saved text.
    """
    if message.is_live:
        # Live in the database with no log here: its worker is gone; the sweep will mark it.
        outcome = {"status": Status.INTERRUPTED, "code": "interrupted"}
    else:
        outcome = {
            "status": message.status,
            "finish_reason": message.finish_reason,
            "code": message.error_code,
            "message": message.error_message,
            "retryable": message.status == Status.INTERRUPTED,
        }
    items: list[tuple[str, dict]] = [
        (
            ev.META,
            {
                "session_id": str(message.conversation_id),
                "message_id": str(message.id),
                "model": message.model,
                "provider": message.provider,
            },
        )
    ]
    if message.content:
        items.append((ev.DELTA, {"text": message.content}))
    if message.prompt_tokens is not None:
        items.append(
            (
                ev.USAGE,
                {
                    "prompt_tokens": message.prompt_tokens,
                    "completion_tokens": message.completion_tokens or 0,
                    "estimated": message.tokens_estimated,
                },
            )
        )
    items.append(terminal_event(outcome))
    events = [ev.Event.create(seq, kind, data, message.id) for seq, (kind, data) in enumerate(items, 1)]
    if after <= 0:
        return events
    terminal = events[-1]
    return [ev.Event.create(max(after + 1, terminal.seq), terminal.type, terminal.data, message.id)]


async def message_stop(*, owner: Owner, message_id) -> Message:
    """Stop an answer: cancel the generation and its upstream request, keep the partial text.

    Idempotent: stopping a finished answer changes nothing and returns it as it is.
    """
    message = await message_get(owner=owner, message_id=message_id)
    manager = get_manager()
    if not await manager.stop(message.id) and message.is_live:
        if await manager.log.request_stop(message.id):
            # Another worker runs it: wait for its terminal event (the outcome is saved by then).
            await _wait_for_end(message, timeout=STOP_WAIT)
        await message.arefresh_from_db()
        if message.is_live:
            # No worker answered: it died. Close the answer as stopped, keeping its text.
            await Message.objects.filter(pk=message.pk, status__in=Message.LIVE_STATUSES).aupdate(
                status=Status.STOPPED, finish_reason="stopped"
            )
    await message.arefresh_from_db()
    return message


async def _wait_for_end(message: Message, *, timeout: float) -> None:
    try:
        async with asyncio.timeout(timeout):
            async for item in _message_events(message=message, after=0):
                if item is not KEEPALIVE and item.is_terminal:
                    return
    except TimeoutError:
        pass


async def conversation_rename(*, owner: Owner, conversation_id, title: str) -> Conversation:
    conversation = await conversation_get(owner=owner, conversation_id=conversation_id)
    conversation.title = title
    await conversation.asave(update_fields=["title", "updated_at"])
    return conversation


async def conversation_delete(*, owner: Owner, conversation_id) -> None:
    """Delete a conversation, stopping any answer still being written in it."""
    conversation = await conversation_get(owner=owner, conversation_id=conversation_id)
    manager = get_manager()
    async for message_id in conversation.messages.filter(status__in=Message.LIVE_STATUSES).values_list(
        "pk", flat=True
    ):
        await manager.stop(message_id)
    await conversation.adelete()
