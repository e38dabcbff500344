"""Tokens' users and users' quotas remembered per worker (`chatbot_api.lookups`): what changes through
Django is seen at once, a change made elsewhere (another worker) within AUTH_CACHE_SECONDS."""

from __future__ import annotations

import asyncio

import pytest
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import User
from django.test import AsyncClient
from rest_framework.authtoken.models import Token

from chatbot.asgi import application
from chatbot_api.models import Conversation, UserQuota
from tests.support.clients import post_chat

pytestmark = [pytest.mark.django_db(transaction=True)]


async def new_token(name: str = "tess") -> Token:
    return await Token.objects.acreate(user=await User.objects.acreate_user(name, password="pw-123456-x"))


async def models_status(key: str, kind: str = "Token") -> int:
    return (await AsyncClient().get("/api/models/", headers={"Authorization": f"{kind} {key}"})).status_code


async def test_a_deleted_token_is_refused_at_once(manager):
    token = await new_token()
    assert await models_status(token.key) == 200
    assert await models_status(token.key, "Bearer") == 200

    await token.adelete()

    assert await models_status(token.key) == 401
    assert await models_status(token.key, "Bearer") == 401


async def test_a_deactivated_user_is_refused_at_once(manager):
    token = await new_token()
    assert await models_status(token.key) == 200
    user = await User.objects.aget(pk=token.user_id)

    user.is_active = False
    await user.asave()

    assert await models_status(token.key) == 401


@pytest.mark.parametrize(
    ("cache_seconds", "status_right_after"),
    [(0.5, 200), (0, 401)],  # remembered until it expires; with the cache off, looked up every time
)
async def test_a_change_made_elsewhere_is_seen_within_the_cache_time(
    manager, chatbot_settings, cache_seconds, status_right_after
):
    chatbot_settings(AUTH_CACHE_SECONDS=cache_seconds)
    token = await new_token()
    assert await models_status(token.key) == 200

    # No signal here, as for a token deleted by another worker.
    await Token.objects.filter(key=token.key).aupdate(key="f" * 40)
    assert await models_status(token.key) == status_right_after
    await asyncio.sleep(cache_seconds + 0.1)
    assert await models_status(token.key) == 401


async def test_a_quota_set_in_the_admin_applies_to_the_next_answer(upstream, manager, chatbot_settings):
    chatbot_settings(REQUESTS_PER_MINUTE=5)
    token = await new_token()
    as_token = {"headers": {"Authorization": f"Token {token.key}"}}
    answered = await post_chat(AsyncClient(), **as_token)  # the user's (absent) quota is remembered
    assert answered.status_code == 200 and await Conversation.objects.filter(user_id=token.user_id).aexists()

    await UserQuota.objects.acreate(user_id=token.user_id, requests_per_minute=1)

    refused = await post_chat(AsyncClient(), **as_token)
    assert refused.status_code == 429 and refused.json()["limit"] == "requests_per_minute"


async def test_a_deleted_token_cannot_open_a_websocket(manager):
    token = await new_token()

    async def connects() -> bool:
        headers = [(b"origin", b"http://localhost"), (b"host", b"localhost")]
        headers.append((b"authorization", f"Token {token.key}".encode()))
        communicator = WebsocketCommunicator(application, "/ws/chat/", headers=headers)
        connected, _ = await communicator.connect()
        await communicator.disconnect()
        return connected

    assert await connects()
    await token.adelete()
    assert not await connects()  # refused, not taken as anonymous (which is allowed here)


@pytest.mark.parametrize(
    ("headers", "remembered", "needs_database"),
    [
        ({}, False, False),  # anonymous, no cookie: nothing to load
        ({"Authorization": "Bearer anonymous"}, False, False),
        ({"Authorization": "Token abc"}, False, True),
        ({"Authorization": "Token abc"}, True, False),
        ({"Authorization": "Bearer abc"}, True, False),
        ({"Cookie": "sessionid=xyz"}, True, True),  # the session and its user are loaded
    ],
)
def test_authentication_runs_on_the_event_loop_only_when_it_queries_nothing(
    headers, remembered, needs_database
):
    from django.test import RequestFactory

    from chatbot_api import lookups
    from chatbot_api.views import ChatView, ModelsView

    if remembered:
        lookups.token_users.put("abc", (User(pk=1), None))
    view = ChatView()
    request = view.initialize_request(RequestFactory().post("/api/chat/", headers=headers))
    assert view.initial_needs_database(request) is needs_database

    class ForeignAuthentication(ModelsView):
        authentication_classes = [*ModelsView.authentication_classes, type("Other", (), {})]

    assert ForeignAuthentication().initial_needs_database(request) is True


async def test_a_token_forgotten_between_the_check_and_the_authentication_queries_nothing(manager):
    """On the event loop a query would raise SynchronousOnlyOperation: the entry the check saw is
    the one used, even if another thread forgets it (a user saved) or it expires just then."""
    from django.test import RequestFactory

    from chatbot_api import lookups
    from chatbot_api.views import ModelsView

    token = await new_token()
    assert await models_status(token.key) == 200  # remembered now
    view = ModelsView()
    request = view.initialize_request(
        RequestFactory().get("/api/models/", headers={"Authorization": f"Token {token.key}"})
    )
    assert view.initial_needs_database(request) is False

    lookups.forget_all()
    view.initial(request)  # on the loop, as async_dispatch runs it

    assert request.user.pk == token.user_id
