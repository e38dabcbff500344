"""Brute-force protection: failed sign-ins are counted per account and per client address.

Every way in that checks a password (the login page, the admin, `POST /api/token/`) goes
through `django.contrib.auth.authenticate()`, so the counting and the refusal live there:
`user_login_failed` counts, `ThrottledModelBackend` refuses while a counter is over its
limit (even the right password: that is what makes guessing pointless). The views add a
clear message and, for the API, a 429 with `Retry-After`. Counters live in Django's cache
(Redis in a cluster, so every worker sees them) and expire `LOGIN_LOCKOUT_SECONDS` after
the first failure of a window. A successful sign-in clears its account's counter.
"""

from __future__ import annotations

import hashlib
import logging

from django.contrib.auth import user_logged_in, user_login_failed
from django.contrib.auth.backends import ModelBackend
from django.core.cache import cache
from django.core.exceptions import PermissionDenied
from django.dispatch import receiver

from .conf import chatbot_setting

logger = logging.getLogger("chatbot.security")


class LoginThrottled(PermissionDenied):
    def __init__(self, retry_after: int):
        super().__init__(f"Too many failed sign-ins. Try again in {max(retry_after // 60, 1)} minute(s).")
        self.retry_after = retry_after


def _keys(username: str | None, ip: str | None) -> list[tuple[str, int]]:
    keys = []
    if username:
        digest = hashlib.sha256(username.strip().lower().encode()).hexdigest()[:32]
        keys.append((f"chatbot:login:account:{digest}", chatbot_setting("LOGIN_FAILURES_PER_ACCOUNT")))
    if ip:
        keys.append((f"chatbot:login:ip:{ip}", chatbot_setting("LOGIN_FAILURES_PER_IP")))
    return [(key, limit) for key, limit in keys if limit]


def client_ip(request) -> str | None:
    return request.META.get("REMOTE_ADDR") if request is not None else None


def check(request, username: str | None) -> None:
    """Raise `LoginThrottled` if this account or the request's address failed too often lately.

    The backend calls it before any password is checked; the views call it first too, to
    answer with a clear message (and a 429 for the API) instead of "wrong password".
    """
    for key, limit in _keys(username, client_ip(request)):
        if (cache.get(key) or 0) >= limit:
            raise LoginThrottled(int(chatbot_setting("LOGIN_LOCKOUT_SECONDS")))


def record_failure(username: str | None, ip: str | None) -> None:
    lockout = int(chatbot_setting("LOGIN_LOCKOUT_SECONDS"))
    for key, limit in _keys(username, ip):
        cache.add(key, 0, timeout=lockout)
        if cache.incr(key) == limit:
            kind = "an account" if ":account:" in key else f"address {ip}"
            logger.warning("sign-ins throttled for %s after %d failures", kind, limit)


def clear_account(username: str | None) -> None:
    for key, _ in _keys(username, None):
        cache.delete(key)


class ThrottledModelBackend(ModelBackend):
    """Django's model backend, refusing while the account or the client address is throttled."""

    def authenticate(self, request, username=None, password=None, **kwargs):
        check(request, username)  # PermissionDenied makes authenticate() stop here
        user = super().authenticate(request, username=username, password=password, **kwargs)
        if user is not None:
            clear_account(username)
        return user


@receiver(user_login_failed)
def _count_failure(sender, credentials, request=None, **kwargs):
    record_failure(credentials.get("username"), client_ip(request))


@receiver(user_logged_in)
def _clear_on_success(sender, request, user, **kwargs):
    clear_account(user.get_username())
