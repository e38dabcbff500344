"""Identity (users, tokens, anonymous switch), ownership isolation, /metrics and logs."""

from __future__ import annotations

import logging

import pytest
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import User
from django.test import AsyncClient
from prometheus_client.parser import text_string_to_metric_families
from rest_framework.authtoken.models import Token

from chatbot.asgi import application
from chatbot_api.models import Message
from tests.support.clients import post_chat, websocket
from tests.support.fake_openai import Script

pytestmark = [pytest.mark.django_db(transaction=True)]


async def user_client(name: str) -> tuple[AsyncClient, User]:
    user = await User.objects.acreate_user(name, password=f"pw-{name}-123456")
    client = AsyncClient()
    await client.aforce_login(user)
    return client, user


async def test_signed_in_users_own_their_conversations(upstream, manager):
    alice, alice_user = await user_client("alice")
    bob, _ = await user_client("bob")
    anonymous = AsyncClient()
    upstream.enqueue(Script(chunks=["alice's"], hang_after=1))
    body = await post_chat(alice, headers={"Accept": "application/x-ndjson"})
    first = await anext(aiter(body.streaming_content))
    message_id = first.decode().split('"message_id":"')[1].split('"')[0]
    session_id = (await Message.objects.select_related("conversation").aget(pk=message_id)).conversation_id

    for other in (bob, anonymous):
        for response in [
            await other.get(f"/api/messages/{message_id}"),
            await other.get(f"/api/messages/{message_id}/events"),
            await other.post(f"/api/messages/{message_id}/stop"),
            await other.get(f"/api/conversations/{session_id}"),
            await other.patch(
                f"/api/conversations/{session_id}", {"title": "x"}, content_type="application/json"
            ),
            await other.delete(f"/api/conversations/{session_id}"),
            await post_chat(other, session_id=None)
            if False
            else await other.post(
                "/api/chat/", {"message": "x", "session_id": str(session_id)}, content_type="application/json"
            ),
        ]:
            assert response.status_code == 404, response.content
        assert (await other.get("/api/conversations/")).json() == []

    conversations = (await alice.get("/api/conversations/")).json()
    assert [c["session_id"] for c in conversations] == [str(session_id)]
    assert (await alice.post(f"/api/messages/{message_id}/stop")).json()["status"] == "stopped"
    assert (
        await Message.objects.select_related("conversation").aget(pk=message_id)
    ).conversation.user_id == (alice_user.pk)


async def test_websocket_ownership_across_users(upstream, manager):
    alice, _ = await user_client("alice")
    body = (await post_chat(alice)).json()
    bob, _ = await user_client("bob")
    ws = await websocket(session_key=bob.cookies["sessionid"].value)
    await ws.send_json_to({"type": "resume", "message_id": body["message_id"], "after": 0})
    assert (await ws.receive_json_from(timeout=5))["code"] == "message_not_found"
    await ws.disconnect()


async def test_api_token_authentication_needs_no_csrf(upstream, manager):
    user = await User.objects.acreate_user("carol", password="pw-carol-123456")
    response = await AsyncClient().post(
        "/api/token/", {"username": "carol", "password": "pw-carol-123456"}, content_type="application/json"
    )
    token = response.json()["token"]
    assert token == (await Token.objects.aget(user=user)).key
    client = AsyncClient(enforce_csrf_checks=True)
    auth = {"Authorization": f"Token {token}"}

    first = (await post_chat(client, headers=auth)).json()
    second = await client.post(
        "/api/chat/",
        {"message": "again", "session_id": first["session_id"]},
        content_type="application/json",
        headers=auth,
    )

    assert second.status_code == 200, "a token client continues its conversations without cookies"
    ws = await websocket(token=token)
    await ws.send_json_to({"type": "resume", "message_id": first["message_id"], "after": 0})
    assert (await ws.receive_json_from(timeout=5))["type"] == "meta"
    await ws.disconnect()


async def test_bad_token_is_rejected_in_the_error_shape(manager):
    response = await post_chat(AsyncClient(), headers={"Authorization": "Token nope"})
    assert response.status_code == 401
    assert response.json()["success"] is False and response.json()["code"] == "authentication_failed"


async def test_csrf_applies_to_anonymous_cookie_sessions(upstream, manager):
    client = AsyncClient(enforce_csrf_checks=True)
    await client.get("/")
    refused = await post_chat(client)
    assert refused.status_code == 403 and refused.json()["success"] is False
    allowed = await post_chat(client, headers={"X-CSRFToken": client.cookies["csrftoken"].value})
    assert allowed.status_code == 200


async def test_anonymous_use_can_be_switched_off(upstream, manager, chatbot_settings):
    chatbot_settings(ALLOW_ANONYMOUS=False)
    response = await post_chat(AsyncClient())
    assert response.status_code in (401, 403) and response.json()["code"] == "not_authenticated"
    client, _ = await user_client("dave")
    assert (await post_chat(client)).status_code == 200
    ws = WebsocketCommunicator(
        application, "/ws/chat/", headers=[(b"origin", b"http://localhost"), (b"host", b"localhost")]
    )
    connected, code = await ws.connect()
    assert not connected and code == 4403
    page = await AsyncClient().get("/")
    assert page.status_code == 302 and "/login/" in page["Location"]


async def test_login_page_renders():
    response = await AsyncClient().get("/login/")
    assert response.status_code == 200 and b"csrfmiddlewaretoken" in response.content


def metric_values(text: str) -> dict:
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


async def test_metrics_parse_and_move(upstream, manager):
    client = AsyncClient()
    before = metric_values((await client.get("/metrics")).content.decode())
    upstream.enqueue(Script(chunks=["a", "b"], usage={"prompt_tokens": 7, "completion_tokens": 2}))
    await post_chat(client)
    upstream.enqueue(Script(status=500))
    await post_chat(client)

    response = await client.get("/metrics")

    assert response.status_code == 200 and response["Content-Type"].startswith("text/plain")
    after = metric_values(response.content.decode())

    def moved(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    model = {"provider": "openai", "model": "gpt-4.1-nano"}
    assert moved("chatbot_answers_total", outcome="complete", **model) == 1
    assert moved("chatbot_answers_total", outcome="failed", **model) == 1
    assert moved("chatbot_tokens_total", direction="prompt", **model) >= 7
    assert moved("chatbot_chat_requests_total", transport="json") == 2
    assert moved("chatbot_upstream_errors_total", provider="openai", code="upstream_error") == 1
    assert moved("chatbot_time_to_first_token_seconds_count", **model) == 1
    assert moved("chatbot_answer_duration_seconds_count", outcome="complete", **model) == 1
    assert ("chatbot_answers_streaming", ()) in after


async def test_metrics_rejections_count(upstream, manager, chatbot_settings):
    chatbot_settings(REQUESTS_PER_MINUTE=1)
    client = AsyncClient()
    before = metric_values((await client.get("/metrics")).content.decode())
    await post_chat(client)
    await post_chat(client)
    after = metric_values((await client.get("/metrics")).content.decode())
    key = ("chatbot_rate_limited_total", (("limit", "requests_per_minute"),))
    assert after[key] - before.get(key, 0) == 1


async def test_metrics_access_is_restricted(chatbot_settings):
    chatbot_settings(METRICS_ALLOWED_IPS=[], METRICS_TOKEN="metrics-secret")
    assert (await AsyncClient().get("/metrics")).status_code == 403
    assert (await AsyncClient().get("/metrics", headers={"Authorization": "Bearer wrong"})).status_code == 403
    allowed = await AsyncClient().get("/metrics", headers={"Authorization": "Bearer metrics-secret"})
    assert allowed.status_code == 200 and b"chatbot_answers" in allowed.content


async def test_one_log_line_per_answer_without_content_or_secrets(upstream, manager, caplog):
    caplog.set_level(logging.DEBUG)
    upstream.enqueue(Script(chunks=["PRIVATE-ANSWER-42"]))
    client, _ = await user_client("erin")
    token = await Token.objects.acreate(user=await User.objects.aget(username="erin"))

    body = (await post_chat(client, "PRIVATE-QUESTION-17")).json()

    text = caplog.text
    for secret in (
        "PRIVATE-QUESTION-17",
        "PRIVATE-ANSWER-42",
        "sk-test-not-a-real-key",
        token.key,
        "pw-erin-123456",
    ):
        assert secret not in text
    lines = [
        r.getMessage()
        for r in caplog.records
        if r.name == "chatbot.generation" and "answer" in r.getMessage()
    ]
    assert len(lines) == 1
    assert f"message={body['message_id']}" in lines[0]
    for field in (
        "model=gpt-4.1-nano",
        "outcome=complete",
        "prompt_tokens=",
        "completion_tokens=",
        "ttft_ms=",
        "duration_ms=",
    ):
        assert field in lines[0]


def test_a_new_session_is_written_once_and_later_changes_still_are():
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from chatbot_api.sessions import SessionStore

    def writes(queries):
        return [q["sql"].split()[0] for q in queries if q["sql"].startswith(("INSERT", "UPDATE"))]

    with CaptureQueriesContext(connection) as queries:
        session = SessionStore()
        session.create()  # what owner_for() does for a new visitor
        session.save()  # what SessionMiddleware does next, because create() marked it modified
    assert writes(queries) == ["INSERT"]
    assert not [q for q in queries if q["sql"].startswith("SELECT")], (
        "no lookup of the new key before its INSERT"
    )

    with CaptureQueriesContext(connection) as queries:
        session["theme"] = "dark"
        session.save()
    assert writes(queries) == ["UPDATE"]
    assert SessionStore(session.session_key).load() == {"theme": "dark"}


def test_a_new_session_key_that_is_taken_is_drawn_again(monkeypatch):
    from chatbot_api.sessions import SessionStore

    taken = SessionStore()
    taken.create()
    keys = iter([taken.session_key, "k" * 32])
    monkeypatch.setattr(SessionStore, "_get_new_session_key", lambda self: next(keys))

    session = SessionStore()
    session["theme"] = "light"
    session.create()

    assert session.session_key == "k" * 32  # the INSERT of the taken key failed, the next one won
    assert SessionStore(taken.session_key).load() == {}, "the session that had the key is untouched"


async def test_a_cookieless_request_gets_a_working_session_cookie(upstream, manager):
    from chatbot_api.sessions import SessionStore

    client = AsyncClient()
    first = await post_chat(client)
    key = first.cookies["sessionid"].value
    assert first.status_code == 200 and await SessionStore().aexists(key)
    again = await client.post(
        "/api/chat/",
        {"message": "More", "session_id": first.json()["session_id"]},
        content_type="application/json",
    )
    assert again.status_code == 200 and again.json()["session_id"] == first.json()["session_id"]
