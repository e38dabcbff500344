"""Business logic: start an answer, follow its events, stop it; manage conversations.

Views and consumers are thin wrappers around these functions. Every transport
(JSON, SSE, NDJSON, WebSocket) starts answers with `chat_start()` and reads them
with `follow_events()`: one flow, several views of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from datetime import timedelta
from functools import partial

from asgiref.sync import sync_to_async
from django.db import transaction
from django.utils import timezone

from . import events as ev
from . import metrics
from .conf import chatbot_setting
from .errors import UNAVAILABLE_ERRORS, ChatbotError, ShuttingDown, unavailable_error
from .eventlog import KEEPALIVE, LogGap, LogNotFound
from .generation import EarlyStream, GenerationRequest, get_manager
from .limits import RateLimited, rate_limiter
from .models import Conversation, Message
from .outcome import Outcome
from .providers import Provider, get_provider
from .selectors import Owner, conversation_context, conversation_get, message_get

logger = logging.getLogger("chatbot.services")
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
    if get_manager().stopping.is_set():
        raise ShuttingDown()
    holds_slot = await _acquire_slot(owner)
    max_tokens, temperature = chatbot_setting("MAX_TOKENS"), chatbot_setting("TEMPERATURE")
    stream = EarlyStream(provider.stream(prompt, max_tokens=max_tokens, temperature=temperature))
    try:
        conversation, user_message, assistant_message = await _create_or_release(owner, create, holds_slot)
    except BaseException:
        await asyncio.shield(stream.aclose())
        raise
    manager = get_manager()
    try:
        await manager.log.open(assistant_message.id)
    except BaseException as error:  # saved but never started: say so, and free the slot
        await asyncio.shield(stream.aclose())
        await asyncio.shield(_fail_unstarted(owner, assistant_message, error, holds_slot))
        raise
    metrics.CHAT_REQUESTS.labels(transport).inc()
    manager.start(
        GenerationRequest(
            message_id=assistant_message.id,
            conversation_id=conversation.id,
            prompt=prompt,
            client_key=owner.rate_key,
            user_id=owner.user_id,
            session_key=owner.session_key or "",
            holds_slot=holds_slot,
        ),
        provider=provider,
        stream=stream,
    )
    return Turn(conversation, user_message, assistant_message)


@sync_to_async
def _acquire_slot(owner: Owner) -> bool:
    try:
        return rate_limiter.acquire(owner.rate_key, owner.user_id)
    except RateLimited as error:
        metrics.RATE_LIMITED.labels(error.limit).inc()
        raise


@sync_to_async
def _fail_unstarted(owner: Owner, answer: Message, error: BaseException, holds_slot: bool) -> None:
    failure = unavailable_error(error) or ChatbotError("The answer could not be started.", code="internal")
    Message.objects.filter(pk=answer.pk).update(
        status=Status.FAILED,
        error_code=failure.code,
        error_message=failure.message,
        finish_reason="error",
        heartbeat_at=timezone.now(),
        holds_slot=False,
    )
    rate_limiter.release(owner.rate_key, slot=holds_slot)


@sync_to_async
def _create_or_release(owner: Owner, create, holds_slot: bool):
    """Run `create`; give the rate-limit slot back if it fails."""
    try:
        return create(client_key=owner.rate_key, holds_slot=holds_slot)
    except BaseException:
        rate_limiter.release(owner.rate_key, slot=holds_slot)
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


def _create_turn(*, owner: Owner, conversation: Conversation | None, text: str, provider: Provider, **charge):
    with transaction.atomic():
        if conversation is None:
            conversation = Conversation.objects.create(title=_title(text), **owner.create_kwargs)
        user_message = Message.objects.create(
            conversation=conversation, role=Message.Role.USER, content=text, status=Status.COMPLETE
        )
        return conversation, user_message, _create_answer(conversation, provider, **charge)


def _replace_answer(*, old_answer: Message, question: Message, provider: Provider, **charge):
    with transaction.atomic():
        # Locked and deleted only if it is still there and finished: of concurrent
        # regenerates (on any worker, any database) one wins, the others get 409.
        locked = (
            Message.objects.select_for_update()
            .filter(pk=old_answer.pk)
            .exclude(status__in=Message.LIVE_STATUSES)
            .first()
        )
        if locked is None:
            raise ChatbotError("This answer is already being regenerated.", code="conflict", status_code=409)
        locked.delete()
        return old_answer.conversation, question, _create_answer(old_answer.conversation, provider, **charge)


def _create_answer(
    conversation: Conversation, provider: Provider, *, client_key: str, holds_slot: bool
) -> Message:
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
        client_key=client_key,
        holds_slot=holds_slot,
    )


def _title(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= TITLE_LENGTH else line[: TITLE_LENGTH - 1].rstrip() + "…"


async def follow_events(*, message: Message, after: int = 0) -> AsyncIterator:
    """The message's events after `after`, live until the terminal one; `KEEPALIVE` when idle.

    Ends with exactly one terminal event, whatever happens to the answer's worker or to
    the shared log, or with none when `after` is already at or past the end. With
    `CANCEL_ON_DISCONNECT`, a reader that leaves before the end stops the answer.
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


# An answer saved this recently may still be on its way into the log: don't end it for the log yet.
SETTLE_SECONDS = 2.0


class _EndFromDatabase(Exception):
    """The log will not end by itself: finish the reader from the saved message."""


async def _message_events(*, message: Message, after: int) -> AsyncIterator:
    manager = get_manager()
    log = manager.log
    keepalive = chatbot_setting("KEEPALIVE_INTERVAL")
    # A silent reader checks this often that the answer's worker is still alive.
    check_every = min(keepalive, max(chatbot_setting("ORPHAN_AFTER") / 3, 0.05))
    clock = asyncio.get_running_loop().time
    last_sent = clock()
    position = after
    try:
        while True:
            try:
                reader = log.read(message.id, after=position, keepalive=check_every)
                if not manager.is_running(message.id):
                    # Nothing here will end this reader when the server stops: the race will.
                    reader = _until_stopping(reader, manager.stopping)
                async with aclosing(reader):
                    async for item in reader:
                        if item is KEEPALIVE:
                            if await _log_is_abandoned(message.id, manager):
                                raise _EndFromDatabase
                            if clock() - last_sent >= keepalive * 0.9:
                                last_sent = clock()
                                yield KEEPALIVE
                            continue
                        position = item.seq
                        last_sent = clock()
                        yield item
                        if item.is_terminal:
                            return
                return  # at or past the end of an ended log
            except LogNotFound:
                pass
            if not await _log_may_come_back(message.id, manager):
                break
            await asyncio.sleep(check_every)
            if clock() - last_sent >= keepalive * 0.9:
                last_sent = clock()
                yield KEEPALIVE
    except _Stopping:
        yield ev.Event.for_reader(
            "server_shutdown", "This server is restarting; resume the answer to go on reading it.", message.id
        )
        return
    except _EndFromDatabase:
        pass
    except MessageGone:
        yield ev.Event.for_reader(
            "message_not_found", "This answer was deleted.", message.id, retryable=False
        )
        return
    except (LogGap, *UNAVAILABLE_ERRORS) as error:
        logger.warning("reader of %s ended: %s: %s", message.id, error.__class__.__name__, error)
        yield ev.Event.for_reader(
            "server_busy", "The answer's event stream is unreachable for now; resume shortly.", message.id
        )
        return
    # No log (expired, or lost with its worker), or one that will never end: the database has it.
    await message.arefresh_from_db()
    events = stored_events(message, after=position)
    if message.last_seq is None and not message.is_live:
        # The log's numbering is lost with it: the first replay fixes one, so that a
        # reader resuming at its end is told there is nothing more (204), not a new end.
        await Message.objects.filter(pk=message.pk, last_seq__isnull=True).aupdate(last_seq=events[-1].seq)
    for event in events:
        yield event


class _Stopping(Exception):
    """This worker is shutting down."""


async def _until_stopping(reader: AsyncIterator, stopping: asyncio.Event) -> AsyncIterator:
    """`reader`'s items until `stopping` is set, then `_Stopping`.

    Only for readers of answers that run elsewhere (rare): a task per item would cost
    every local stream CPU per token; those end with their generation anyway.
    """
    if stopping.is_set():
        raise _Stopping
    stop = asyncio.ensure_future(stopping.wait())
    try:
        async with aclosing(reader):
            while True:
                item = asyncio.ensure_future(anext(reader))
                await asyncio.wait({item, stop}, return_when=asyncio.FIRST_COMPLETED)
                if not item.done():
                    item.cancel()
                    with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                        await item
                    raise _Stopping
                try:
                    value = item.result()
                except StopAsyncIteration:
                    return
                yield value
    finally:
        stop.cancel()


class MessageGone(LookupError):
    """The answer was deleted while a reader followed it."""


async def _answer_state(message_id) -> dict:
    row = await Message.objects.filter(pk=message_id).values("status", "heartbeat_at", "last_seq").afirst()
    if row is None:
        raise MessageGone(message_id)
    return row


def _is_stale(row: dict, seconds: float) -> bool:
    return row["heartbeat_at"] is None or row["heartbeat_at"] < timezone.now() - timedelta(seconds=seconds)


async def _log_is_abandoned(message_id, manager) -> bool:
    """A silent reader's check: end the answer if its worker is gone; True if only the database can.

    A live answer whose worker stopped reporting is swept (the sweep writes the terminal
    event to the log, which this reader then reads). A saved answer whose log never got
    its terminal event (a Redis write lost with its worker) gets it now.
    """
    if manager.is_running(message_id):
        return False
    row = await _answer_state(message_id)
    if row["status"] in Message.LIVE_STATUSES:
        orphan_after = chatbot_setting("ORPHAN_AFTER") if manager.log.is_shared else SETTLE_SECONDS
        if _is_stale(row, orphan_after):
            await manager.sweep(older_than=orphan_after, message_id=message_id)
        return False
    if not _is_stale(row, SETTLE_SECONDS):
        return False  # just saved: its worker is writing the end to the log
    message = await Message.objects.aget(pk=message_id)
    seq = await manager.log.close_abandoned(message_id, *Outcome.of_message(message).terminal_event())
    if seq is None:
        return True
    if seq != message.last_seq:
        await Message.objects.filter(pk=message_id).aupdate(last_seq=seq)
    return False


async def _log_may_come_back(message_id, manager) -> bool:
    """No log here: wait for it (a shared log its live worker re-creates) or end from the database."""
    row = await _answer_state(message_id)
    if row["status"] not in Message.LIVE_STATUSES:
        return False
    if manager.log.is_shared and not _is_stale(row, chatbot_setting("ORPHAN_AFTER")):
        return True
    # Its worker is gone (or, with a log only this process has, it is not running here).
    await manager.sweep(older_than=0 if not manager.log.is_shared else None, message_id=message_id)
    return False


def stored_events(message: Message, *, after: int = 0) -> list[ev.Event]:
    """Events rebuilt from a saved message whose log is gone, numbered as the log was.

    The terminal event keeps its seq (`last_seq`); the text comes as one event just
    before the usage: a `delta` for a client starting from 0, a `snapshot` (the whole
    text, replacing what it had) for one that had read part of the log. Nothing is
    returned at or past the end.
    """
    usage = None
    if message.prompt_tokens is not None:
        usage = {
            "prompt_tokens": message.prompt_tokens,
            "completion_tokens": message.completion_tokens or 0,
            "estimated": message.tokens_estimated,
        }
    meta = {
        "session_id": str(message.conversation_id),
        "message_id": str(message.id),
        "model": message.model,
        "provider": message.provider,
    }
    # Without a known numbering, the events go after whatever the client already has.
    terminal_seq = message.last_seq or max(
        2 + bool(message.content) + bool(usage), after + 1 + bool(message.content) + bool(usage)
    )
    text_seq = terminal_seq - 1 - bool(usage)
    items: list[tuple[int, str, dict]] = [(1, ev.META, meta)]
    if message.content and text_seq > 1:
        items.append((text_seq, ev.DELTA if after == 0 else ev.SNAPSHOT, {"text": message.content}))
    if usage is not None:
        items.append((terminal_seq - 1, ev.USAGE, usage))
    items.append((terminal_seq, *Outcome.of_message(message).terminal_event()))
    return [ev.Event.create(seq, kind, data, message.id) for seq, kind, data in items if seq > after]


async def events_after(*, message: Message, after: int) -> bool:
    """Whether a reader resuming after `after` has anything left to read.

    False only for an answer that ended and whose end the reader already has; raises
    the log's connection errors (503) when the shared log cannot be asked.
    """
    manager = get_manager()
    if message.is_live:
        if manager.log.is_shared and not manager.is_running(message.id):
            await manager.log.tail(message.id)  # a Redis outage answers 503 now, not a cut stream
        return True
    tail = await manager.log.tail(message.id)
    if tail is not None and tail.is_terminal:
        return after < tail.seq
    # Without a known last seq the replay sends an end after `after` (and fixes the numbering).
    return message.last_seq is None or after < message.last_seq


async def message_stop(*, owner: Owner, message_id) -> Message:
    """Stop an answer: cancel the generation and its upstream request, keep the partial text.

    Idempotent: stopping a finished answer changes nothing and returns it as it is.
    """
    message = await message_get(owner=owner, message_id=message_id)
    await _stop_anywhere(message)
    await message.arefresh_from_db()
    return message


async def _stop_anywhere(message: Message) -> None:
    """Stop an answer on whichever worker runs it, or close it if no worker does."""
    manager = get_manager()
    if await manager.stop(message.id) or not message.is_live:
        return
    if await manager.log.request_stop(message.id):
        # Another worker runs it: wait for its terminal event (the outcome is saved by then).
        await _wait_for_end(message, timeout=STOP_WAIT)
    await message.arefresh_from_db()
    if message.is_live:
        # No worker answered: it died. Close the answer as stopped, keeping its text.
        await manager.sweep(older_than=0, message_id=message.id, outcome=Outcome.stopped())


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
    # Stopped wherever they run first, so their usage is charged and their slots come back.
    async for message in conversation.messages.filter(status__in=Message.LIVE_STATUSES):
        await _stop_anywhere(message)
    await conversation.adelete()
