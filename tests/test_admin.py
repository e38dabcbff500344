"""The Django admin is usable for conversations, messages, usage and per-user limits."""

import pytest
from django.contrib.auth.models import User

from chatbot_api.models import Conversation, Message, UsageRecord, UserQuota

pytestmark = pytest.mark.django_db


@pytest.fixture
def staff_client(client):
    admin = User.objects.create_superuser("root", "root@example.com", "pw-root-123456")
    client.force_login(admin)
    return client


def test_admin_pages_render(staff_client):
    conversation = Conversation.objects.create(session_key="k" * 32, title="Hello")
    message = Message.objects.create(
        conversation=conversation, role="assistant", content="Hi", status="complete"
    )
    UsageRecord.objects.create(
        message=message,
        client_key="ip:127.0.0.1",
        provider="local",
        model="m",
        prompt_tokens=3,
        completion_tokens=2,
        outcome="complete",
    )
    user = User.objects.create_user("bob", password="pw-bob-123456")
    for url in [
        "/admin/chatbot_api/conversation/",
        f"/admin/chatbot_api/conversation/{conversation.pk}/change/",
        "/admin/chatbot_api/message/?status__exact=complete",
        f"/admin/chatbot_api/message/{message.pk}/change/",
        "/admin/chatbot_api/usagerecord/?outcome__exact=complete",
        f"/admin/auth/user/{user.pk}/change/",
    ]:
        assert staff_client.get(url).status_code == 200, url


def test_staff_sets_a_per_user_limit_from_the_user_page(staff_client):
    user = User.objects.create_user("carol", password="pw-carol-123456")
    page = staff_client.get(f"/admin/auth/user/{user.pk}/change/")
    form = {k: v for k, v in page.context["adminform"].form.initial.items() if v is not None}
    form.update(
        username="carol",
        date_joined_0="2026-01-01",
        date_joined_1="00:00:00",
        **{
            "chat_quota-TOTAL_FORMS": "1",
            "chat_quota-INITIAL_FORMS": "0",
            "chat_quota-MIN_NUM_FORMS": "0",
            "chat_quota-MAX_NUM_FORMS": "1",
            "chat_quota-0-requests_per_minute": "5",
            "chat_quota-0-tokens_per_day": "1000",
            "chat_quota-0-user": str(user.pk),
        },
    )
    response = staff_client.post(f"/admin/auth/user/{user.pk}/change/", form)
    assert response.status_code == 302, response.context["adminform"].form.errors if response.context else ""
    quota = UserQuota.objects.get(user=user)
    assert (quota.requests_per_minute, quota.concurrent_streams, quota.tokens_per_day) == (5, None, 1000)
