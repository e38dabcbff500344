"""Continue an answer the token limit cut: the same answer grows, on every transport."""

from __future__ import annotations

import pytest
from asgiref.sync import sync_to_async
from django.test import AsyncClient

from chatbot_api.limits import rate_limiter
from chatbot_api.models import Message, UsageRecord
from chatbot_api.providers.base import CONTINUE_INSTRUCTION
from tests.support.clients import post_chat
from tests.support.fake_openai import Script
from tests.support.invariants import (
    assert_no_leaked_slot,
    assert_one_terminal,
    assert_stored_covers,
    final_message,
    seen_text,
)
from tests.support.sse import parse_sse

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]

SSE = {"Accept": "text/event-stream"}


async def slots() -> int:
    return await sync_to_async(rate_limiter.streams_in_use)("ip:127.0.0.1")


async def cut_answer(client, upstream, chunks=("The first ", "half")) -> dict:
    upstream.enqueue(
        Script(
            chunks=list(chunks), finish_reason="length", usage={"prompt_tokens": 10, "completion_tokens": 2}
        )
    )
    body = (await post_chat(client, {"message": "Write a long story"})).json()
    assert body["finish_reason"] == "length"
    return body


async def test_continue_appends_to_the_same_answer_and_charges_the_new_part(upstream, manager):
    client = AsyncClient()
    first = await cut_answer(client, upstream)
    upstream.enqueue(
        Script(chunks=[" and", " the end."], usage={"prompt_tokens": 14, "completion_tokens": 3})
    )

    response = await client.post(f"/api/messages/{first['message_id']}/continue")

    assert response.status_code == 200
    body = response.json()
    assert body["message_id"] == first["message_id"] and body["session_id"] == first["session_id"]
    assert body["response"] == "The first half and the end."
    assert (body["finish_reason"], body["success"]) == ("stop", True)
    answers = [m async for m in Message.objects.filter(role="assistant")]
    assert len(answers) == 1
    answer = answers[0]
    assert answer.content == "The first half and the end."
    assert (answer.status, answer.finish_reason) == ("complete", "stop")
    assert answer.continuations == 1
    assert (answer.prompt_tokens, answer.completion_tokens) == (24, 5), "the whole answer's cost"
    records = [
        (r.part, r.prompt_tokens, r.completion_tokens) async for r in UsageRecord.objects.order_by("part")
    ]
    assert records == [(0, 10, 2), (1, 14, 3)]
    sent = upstream.history[-1].messages
    assert sent[-3:] == [
        {"role": "user", "content": "Write a long story"},
        {"role": "assistant", "content": "The first half"},
        {"role": "user", "content": CONTINUE_INSTRUCTION},
    ]
    await assert_no_leaked_slot(slots)


async def test_a_continued_stream_restates_the_text_and_numbers_on_for_resuming_readers(upstream, manager):
    client = AsyncClient()
    first = await cut_answer(client, upstream)
    message_id = first["message_id"]
    old_end = (await Message.objects.aget(pk=message_id)).last_seq
    upstream.enqueue(Script(chunks=[" goes", " on"]))

    response = await client.post(f"/api/messages/{message_id}/continue", headers=SSE)
    frames = parse_sse(b"".join([chunk async for chunk in response.streaming_content]))

    kinds = [f["event"] for f in frames]
    assert kinds == ["meta", "snapshot", "delta", "delta", "usage", "done"]
    assert [int(f["id"]) for f in frames] == list(range(old_end - 1, old_end + 5))
    events = [f["data"] for f in frames]
    assert seen_text(events) == "The first half goes on"
    assert_one_terminal(events)
    message = await final_message(message_id)
    assert_stored_covers(message, seen_text(events))
    assert message.last_seq == old_end + 4
    # A reader that had the old end reads only the new part; one from the start, the whole answer.
    after_old_end = await client.get(f"/api/messages/{message_id}/events?after={old_end}", headers=SSE)
    new_part = [f["data"] for f in parse_sse(b"".join([c async for c in after_old_end.streaming_content]))]
    assert [e["type"] for e in new_part] == ["delta", "delta", "usage", "done"]
    from_start = await client.get(f"/api/messages/{message_id}/events", headers=SSE)
    whole = [f["data"] for f in parse_sse(b"".join([c async for c in from_start.streaming_content]))]
    assert seen_text(whole) == "The first half goes on"
    await assert_no_leaked_slot(slots)


async def test_stopping_a_continuation_keeps_both_parts_and_frees_the_slot(upstream, manager):
    client = AsyncClient()
    first = await cut_answer(client, upstream)
    message_id = first["message_id"]
    upstream.enqueue(Script(chunks=[" more", " never"], hang_after=1))

    response = await client.post(f"/api/messages/{message_id}/continue", headers=SSE)
    stream = aiter(response.streaming_content)
    seen = b""
    while b" more" not in seen:
        seen += await anext(stream)
    stop = await client.post(f"/api/messages/{message_id}/stop")
    async for chunk in stream:
        seen += chunk

    assert stop.status_code == 200
    events = [f["data"] for f in parse_sse(seen)]
    terminal = assert_one_terminal(events)
    assert terminal["status"] == "stopped"
    message = await final_message(message_id)
    assert message.content == "The first half more"
    assert_stored_covers(message, seen_text(events))
    await assert_no_leaked_slot(slots)


async def test_continue_refuses_what_it_cannot_do(upstream, manager):
    client = AsyncClient()
    finished = (await post_chat(client, {"message": "short"})).json()
    whole = await client.post(f"/api/messages/{finished['message_id']}/continue")
    first = await cut_answer(client, upstream)
    question = await Message.objects.filter(role="user").order_by("-created_at").afirst()

    stranger = await AsyncClient().post(f"/api/messages/{first['message_id']}/continue")
    of_question = await client.post(f"/api/messages/{question.pk}/continue")
    upstream.enqueue(Script(chunks=["x", "y"], hang_after=1))
    live = await client.post(f"/api/messages/{first['message_id']}/continue", headers=SSE)
    stream = aiter(live.streaming_content)
    await anext(stream)
    again = await client.post(f"/api/messages/{first['message_id']}/continue")
    regenerate = await client.post(f"/api/messages/{first['message_id']}/regenerate")

    assert (whole.status_code, whole.json()["code"]) == (400, "invalid")
    assert stranger.status_code == 404
    assert (of_question.status_code, of_question.json()["code"]) == (400, "invalid")
    assert (again.status_code, again.json()["code"]) == (409, "conflict")
    assert (regenerate.status_code, regenerate.json()["code"]) == (409, "conflict")
    await client.post(f"/api/messages/{first['message_id']}/stop")
    async for _ in stream:
        pass
    message = await final_message(first["message_id"])
    assert message.content.startswith("The first half")
    await assert_no_leaked_slot(slots)


async def test_an_older_cut_answer_cannot_be_continued(upstream, manager):
    client = AsyncClient()
    first = await cut_answer(client, upstream)
    await post_chat(client, {"message": "next", "session_id": first["session_id"]})

    response = await client.post(f"/api/messages/{first['message_id']}/continue")

    assert (response.status_code, response.json()["code"]) == (400, "invalid")


async def test_continue_over_websocket(upstream, manager):
    from tests.support.clients import browser_session, receive_until_terminal, websocket

    session_key = await browser_session()
    ws = await websocket(session_key=session_key)
    upstream.enqueue(Script(chunks=["cut"], finish_reason="length"))
    await ws.send_json_to({"type": "chat", "message": "Hi"})
    first = await receive_until_terminal(ws)
    upstream.enqueue(Script(chunks=[" off"]))

    await ws.send_json_to({"type": "continue", "message_id": first[0]["message_id"], "request_id": "c1"})
    accepted = await ws.receive_json_from(timeout=5)
    events = await receive_until_terminal(ws)

    assert accepted["type"] == "accepted" and accepted["request_id"] == "c1"
    assert accepted["message_id"] == first[0]["message_id"]
    assert seen_text(events) == "cut off" and events[-1]["type"] == "done"
    assert (await final_message(first[0]["message_id"])).content == "cut off"
    await ws.disconnect()
