"""Business logic: start an answer, stop it; manage conversations.

Views and consumers are thin wrappers around these functions. Every transport
(JSON, SSE, NDJSON, WebSocket) starts answers with `chat_start()` and reads them
with `streaming.follow.follow_events()`: one flow, several views of it.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import aclosing
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from uuid import UUID

from asgiref.sync import sync_to_async
from django.db import IntegrityError, transaction
from django.utils import timezone

from . import metrics
from .conf import chatbot_setting
from .errors import ChatbotError, NotFound, ShuttingDown, unavailable_error
from .identity import Owner
from .limits import give_back, take_slot
from .models import Conversation, Message
from .providers import Provider, Usage, get_provider
from .rows import insert
from .selectors import conversation_context, conversation_get, message_get
from .streaming.follow import follow_events
from .streaming.generation import EarlyStream, GenerationRequest
from .streaming.manager import get_manager
from .streaming.outcome import Outcome

logger = logging.getLogger("chatbot.services")
Status = Message.Status
# Chat-template overhead of one message (role markers, separators), in tokens.
MESSAGE_OVERHEAD_TOKENS = 4
TITLE_LENGTH = 60
ANSWER_ID_TAKEN = ChatbotError(
    "answer_id is already the id of another message: send a new UUID.", code="conflict", status_code=409
)
# How long a stop waits for another worker to confirm (it stops within a token or two).
STOP_WAIT = 5.0


@dataclass(slots=True)
class Turn:
    conversation: Conversation
    user_message: Message
    assistant_message: Message


async def chat_start(
    *,
    owner: Owner,
    text: str,
    session_id: str | None = None,
    transport: str = "json",
    streaming: bool = False,
    answer_id: UUID | None = None,
    model: str | None = None,
) -> Turn:
    """Save the user's message, create the answer and start generating it in the background.

    Returns at once; the answer's events are read with `follow_events()`. Raises
    `NotFound` for a `session_id` the owner does not have and `RateLimited` when a
    limit is reached; in both cases nothing is saved or started. `answer_id` is the id
    the client chose for the answer (so it can stop it before the answer comes back).
    """
    provider = get_provider()
    conversation = await conversation_get(owner=owner, conversation_id=session_id) if session_id else None
    if model:
        await require_model(provider, model)
    else:
        model = conversation.model if conversation else ""
    prompt = await build_prompt(provider=provider, conversation=conversation, text=text)
    return await _start_answer(
        owner=owner,
        provider=provider,
        prompt=prompt,
        transport=transport,
        create=partial(
            _create_turn, owner=owner, conversation=conversation, text=text, provider=provider, picked=model
        ),
        answer_id=answer_id,
        streaming=streaming or transport != "json",
        model=model or None,
    )


async def require_model(provider: Provider, model: str) -> None:
    """`NotFound` unless this server can answer with `model`."""
    if model != provider.model_id and model not in await provider.list_models():
        raise NotFound(
            f"The model {model!r} does not exist here: GET /api/models/ lists them.", code="model_not_found"
        )


async def answer_regenerate(
    *, owner: Owner, message_id, transport: str = "json", answer_id: UUID | None = None
) -> Turn:
    """Replace the last answer of a conversation with a new one to the same question.

    The old answer is deleted (its usage record stays); the new one is generated from
    the same history, so the question is not repeated in the model's context.
    """
    old_answer, question = await _last_answer_and_question(
        owner=owner, message_id=message_id, verb="regenerated"
    )
    conversation = old_answer.conversation
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
        answer_id=answer_id,
        streaming=transport != "json",
        model=conversation.model or None,
    )


async def question_edit(
    *, owner: Owner, message_id, text: str, transport: str = "json", answer_id: UUID | None = None
) -> Turn:
    """Send an edited question in place of a sent one: it and every later turn are replaced.

    The answer is generated from the history before the question, as if the later turns
    had never been. Refused (409) while an answer of the conversation is being written.
    """
    question = await message_get(owner=owner, message_id=message_id)
    if question.role != Message.Role.USER:
        raise ChatbotError("Only a question can be edited.", code="invalid")
    conversation = question.conversation
    if await conversation.messages.filter(status__in=Message.LIVE_STATUSES).aexists():
        raise ChatbotError("An answer is being written: stop it first.", code="conflict", status_code=409)
    provider = get_provider()
    prompt = await build_prompt(
        provider=provider, conversation=conversation, text=text, before=question.created_at
    )
    return await _start_answer(
        owner=owner,
        provider=provider,
        prompt=prompt,
        transport=transport,
        create=partial(_edit_turn, question=question, owner=owner, text=text, provider=provider),
        answer_id=answer_id,
        streaming=transport != "json",
        model=conversation.model or None,
    )


def _is_continuable(answer: Message) -> bool:
    """An answer a Continue may go on from: cut by the token limit, or by a server that died."""
    return bool(answer.content) and (
        (answer.status == Status.COMPLETE and answer.finish_reason == "length")
        or answer.status == Status.INTERRUPTED
    )


async def _last_answer_and_question(*, owner: Owner, message_id, verb: str) -> tuple[Message, Message]:
    """The last answer of its conversation, finished, and the question it answers; else 400/404/409."""
    answer = await message_get(owner=owner, message_id=message_id)
    last = await answer.conversation.messages.order_by("-created_at").afirst()
    if answer.role != Message.Role.ASSISTANT or last.pk != answer.pk:
        raise ChatbotError(f"Only the last answer of a conversation can be {verb}.", code="invalid")
    if answer.is_live:
        raise ChatbotError(
            "This answer is still being written: stop it first.", code="conflict", status_code=409
        )
    question = (
        await answer.conversation.messages.filter(role=Message.Role.USER, created_at__lt=answer.created_at)
        .order_by("-created_at")
        .afirst()
    )
    if question is None:
        raise ChatbotError("This answer has no question.", code="invalid")
    return answer, question


async def answer_continue(*, owner: Owner, message_id, transport: str = "json") -> Turn:
    """Go on writing the last answer where the token limit (or a dead server) cut it.

    The same message grows: its event log goes on numbering from where it ended (its
    first events restate the text so far), the model is asked to continue that text, and
    the new part has its own usage record.
    """
    answer, question = await _last_answer_and_question(owner=owner, message_id=message_id, verb="continued")
    if not _is_continuable(answer):
        raise ChatbotError(
            "Only an answer cut by the token limit or by a server restart can be continued.",
            code="invalid",
        )
    conversation = answer.conversation
    provider = get_provider()
    prompt = await build_prompt(
        provider=provider,
        conversation=conversation,
        text=question.content,
        before=question.created_at,
        answer_so_far=answer.content,
    )
    return await _start_answer(
        owner=owner,
        provider=provider,
        prompt=provider.continuation_prompt(prompt, answer.content),
        transport=transport,
        create=partial(_reopen_answer, answer=answer, question=question),
        answer_id=None,
        streaming=answer.streaming,
        model=answer.model if answer.model != provider.model_id else None,
    )


def _reopen_answer(*, answer: Message, question: Message, client_key: str, holds_slot: bool, **_):
    """The answer, live again for its next part; the returned instance keeps its old `last_seq`."""
    with transaction.atomic():
        # Locked and reopened only if it is still there and finished: of two Continues one wins.
        locked = Message.objects.select_for_update().filter(pk=answer.pk).first()
        if locked is None or locked.is_live or not _is_continuable(locked):
            raise ChatbotError("This answer is already being continued.", code="conflict", status_code=409)
        now = timezone.now()
        Conversation.objects.filter(pk=locked.conversation_id).update(updated_at=now)
        locked.continuations += 1
        Message.objects.filter(pk=locked.pk).update(
            status=Status.PENDING,
            finish_reason="",
            error_code="",
            error_message="",
            last_seq=None,
            continuations=locked.continuations,
            worker=get_manager().worker_id,
            heartbeat_at=now,
            client_key=client_key,
            holds_slot=holds_slot,
        )
        return answer.conversation, question, locked


def _continued_log_start(answer: Message) -> int:
    """The first seq of a continued answer's log: its old usage and end are restated from there.

    Without a known end (its log was lost before it was numbered), past any seq it can have
    had: one event per delta, each at least a character, and meta, usage, end.
    """
    end = answer.last_seq or len(answer.content) + 3
    return max(end - 1, 1)


def _edit_turn(*, question: Message, owner: Owner, text: str, provider: Provider, **charge):
    with transaction.atomic():
        # The conversation's row is locked: a new answer in it (which updates that row) waits for
        # this edit or is seen by the checks below, so an edit never deletes a live answer; of two
        # edits one wins, the other gets 409.
        conversation = Conversation.objects.select_for_update().get(pk=question.conversation_id)
        if conversation.messages.filter(status__in=Message.LIVE_STATUSES).exists():
            raise ChatbotError("An answer is being written: stop it first.", code="conflict", status_code=409)
        if not conversation.messages.filter(pk=question.pk).exists():
            raise ChatbotError("This question was already replaced.", code="conflict", status_code=409)
        conversation.messages.filter(created_at__gte=question.created_at).delete()
        return _create_turn(
            owner=owner,
            conversation=conversation,
            text=text,
            provider=provider,
            picked=conversation.model,
            **charge,
        )


async def completion_start(
    *,
    owner: Owner,
    messages: list[dict],
    model: str,
    streaming: bool,
    max_tokens: int | None = None,
    temperature: float | None = None,
    stop: list[str] | None = None,
    conversation_id=None,
) -> Turn:
    """An OpenAI-style request: `messages` as sent (role, text), the last one the user's question.

    Without `conversation_id` the call becomes a new conversation whose history is the
    messages sent (system messages go to the model, not to the history); with it, the
    stored conversation continues and only the new question (and any system message) of
    `messages` is used. Raises `NotFound` for a model this server cannot answer with.
    """
    provider = get_provider()
    if stop and not provider.supports_stop:
        raise ChatbotError(
            f"The {provider.name} provider does not support stop sequences.", code="unsupported"
        )
    await require_model(provider, model)
    system = [m["content"] for m in messages if m["role"] == "system"]
    system_prompt = "\n\n".join(system) if system else None
    question = messages[-1]["content"]
    if conversation_id is not None:
        conversation = await conversation_get(owner=owner, conversation_id=conversation_id)
        prompt = await build_prompt(
            provider=provider, conversation=conversation, text=question, system_prompt=system_prompt
        )
        create = partial(
            _create_turn, owner=owner, conversation=conversation, text=question, provider=provider
        )
    else:
        history = [m for m in messages[:-1] if m["role"] != "system"]
        configured = chatbot_setting("SYSTEM_PROMPT")
        prompt = (
            messages if system or not configured else [{"role": "system", "content": configured}, *messages]
        )
        create = partial(_create_turn, owner=owner, conversation=None, text=question, provider=provider,
                         history=history)  # fmt: skip
    return await _start_answer(
        owner=owner,
        provider=provider,
        prompt=prompt,
        transport="openai",
        create=create,
        answer_id=None,
        streaming=streaming,
        max_tokens=max_tokens,
        temperature=temperature,
        model=model,
        stop=stop,
    )


async def _start_answer(
    *,
    owner: Owner,
    provider: Provider,
    prompt: list[dict],
    transport: str,
    create,
    answer_id: UUID | None,
    streaming: bool,
    max_tokens: int | None = None,
    temperature: float | None = None,
    model: str | None = None,
    stop: list[str] | None = None,
) -> Turn:
    """Count the answer against the limits, save it with `create()`, start its generation.

    The model's request goes out as soon as the limits allow it, before the turn is
    saved, so the model's time to first token and the database's writes overlap. Should
    the save fail, the request is cancelled and nothing is left running.
    """
    if get_manager().stopping.is_set():
        raise ShuttingDown()
    if answer_id is not None and await Message.objects.filter(pk=answer_id).aexists():
        raise ANSWER_ID_TAKEN
    holds_slot = await take_slot(owner.rate_key, owner.user_id)
    # A request may ask for fewer tokens than the operator's cap, never more.
    max_tokens = min(max_tokens or chatbot_setting("MAX_TOKENS"), chatbot_setting("MAX_TOKENS"))
    temperature = chatbot_setting("TEMPERATURE") if temperature is None else temperature
    options = {"model": model} if model and model != provider.model_id else {}
    if stop:
        options["stop"] = stop
    stream = EarlyStream(provider.stream(prompt, max_tokens=max_tokens, temperature=temperature, **options))
    try:
        conversation, user_message, assistant_message = await sync_to_async(create)(
            client_key=owner.rate_key,
            holds_slot=holds_slot,
            answer_id=answer_id,
            transport=transport,
            streaming=streaming,
            model=model or provider.model_id,
        )
    except BaseException as error:  # nothing saved, nothing started: the slot goes back
        await asyncio.shield(stream.aclose())
        await asyncio.shield(give_back(owner.rate_key, slot=holds_slot))
        if isinstance(error, IntegrityError) and answer_id is not None:
            raise ANSWER_ID_TAKEN from error  # two requests raced for the same id
        raise
    manager = get_manager()
    part = assistant_message.continuations
    try:
        if part:
            await manager.log.open(assistant_message.id, first_seq=_continued_log_start(assistant_message))
        else:
            await manager.log.open(assistant_message.id)
    except BaseException as error:  # saved but never started: say so, and free the slot
        await asyncio.shield(stream.aclose())
        await asyncio.shield(_fail_unstarted(assistant_message, error))
        await asyncio.shield(give_back(owner.rate_key, slot=holds_slot))
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
            model=assistant_message.model,
            question_id=user_message.id,
            **(_continuation_of(assistant_message) if part else {}),
        ),
        provider=provider,
        stream=stream,
    )
    return Turn(conversation, user_message, assistant_message)


def _continuation_of(answer: Message) -> dict:
    """The `GenerationRequest` fields of an answer's next part."""
    earlier = None
    if answer.prompt_tokens is not None:
        earlier = Usage(answer.prompt_tokens, answer.completion_tokens or 0, answer.tokens_estimated)
    return {"prefix": answer.content, "part": answer.continuations, "earlier_usage": earlier}


@sync_to_async
def _fail_unstarted(answer: Message, error: BaseException) -> None:
    failure = unavailable_error(error) or ChatbotError("The answer could not be started.", code="internal")
    Message.objects.filter(pk=answer.pk).update(
        status=Status.FAILED,
        error_code=failure.code,
        error_message=failure.message,
        finish_reason="error",
        heartbeat_at=timezone.now(),
        holds_slot=False,
    )


async def build_prompt(
    *,
    provider: Provider,
    conversation: Conversation | None,
    text: str,
    before=None,
    system_prompt=None,
    answer_so_far: str = "",
) -> list[dict]:
    """System prompt, as much recent history (before `before`) as the budget allows, the new message.

    `answer_so_far`: the text of an answer being continued, which the budget leaves room for."""
    system_prompt = chatbot_setting("SYSTEM_PROMPT") if system_prompt is None else system_prompt
    count = provider.count_tokens
    budget = chatbot_setting("HISTORY_TOKENS") or (
        provider.context_window
        - chatbot_setting("MAX_TOKENS")
        - count(system_prompt)
        - count(text)
        - (count(answer_so_far) + MESSAGE_OVERHEAD_TOKENS if answer_so_far else 0)
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


def _create_turn(
    *,
    owner: Owner,
    conversation: Conversation | None,
    text: str,
    provider: Provider,
    history: list[dict] = (),
    picked: str = "",
    **charge,
):
    """The question (after `history`'s earlier turns, for a new conversation) and a pending answer.

    `picked`: the model the user chose, which the conversation remembers."""
    with transaction.atomic():
        is_new = conversation is None
        if is_new:
            first = next((m["content"] for m in history if m["role"] == "user"), text)
            conversation = Conversation(title=_title(first), model=picked, **owner.create_kwargs)
            insert(conversation)
        elif picked != conversation.model:
            Conversation.objects.filter(pk=conversation.pk).update(model=picked)
            conversation.model = picked
        _save_history(conversation, history)
        user_message = Message(
            conversation=conversation, role=Message.Role.USER, content=text, status=Status.COMPLETE
        )
        insert(user_message)
        answer = _create_answer(conversation, provider, touch_conversation=not is_new, **charge)
        return conversation, user_message, answer


def _save_history(conversation: Conversation, history: list[dict]) -> None:
    """Earlier turns sent with an OpenAI-style request, stored in order before its question."""
    if not history:
        return
    saved = Message.objects.bulk_create(
        Message(conversation=conversation, role=turn["role"], content=turn["content"], status=Status.COMPLETE)
        for turn in history
    )
    # created_at orders a conversation; one bulk insert may give several rows the same instant.
    start = timezone.now() - timedelta(milliseconds=len(saved))
    for index, message in enumerate(saved):
        Message.objects.filter(pk=message.pk).update(created_at=start + timedelta(milliseconds=index))


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
    conversation: Conversation,
    provider: Provider,
    *,
    client_key: str,
    holds_slot: bool,
    answer_id: UUID | None,
    transport: str,
    streaming: bool,
    model: str,
    touch_conversation: bool = True,
) -> Message:
    """A pending answer (inside the caller's transaction); touches the conversation's `updated_at`
    (not one created in the same transaction: it has just been set)."""
    now = timezone.now()
    if touch_conversation:
        Conversation.objects.filter(pk=conversation.pk).update(updated_at=now)
    answer = Message(
        **({"id": answer_id} if answer_id is not None else {}),
        conversation=conversation,
        role=Message.Role.ASSISTANT,
        status=Status.PENDING,
        provider=provider.name,
        model=model,
        worker=get_manager().worker_id,
        heartbeat_at=now,
        client_key=client_key,
        holds_slot=holds_slot,
        transport=transport,
        streaming=streaming,
    )
    insert(answer)
    return answer


def _title(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= TITLE_LENGTH else line[: TITLE_LENGTH - 1].rstrip() + "…"


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
        async with asyncio.timeout(timeout), aclosing(follow_events(message=message, after=0)) as events:
            async for item in events:
                if item.is_terminal:
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
