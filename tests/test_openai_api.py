"""The OpenAI API (`/v1/`), driven by clients nobody here wrote: the official `openai` SDK
over real HTTP against the whole product under uvicorn, `curl -N`-style raw streams with
httpx, and the `llm` command line tool. The model behind is the fake OpenAI upstream."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import openai
import pytest
from rest_framework.authtoken.models import Token

from chatbot_api.models import Conversation, Message
from tests.support.fake_openai import Script

MODEL = "gpt-4.1-nano"  # the upstream fixture's configured model


@pytest.fixture
def token(transactional_db, django_user_model):
    user = django_user_model.objects.create_user("grace", password="pw-for-tests")
    return Token.objects.create(user=user).key


@pytest.fixture
def client(live_server_url, upstream, token):
    with openai.OpenAI(base_url=f"{live_server_url}/v1", api_key=token, max_retries=0, timeout=20) as sdk:
        yield sdk


def raw_frames(lines) -> list[tuple[str | None, str]]:
    """(SSE id, data) of each frame of a response's lines, to `[DONE]` or an error frame."""
    frames, current_id = [], None
    for line in lines:
        if line.startswith("id: "):
            current_id = line[4:]
        elif line.startswith("data: "):
            frames.append((current_id, line[6:]))
            current_id = None
            if line[6:] == "[DONE]" or '"error"' in line[:20]:
                break
    return frames


def content_of(frames) -> str:
    text = ""
    for _, data in frames:
        if data != "[DONE]":
            for choice in json.loads(data).get("choices", []):
                text += choice["delta"].get("content") or ""
    return text


def test_create_returns_a_chat_completion_and_saves_the_call_as_a_conversation(client, upstream):
    upstream.enqueue(Script(chunks=["Paris", " is", " the", " capital."]))
    history = [
        {"role": "system", "content": "Answer in one sentence."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! Ask me anything."},
        {"role": "user", "content": "What is the capital of France?"},
    ]

    completion = client.chat.completions.create(model=MODEL, messages=history)

    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-") and completion.model == MODEL
    assert completion.choices[0].message.content == "Paris is the capital."
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.completion_tokens == 4
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 4
    # The model got the messages as sent, the client's system prompt instead of the configured one.
    assert upstream.history[-1].messages == history
    conversation = Conversation.objects.get()
    stored = [(m.role, m.content) for m in conversation.messages.order_by("created_at")]
    assert stored == [
        ("user", "Hi"),
        ("assistant", "Hello! Ask me anything."),
        ("user", "What is the capital of France?"),
        ("assistant", "Paris is the capital."),
    ]
    answer = Message.objects.get(pk=completion.id.removeprefix("chatcmpl-"))
    assert (answer.transport, answer.streaming, answer.status) == ("openai", False, "complete")


def test_stream_true_yields_role_content_finish_and_usage_chunks(client, upstream):
    upstream.enqueue(Script(chunks=["One", " two", " three"]))

    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Count"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)

    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "One two three"
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finish] == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"
    assert Message.objects.get(pk=chunks[0].id.removeprefix("chatcmpl-")).streaming is True


def test_a_conversation_continues_from_its_stored_history(client, upstream):
    upstream.enqueue(Script(chunks=["Blue."]), Script(chunks=["Still blue."]))
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "Favourite colour?"}]
    )
    conversation_id = raw.headers["X-Conversation-Id"]
    assert raw.parse().choices[0].message.content == "Blue."

    again = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Sure?"}],
        extra_headers={"X-Conversation-Id": conversation_id},
    )

    assert again.choices[0].message.content == "Still blue."
    sent = [(m["role"], m["content"]) for m in upstream.history[-1].messages if m["role"] != "system"]
    assert sent == [("user", "Favourite colour?"), ("assistant", "Blue."), ("user", "Sure?")]
    assert Conversation.objects.count() == 1


def test_errors_are_the_sdks_own_exception_classes(client, upstream, live_server_url, chatbot_settings):
    with pytest.raises(openai.NotFoundError) as not_found:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    assert not_found.value.code == "model_not_found"

    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], n=2)
    assert bad.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError, match="tools"):
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "x"}],
            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
        )

    with openai.OpenAI(base_url=f"{live_server_url}/v1", api_key="wrong", max_retries=0) as stranger:
        with pytest.raises(openai.AuthenticationError):
            stranger.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])

    chatbot_settings(REQUESTS_PER_MINUTE=1)
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "first"}])
    with pytest.raises(openai.RateLimitError) as limited:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "second"}])
    assert int(limited.value.response.headers["Retry-After"]) > 0
    assert limited.value.body["type"] == "rate_limit_error"


def test_a_model_failure_mid_stream_is_raised_as_api_error(client, upstream):
    upstream.enqueue(Script(chunks=["Half", " an", " answer"], error_frame_after=1))
    question = [{"role": "user", "content": "x"}]
    stream = client.chat.completions.create(model=MODEL, messages=question, stream=True)
    received = []
    with pytest.raises(openai.APIError) as failed:
        for chunk in stream:
            received.append(chunk)
    assert received and received[0].choices[0].delta.role == "assistant"
    assert failed.value.code == "upstream_error"
    answer = Message.objects.get(pk=received[0].id.removeprefix("chatcmpl-"))
    assert answer.status == "failed" and answer.content.startswith("Half")


def test_stop_sequences_and_limits_reach_the_model(client, upstream, chatbot_settings):
    chatbot_settings(MAX_TOKENS=50)
    upstream.enqueue(Script(chunks=["One."]), Script(chunks=["Two."]))
    client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], stop="\n\n", max_tokens=20, temperature=0.2
    )
    sent = upstream.history[-1].body
    assert (sent["stop"], sent["max_tokens"], sent["temperature"]) == (["\n\n"], 20, 0.2)

    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=5000)
    assert upstream.history[-1].body["max_tokens"] == 50  # the operator's cap wins
    assert "stop" not in upstream.history[-1].body
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], stop=[""])


def test_models_list_has_the_configured_model_then_the_upstreams(client, upstream):
    upstream.models = ["llama3.2:1b", MODEL, "qwen2.5:0.5b"]
    assert [model.id for model in client.models.list()] == [MODEL, "llama3.2:1b", "qwen2.5:0.5b"]
    assert client.models.retrieve("qwen2.5:0.5b").owned_by == "openai"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-9")

    upstream.enqueue(Script(chunks=["Small model here."]))
    question = [{"role": "user", "content": "x"}]
    completion = client.chat.completions.create(model="qwen2.5:0.5b", messages=question)
    assert completion.model == "qwen2.5:0.5b" and upstream.history[-1].model == "qwen2.5:0.5b"


def test_a_dropped_stream_resumes_from_last_event_id_without_duplicates(live_server_url, upstream, token):
    words = [f" w{i}" for i in range(30)]
    upstream.enqueue(Script(chunks=words, interval=0.02))
    headers = {"Authorization": f"Bearer {token}"}
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Go"}], "stream": True}

    with httpx.Client(base_url=live_server_url, headers=headers, timeout=20) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            first, last_id = [], None
            for line in response.iter_lines():  # read a few frames, then drop the connection
                if line.startswith("id: "):
                    last_id = line[4:]
                elif line.startswith("data: "):
                    first.append((last_id, line[6:]))
                    if len(first) == 6:
                        break
        completion_id = json.loads(first[0][1])["id"]

        resume = {"Accept": "text/event-stream", "Last-Event-ID": last_id}
        with http.stream("GET", f"/v1/chat/completions/{completion_id}", headers=resume) as response:
            assert response.status_code == 200
            rest = raw_frames(response.iter_lines())
        stored = http.get(f"/v1/chat/completions/{completion_id}").json()

    assert rest[-1][1] == "[DONE]"
    assert int(rest[0][0]) == int(last_id) + 1  # the first frame after the last one seen
    assert content_of(first) + content_of(rest) == "".join(words)
    assert stored["choices"][0]["message"]["content"] == "".join(words)
    with httpx.Client(base_url=live_server_url, headers=headers) as http:
        ended = {"Accept": "text/event-stream", "Last-Event-ID": rest[-2][0]}
        assert http.get(f"/v1/chat/completions/{completion_id}", headers=ended).status_code == 204


def test_stop_with_the_completion_id_ends_the_stream_with_done(live_server_url, upstream, token):
    upstream.enqueue(Script(chunks=[f" t{i}" for i in range(200)], interval=0.02))
    headers = {"Authorization": f"Bearer {token}"}
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Go on"}], "stream": True}

    with httpx.Client(base_url=live_server_url, headers=headers, timeout=20) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            completion_id = json.loads(first[6:])["id"]
            stopped = http.post(f"/api/messages/{completion_id}/stop")
            assert stopped.status_code == 200 and stopped.json()["status"] == "stopped"
            frames = raw_frames(lines)

    assert frames[-1][1] == "[DONE]"
    finish = json.loads(frames[-2][1])["choices"][0]["finish_reason"]
    assert finish == "stop"
    answer = Message.objects.get(pk=completion_id.removeprefix("chatcmpl-"))
    assert answer.status == "stopped" and answer.content == content_of(frames)


def test_anonymous_callers_only_when_allowed(live_server_url, upstream, chatbot_settings, transactional_db):
    upstream.enqueue(Script(chunks=["Hi stranger."]))
    with openai.OpenAI(base_url=f"{live_server_url}/v1", api_key="anonymous", max_retries=0) as anonymous:
        reply = anonymous.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}])
        assert reply.choices[0].message.content == "Hi stranger."

        chatbot_settings(ALLOW_ANONYMOUS=False)
        with pytest.raises(openai.AuthenticationError):
            anonymous.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}])


def test_the_llm_command_line_tool_streams_an_answer(live_server_url, upstream, token, tmp_path):
    """`llm` configured with an OpenAI-compatible model, the way its docs say, pointing here."""
    llm = os.path.join(os.path.dirname(sys.executable), "llm")
    (tmp_path / "extra-openai-models.yaml").write_text(
        f"- model_id: chatbot\n  model_name: {MODEL}\n"
        f"  api_base: {live_server_url}/v1\n  api_key_name: chatbot\n"
    )
    upstream.enqueue(Script(chunks=["Streamed", " to", " llm."], interval=0.02))
    env = {**os.environ, "LLM_USER_PATH": str(tmp_path)}
    started = time.monotonic()
    result = subprocess.run(
        [llm, "-m", "chatbot", "--key", token, "Say something"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "Streamed to llm."
    assert upstream.history[-1].body["stream"] is True  # llm streams by default
    assert time.monotonic() - started < 60
    assert Conversation.objects.filter(user__username="grace").count() == 1
