"""Brute-force protection: repeated failed sign-ins are refused per account and per address."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import User
from django.test import Client

pytestmark = [pytest.mark.django_db]

PASSWORD = "pw-dave-123456"


@pytest.fixture
def dave(chatbot_settings):
    chatbot_settings(LOGIN_FAILURES_PER_ACCOUNT=5, LOGIN_FAILURES_PER_IP=8, LOGIN_LOCKOUT_SECONDS=600)
    return User.objects.create_user("dave", password=PASSWORD)


def token(client: Client, username: str, password: str, ip: str = "10.0.0.1"):
    return client.post(
        "/api/token/", {"username": username, "password": password}, content_type="application/json",
        REMOTE_ADDR=ip,
    )  # fmt: skip


def test_api_token_guessing_is_throttled_then_even_the_right_password_waits(dave):
    client = Client()
    for _ in range(5):
        assert token(client, "dave", "wrong").status_code == 400

    refused = token(client, "dave", PASSWORD)

    assert refused.status_code == 429 and refused["Retry-After"] == "600"
    body = refused.json()
    assert body["success"] is False and body["code"] == "login_throttled" and "minute" in body["error"]
    assert token(client, "DAVE ", PASSWORD).status_code == 429, "the account, however it is spelled"


def test_one_address_guessing_many_accounts_is_throttled(dave):
    client = Client()
    for n in range(8):
        assert token(client, f"user{n}", "wrong", ip="10.0.0.9").status_code == 400

    assert token(client, "dave", PASSWORD, ip="10.0.0.9").status_code == 429
    assert token(client, "dave", PASSWORD, ip="10.0.0.10").status_code == 200, "another address is not"


def test_the_login_page_says_so_and_does_not_sign_in(dave):
    client = Client()
    for _ in range(5):
        page = client.post("/login/", {"username": "dave", "password": "wrong"}, REMOTE_ADDR="10.0.0.2")
        assert page.status_code == 200 and not page.wsgi_request.user.is_authenticated

    page = client.post("/login/", {"username": "dave", "password": PASSWORD}, REMOTE_ADDR="10.0.0.2")

    assert page.status_code == 200 and "Too many failed sign-ins" in page.content.decode()
    assert "_auth_user_id" not in client.session


def test_the_admin_is_protected_by_the_same_counters(dave):
    dave.is_staff = dave.is_superuser = True
    dave.save()
    client = Client()
    for _ in range(5):
        token(client, "dave", "wrong")

    page = client.post("/admin/login/", {"username": "dave", "password": PASSWORD, "next": "/admin/"})

    assert page.status_code == 200 and "_auth_user_id" not in client.session


def test_a_successful_sign_in_clears_the_account_counter(dave):
    client = Client()
    for _ in range(4):
        token(client, "dave", "wrong", ip="10.0.1.1")
    assert token(client, "dave", PASSWORD, ip="10.0.1.1").status_code == 200
    for _ in range(4):  # from another address: only the account counter could add up
        assert token(client, "dave", "wrong", ip="10.0.1.2").status_code == 400
    assert token(client, "dave", PASSWORD, ip="10.0.1.2").status_code == 200


def test_deeply_nested_token_bodies_are_a_400(dave):
    response = Client().generic("POST", "/api/token/", b"[" * 50_000, content_type="application/json")

    assert response.status_code == 400 and response.json()["success"] is False
