"""POST /api/chat/ with JSON clients: the seed's contract, validation, errors, history."""

from __future__ import annotations

import pytest
from django.test import AsyncClient

from chatbot_api.models import Conversation, Message
from tests.support.clients import post_chat, start_sse
from tests.support.fake_openai import Script
from tests.support.sse import parse_sse, read_frames

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]


async def test_answer_is_assembled_and_saved(upstream, manager):
    upstream.enqueue(
        Script(chunks=["Ciao", ", come", " stai?"], usage={"prompt_tokens": 21, "completion_tokens": 3})
    )
    client = AsyncClient()

    response = await post_chat(client, {"message": "Hello"})

    assert response.status_code == 200
    body = response.json()
    assert body["success"] is True
    assert body["response"] == "Ciao, come stai?"
    assert body["is_streaming"] is False and body["is_final"] is True
    assert body["usage"] == {"prompt_tokens": 21, "completion_tokens": 3, "estimated": False}
    message = await Message.objects.aget(pk=body["message_id"])
    assert message.status == "complete" and message.content == "Ciao, come stai?"
    assert (message.provider, message.model) == ("openai", "gpt-4.1-nano")
    assert (message.prompt_tokens, message.completion_tokens, message.tokens_estimated) == (21, 3, False)
    assert message.ttft_ms is not None and message.duration_ms >= message.ttft_ms
    assert str(message.conversation_id) == body["session_id"]
    request = upstream.history[-1]
    assert request.body["stream"] is True and request.body["stream_options"] == {"include_usage": True}
    assert request.body["max_tokens"] == 150
    assert request.messages[-1] == {"role": "user", "content": "Hello"}


async def test_streaming_flag_keeps_the_seed_behaviour(upstream, manager):
    response = await post_chat(AsyncClient(), {"message": "Hi", "streaming": True})

    body = response.json()
    assert response.status_code == 200
    assert body["is_streaming"] is True and body["is_final"] is True
    assert body["response"] == "Hello world!"


async def test_missing_usage_is_estimated_and_marked(upstream, manager):
    upstream.enqueue(Script(chunks=["one two three"], send_usage=False))

    body = (await post_chat(AsyncClient(), {"message": "count"})).json()

    assert body["usage"]["estimated"] is True
    assert body["usage"]["completion_tokens"] > 0
    message = await Message.objects.aget(pk=body["message_id"])
    assert message.tokens_estimated is True


async def test_known_session_continues_with_history_as_context(upstream, manager):
    client = AsyncClient()
    upstream.enqueue(Script(chunks=["First answer"]))
    first = (await post_chat(client, {"message": "First question"})).json()

    upstream.enqueue(Script(chunks=["Second answer"]))
    second = await post_chat(client, {"message": "Second question", "session_id": first["session_id"]})

    assert second.status_code == 200
    assert second.json()["session_id"] == first["session_id"]
    sent = upstream.history[-1].messages
    assert [m["role"] for m in sent] == ["system", "user", "assistant", "user"]
    assert [m["content"] for m in sent[1:]] == ["First question", "First answer", "Second question"]
    assert await Message.objects.filter(conversation_id=first["session_id"]).acount() == 4


async def test_a_conversation_written_to_comes_first_in_the_list(upstream, manager):
    client = AsyncClient()
    upstream.enqueue(Script(chunks=["One"]), Script(chunks=["Two"]), Script(chunks=["Again"]))
    older = (await post_chat(client, {"message": "Older"})).json()["session_id"]
    newer = (await post_chat(client, {"message": "Newer"})).json()["session_id"]

    def listed(response) -> list[str]:
        return [conversation["session_id"] for conversation in response.json()]

    assert listed(await client.get("/api/conversations/")) == [newer, older], "a new one first"
    await post_chat(client, {"message": "Back to the older", "session_id": older})
    assert listed(await client.get("/api/conversations/")) == [older, newer], "touched by its new turn"


async def test_history_is_trimmed_to_the_token_budget(upstream, manager, chatbot_settings):
    chatbot_settings(HISTORY_TOKENS=60)
    client = AsyncClient()
    session_id = None
    for n in range(6):
        upstream.enqueue(Script(chunks=[f"answer {n} " + "x" * 60]))
        body = {"message": f"question {n} " + "y" * 60}
        if session_id:
            body["session_id"] = session_id
        session_id = (await post_chat(client, body)).json()["session_id"]

    upstream.enqueue(Script(chunks=["ok"]))
    await post_chat(client, {"message": "last", "session_id": session_id})

    sent = upstream.history[-1].messages
    history = sent[1:-1]
    assert 0 < len(history) < 12, "older turns must be dropped"
    assert history[-1]["content"].startswith("answer 5"), "the newest turns are kept"
    assert sum(len(m["content"]) // 4 + 1 + 4 for m in history) <= 60
    assert sent[-1]["content"] == "last"


async def test_unknown_session_is_404_and_creates_nothing(upstream, manager):
    for session_id in ["00000000-0000-0000-0000-000000000000", "not-a-uuid"]:
        response = await post_chat(AsyncClient(), {"message": "Hi", "session_id": session_id})
        assert response.status_code == 404
        body = response.json()
        assert body["success"] is False and body["code"] == "conversation_not_found"
        assert "session_id" in body["error"]
    assert await Conversation.objects.acount() == 0
    assert upstream.history == []


async def test_another_browser_session_cannot_continue_a_conversation(upstream, manager):
    first = (await post_chat(AsyncClient(), {"message": "mine"})).json()

    response = await post_chat(AsyncClient(), {"message": "yours?", "session_id": first["session_id"]})

    assert response.status_code == 404


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "message"),
        ({"message": ""}, "message"),
        ({"message": "   "}, "message"),
        ({"message": "x" * 1001}, "message"),
        ({"message": 42}, "message"),
        ({"message": ["a"]}, "message"),
        ({"message": None}, "message"),
        ({"message": "ok", "session_id": "s" * 101}, "session_id"),
        ({"message": "ok", "session_id": 7}, "session_id"),
        ({"message": "ok", "streaming": "maybe"}, "streaming"),
        ({"message": "ok", "streaming": [True]}, "streaming"),
    ],
)
async def test_invalid_input_gets_the_error_shape(upstream, manager, body, field):
    response = await post_chat(AsyncClient(), body)

    assert response.status_code == 400
    data = response.json()
    assert data["success"] is False and data["code"] == "invalid"
    assert field in data["details"] and data["error"].startswith(field)
    assert upstream.history == [] and await Message.objects.acount() == 0


async def test_request_serializers_share_no_field_between_requests():
    # Fields are shallow copies of the class's declared ones: each request binds its own.
    from chatbot_api.serializers import ChatRequestSerializer

    bad = ChatRequestSerializer(data={"message": 42, "streaming": "maybe"})
    good = ChatRequestSerializer(data={"message": "ok", "streaming": True})
    assert not bad.is_valid() and set(bad.errors) == {"message", "streaming"}
    assert good.is_valid(), good.errors
    assert good.validated_data == {"message": "ok", "streaming": True}
    assert bad.fields["message"] is not good.fields["message"]
    assert bad.fields["message"].parent is bad and good.fields["message"].parent is good
    declared = ChatRequestSerializer._declared_fields["message"]
    assert getattr(declared, "parent", None) is None  # the class's own field is never bound


async def test_limits_are_inclusive(upstream, manager):
    response = await post_chat(AsyncClient(), {"message": "x" * 1000, "session_id": ""})
    assert response.status_code == 200


@pytest.mark.parametrize(
    ("raw", "content_type", "status"),
    [
        (b"", "application/json", 400),
        (b"{not json", "application/json", 400),
        (b"[1, 2]", "application/json", 400),
        (b"message=hi", "application/x-www-form-urlencoded", 415),
        (b'{"message": "' + b"x" * 70_000 + b'"}', "application/json", 413),
    ],
)
async def test_malformed_bodies_get_the_error_shape(upstream, manager, raw, content_type, status):
    response = await AsyncClient().generic("POST", "/api/chat/", raw, content_type=content_type)

    assert response.status_code == status
    assert response["Content-Type"] == "application/json"
    data = response.json()
    assert data["success"] is False and data["error"] and data["code"]


@pytest.mark.parametrize(
    ("script", "status", "code", "partial"),
    [
        (Script(status=500), 502, "upstream_error", ""),
        (Script(status=429), 503, "upstream_rate_limited", ""),
        (Script(status=401), 502, "upstream_auth", ""),
        (Script(chunks=["a", "b", "c"], malformed_after=2), 502, "upstream_protocol", "ab"),
        (Script(chunks=["a", "b", "c"], drop_after=2), 502, "upstream_unavailable", "ab"),
        (Script(chunks=["a", "b", "c"], error_frame_after=1), 502, "upstream_error", "a"),
    ],
)
async def test_upstream_failures_keep_the_message_as_failed(upstream, manager, script, status, code, partial):
    upstream.enqueue(script)
    client = AsyncClient()
    await client.get("/")  # the page starts the browser session that owns the conversation

    response = await post_chat(client, {"message": "will fail"})

    assert response.status_code == status
    body = response.json()
    assert body["success"] is False and body["code"] == code and body["error"]
    assert body["response"] == partial and body["status"] == "failed"
    user, assistant = [m async for m in Message.objects.order_by("created_at")]
    assert (user.role, user.content, user.status) == ("user", "will fail", "complete")
    assert (assistant.status, assistant.content, assistant.error_code) == ("failed", partial, code)
    # The conversation is intact: the next message continues it.
    upstream.enqueue(Script(chunks=["fine"]))
    again = await post_chat(client, {"message": "retry", "session_id": body["session_id"]})
    assert again.status_code == 200 and again.json()["response"] == "fine"


async def test_unknown_api_url_is_json_404():
    response = await AsyncClient().get("/api/nope/")
    assert response.status_code == 404
    assert response.json() == {"success": False, "error": "Not found.", "code": "not_found"}


async def test_missing_local_model_is_a_clear_503_and_the_turn_is_kept(manager, chatbot_settings, tmp_path):
    chatbot_settings(PROVIDER="local", LOCAL_MODEL_PATH=str(tmp_path / "nope.gguf"))

    response = await post_chat(AsyncClient(), {"message": "anyone there?"})

    assert response.status_code == 503
    body = response.json()
    assert body["success"] is False and body["code"] == "model_unavailable"
    assert "CHATBOT_LOCAL_MODEL_PATH" in body["error"]
    user, assistant = [m async for m in Message.objects.order_by("created_at")]
    assert user.content == "anyone there?" and assistant.status == "failed"
    assert assistant.error_code == "model_unavailable"


async def test_local_model_answers_for_real(manager, chatbot_settings):
    chatbot_settings(PROVIDER="local", MAX_TOKENS=12, TEMPERATURE=0.0)

    body = (await post_chat(AsyncClient(), {"message": "What is the capital of France?"})).json()

    assert body["success"] is True and body["provider"] == "local"
    assert body["model"] == "SmolLM2-135M-Instruct"
    assert body["response"].strip()
    assert 0 < body["usage"]["completion_tokens"] <= 12 and body["usage"]["estimated"] is False


async def test_openapi_schema_documents_the_event_stream():
    response = await AsyncClient().get("/api/schema/", headers={"Accept": "application/json"})
    assert response.status_code == 200
    schema = response.json()
    chat = schema["paths"]["/api/chat/"]["post"]["responses"]["200"]["content"]
    assert set(chat) == {"application/json", "text/event-stream", "application/x-ndjson"}
    assert "StreamEvent" in schema["components"]["schemas"]
    assert (
        "text/event-stream"
        in schema["paths"]["/api/messages/{message_id}/events"]["get"]["responses"]["200"]["content"]
    )


async def test_regenerate_replaces_the_last_answer_without_repeating_the_question(upstream, manager):
    client = AsyncClient()
    upstream.enqueue(Script(chunks=["first try"]))
    first = (await post_chat(client, {"message": "Tell me a joke"})).json()
    upstream.enqueue(Script(chunks=["second try"]))

    response = await client.post(f"/api/messages/{first['message_id']}/regenerate")

    assert response.status_code == 200
    body = response.json()
    assert body["response"] == "second try" and body["session_id"] == first["session_id"]
    assert body["message_id"] != first["message_id"]
    rows = [(m.role, m.content) async for m in Message.objects.order_by("created_at")]
    assert rows == [("user", "Tell me a joke"), ("assistant", "second try")]
    sent = upstream.history[-1].messages
    assert [m["content"] for m in sent if m["role"] == "user"] == ["Tell me a joke"]
    assert all(m["content"] != "first try" for m in sent)


async def test_regenerate_streams_like_chat(upstream, manager):
    client = AsyncClient()
    first = (await post_chat(client, {"message": "Hi"})).json()
    upstream.enqueue(Script(chunks=["a", "b"]))

    response = await client.post(
        f"/api/messages/{first['message_id']}/regenerate", headers={"Accept": "text/event-stream"}
    )

    raw = b"".join([chunk async for chunk in response.streaming_content])
    frames = parse_sse(raw)
    assert [f["event"] for f in frames] == ["meta", "delta", "delta", "usage", "done"]


async def test_regenerate_refuses_what_it_cannot_do(upstream, manager):
    client = AsyncClient()
    first = (await post_chat(client, {"message": "one"})).json()
    second = (await post_chat(client, {"message": "two", "session_id": first["session_id"]})).json()
    user_message = await Message.objects.filter(role="user").order_by("created_at").afirst()

    older = await client.post(f"/api/messages/{first['message_id']}/regenerate")
    question = await client.post(f"/api/messages/{user_message.pk}/regenerate")
    stranger = await AsyncClient().post(f"/api/messages/{second['message_id']}/regenerate")
    upstream.enqueue(Script(chunks=["x", "y"], hang_after=1))
    live = await client.post(
        f"/api/messages/{second['message_id']}/regenerate", headers={"Accept": "text/event-stream"}
    )
    stream = aiter(live.streaming_content)
    preamble_and_meta = await anext(stream) + await anext(stream)
    live_id = parse_sse(preamble_and_meta)[0]["data"]["message_id"]
    running = await client.post(f"/api/messages/{live_id}/regenerate")

    assert (older.status_code, older.json()["code"]) == (400, "invalid")
    assert (question.status_code, question.json()["code"]) == (400, "invalid")
    assert stranger.status_code == 404
    assert (running.status_code, running.json()["code"]) == (409, "conflict")
    await client.post(f"/api/messages/{live_id}/stop")


async def test_the_model_request_goes_out_while_the_turn_is_saved(upstream, manager, monkeypatch):
    from chatbot_api import services

    save_turn = services._create_turn
    seen = []

    def create_turn(**kwargs):  # runs on the request's thread; the event loop is free meanwhile
        seen.append(upstream.wait_for_request(timeout=5))
        return save_turn(**kwargs)

    monkeypatch.setattr(services, "_create_turn", create_turn)
    upstream.enqueue(Script(chunks=["Hel", "lo"]))

    response = await post_chat(AsyncClient(), {"message": "Hi"})

    assert len(seen) == 1, "the upstream had the request before the turn was saved"
    body = response.json()
    assert response.status_code == 200 and body["response"] == "Hello" and body["status"] == "complete"
    assert (await Message.objects.aget(pk=body["message_id"])).content == "Hello"


async def test_a_turn_that_cannot_be_saved_cancels_the_model_request(
    upstream, manager, monkeypatch, chatbot_settings
):
    from django.db import DatabaseError

    from chatbot_api import services

    chatbot_settings(CONCURRENT_STREAMS=1)
    save_turn = services._create_turn

    def broken(**kwargs):
        upstream.wait_for_request(timeout=5)
        raise DatabaseError("disk I/O error")

    monkeypatch.setattr(services, "_create_turn", broken)
    upstream.enqueue(Script(chunks=["never"], hang_after=0))

    response = await post_chat(AsyncClient(raise_request_exception=False), {"message": "Hi"})

    assert response.status_code == 500 and response.json()["success"] is False
    assert (await upstream.wait_for_disconnect_async(0)).disconnected, "the model request was cancelled"
    assert await Message.objects.acount() == 0 and manager.running_count == 0
    monkeypatch.setattr(services, "_create_turn", save_turn)
    upstream.enqueue(Script(chunks=["ok"]))
    assert (await post_chat(AsyncClient(), {"message": "Hi"})).status_code == 200, "the slot was given back"


@pytest.mark.parametrize(
    "failure",
    [
        "django.db:OperationalError:couldn't get a connection after 30.00 sec",
        "redis.exceptions:ConnectionError:No connection available.",
    ],
)
async def test_a_busy_database_or_redis_is_a_503_to_retry_not_a_500(upstream, manager, monkeypatch, failure):
    import importlib

    from chatbot_api import services

    module, name, text = failure.split(":", 2)
    error = getattr(importlib.import_module(module), name)(text)

    def busy(**kwargs):  # what a connection pool that stayed empty for its timeout raises
        raise error

    monkeypatch.setattr(services, "_create_turn", busy)
    response = await post_chat(AsyncClient(), {"message": "Hi"})

    assert response.status_code == 503 and response["Retry-After"] == "5"
    body = response.json()
    assert body["success"] is False and body["code"] == "server_busy" and body["retryable"] is True
    assert await Message.objects.acount() == 0 and manager.running_count == 0


async def test_an_event_log_that_cannot_open_fails_the_saved_answer_and_frees_the_slot(
    upstream, manager, monkeypatch, chatbot_settings
):
    from redis.exceptions import ConnectionError as RedisConnectionError

    chatbot_settings(CONCURRENT_STREAMS=1)
    opened = manager.log.open

    async def refused(message_id):
        await upstream.wait_for_request_async()  # the model's request is out
        raise RedisConnectionError("Connection refused.")

    monkeypatch.setattr(manager.log, "open", refused)
    upstream.enqueue(Script(chunks=["never"], hang_after=0))
    response = await post_chat(AsyncClient(), {"message": "Hi"})

    assert response.status_code == 503 and response.json()["code"] == "server_busy"
    assert (await upstream.wait_for_disconnect_async(0)).disconnected, "the model request was cancelled"
    answer = await Message.objects.aget(role="assistant")
    assert (answer.status, answer.error_code) == ("failed", "server_busy"), "saved, then marked failed"
    monkeypatch.setattr(manager.log, "open", opened)
    upstream.enqueue(Script(chunks=["ok"]))
    assert (await post_chat(AsyncClient(), {"message": "Hi"})).status_code == 200, "the slot was given back"


async def test_a_client_named_answer_can_be_stopped_before_the_json_answer_comes_back(upstream, manager):
    import asyncio
    import uuid

    upstream.enqueue(Script(chunks=["a", "b", "c"], hang_after=2))
    client = AsyncClient()
    await client.get("/")
    answer_id = str(uuid.uuid4())

    pending = asyncio.create_task(post_chat(client, {"message": "Hi", "answer_id": answer_id}))
    await upstream.wait_for_request_async()
    stopped = await client.post(f"/api/messages/{answer_id}/stop")
    body = (await pending).json()

    assert stopped.status_code == 200 and stopped.json()["status"] == "stopped"
    assert (body["message_id"], body["status"], body["response"]) == (answer_id, "stopped", "ab")
    taken = await post_chat(client, {"message": "Again", "answer_id": answer_id})
    assert taken.status_code == 409 and taken.json()["code"] == "conflict"
    bad = await post_chat(client, {"message": "Hi", "answer_id": "not-a-uuid"})
    assert bad.status_code == 400 and bad.json()["code"] == "invalid"
    upstream.enqueue(Script(chunks=["again"]))
    regenerate_id = str(uuid.uuid4())
    regenerated = await client.post(
        f"/api/messages/{answer_id}/regenerate", {"answer_id": regenerate_id}, content_type="application/json"
    )
    assert regenerated.json()["message_id"] == regenerate_id


async def test_a_conversation_exports_as_markdown_and_json(upstream, manager):
    client = AsyncClient()
    upstream.enqueue(Script(chunks=["Use `print()`."]))
    body = (await post_chat(client, {"message": "How do I print in Python?"})).json()
    url = f"/api/conversations/{body['session_id']}/export"

    markdown = await client.get(url, {"as": "markdown"})
    assert markdown.status_code == 200 and markdown["Content-Type"].startswith("text/markdown")
    assert markdown["Content-Disposition"] == 'attachment; filename="how-do-i-print-in-python.md"'
    text = markdown.content.decode()
    assert text.startswith("# How do I print in Python?\n")
    assert "**You** · " in text and "How do I print in Python?" in text
    assert "**Assistant** (gpt-4.1-nano) · " in text and "Use `print()`." in text

    exported = (await client.get(url, {"as": "json"})).json()
    assert exported["session_id"] == body["session_id"]
    assert [(m["role"], m["content"]) for m in exported["messages"]] == [
        ("user", "How do I print in Python?"),
        ("assistant", "Use `print()`."),
    ]
    assert (
        exported["messages"][1]["completion_tokens"] == 1 and exported["messages"][1]["status"] == "complete"
    )

    assert (await client.get(url, {"as": "pdf"})).json()["code"] == "invalid"
    assert (await AsyncClient().get(url)).status_code == 404  # someone else's


async def test_conversations_are_searched_by_title_and_text(upstream, manager):
    client = AsyncClient()
    upstream.enqueue(Script(chunks=["Cats sleep most of the day."]), Script(chunks=["Paris is in France."]))
    cats = (await post_chat(client, {"message": "Tell me about my pet"})).json()["session_id"]
    paris = (await post_chat(client, {"message": "Capital of France?"})).json()["session_id"]

    async def found(query: str) -> list[str]:
        response = await client.get("/api/conversations/", {"q": query})
        assert response.status_code == 200
        return [c["session_id"] for c in response.json()]

    assert await found("cats") == [cats]  # in an answer's text, not the title
    assert await found("  FRANCE ") == [paris]  # title and text, any case, spaces trimmed
    assert await found("pet") == [cats]
    assert await found("zebra") == []
    assert await found("") == [paris, cats]  # no query: all, newest first
    assert (await AsyncClient().get("/api/conversations/", {"q": "cats"})).json() == []  # others' stay hidden


async def test_a_picked_model_answers_and_the_conversation_remembers_it(upstream, manager):
    client = AsyncClient()
    upstream.models = ["llama3.2:1b", "qwen2.5:0.5b"]
    listed = (await client.get("/api/models/")).json()
    assert listed == {"default": "gpt-4.1-nano", "models": ["gpt-4.1-nano", "llama3.2:1b", "qwen2.5:0.5b"]}

    first = (await post_chat(client, {"message": "Hi", "model": "qwen2.5:0.5b"})).json()
    assert first["model"] == "qwen2.5:0.5b" and upstream.history[-1].model == "qwen2.5:0.5b"
    second = (await post_chat(client, {"message": "Again", "session_id": first["session_id"]})).json()
    assert second["model"] == "qwen2.5:0.5b"  # remembered by the conversation
    conversation = (await client.get(f"/api/conversations/{first['session_id']}")).json()
    assert conversation["model"] == "qwen2.5:0.5b"

    regenerated = (await client.post(f"/api/messages/{second['message_id']}/regenerate")).json()
    assert regenerated["model"] == "qwen2.5:0.5b" and upstream.history[-1].model == "qwen2.5:0.5b"

    refused = await post_chat(client, {"message": "x", "session_id": first["session_id"], "model": "gpt-9"})
    assert refused.status_code == 404 and refused.json()["code"] == "model_not_found"
    assert await Message.objects.filter(conversation_id=first["session_id"]).acount() == 4  # nothing saved


async def test_an_edited_question_replaces_it_and_every_later_turn(upstream, manager):
    client = AsyncClient()
    upstream.enqueue(Script(chunks=["One."]), Script(chunks=["Two."]), Script(chunks=["Edited answer."]))
    first = (await post_chat(client, {"message": "First question"})).json()
    session = first["session_id"]
    second = (await post_chat(client, {"message": "Second question", "session_id": session})).json()
    assert second["question_id"]

    response = await client.post(
        f"/api/messages/{first['question_id']}/edit",
        {"message": "First question, edited"},
        content_type="application/json",
    )

    body = response.json()
    assert response.status_code == 200 and body["response"] == "Edited answer."
    stored = [
        (m.role, m.content)
        async for m in Message.objects.filter(conversation_id=session).order_by("created_at")
    ]
    assert stored == [("user", "First question, edited"), ("assistant", "Edited answer.")]
    sent = [m["content"] for m in upstream.history[-1].messages if m["role"] != "system"]
    assert sent == ["First question, edited"]  # the later turns are not in the model's context either
    assert (
        await client.post(
            f"/api/messages/{second['question_id']}/edit", {"message": "x"}, content_type="application/json"
        )
    ).status_code == 404  # replaced: gone
    assert (
        await client.post(
            f"/api/messages/{body['message_id']}/edit", {"message": "x"}, content_type="application/json"
        )
    ).json()["code"] == "invalid"  # an answer is not a question


async def test_the_stream_names_the_question_so_the_page_can_edit_it(upstream, manager):
    client = AsyncClient()
    upstream.enqueue(Script(chunks=["Hi"]))
    frames = await read_frames(await start_sse(client, {"message": "Hello"}))
    question = await Message.objects.aget(role="user", content="Hello")
    meta = frames[0][1]["data"]
    assert meta["type"] == "meta" and meta["question_id"] == str(question.id)
