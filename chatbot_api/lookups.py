"""Per-request lookups every answer repeats, remembered for a few seconds in this process.

Each started answer looked up its API token's user and its user's quota in the
database: two queries (and, for the token, a thread hop) per start, for values that
change a few times a year. They are kept `CHATBOT AUTH_CACHE_SECONDS` (default 5) per
worker. A change made through Django (the admin, a deleted token, a deactivated user)
is forgotten at once in the process that made it, by the signals below; other workers
see it within those seconds. 0 looks them up on every request.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable

from django.conf import settings
from django.db.models.signals import post_delete, post_save
from rest_framework.authtoken.models import Token

from .conf import chatbot_setting
from .models import UserQuota

MISSING = object()


class Remembered:
    """A bounded map of looked-up values that expire after AUTH_CACHE_SECONDS.

    Read on the event loop and in request threads: a dict's get/set are atomic; the lock
    only keeps the eviction and the forgetting consistent with each other.
    """

    def __init__(self, max_entries: int = 10_000):
        self.max_entries = max_entries
        self._entries: dict[Hashable, tuple[float, object]] = {}
        self._lock = threading.Lock()

    def get(self, key: Hashable):
        entry = self._entries.get(key)
        if entry is None or entry[0] <= time.monotonic():
            return MISSING
        return entry[1]

    def get_or_load(self, key: Hashable, load: Callable[[Hashable], object]):
        """The remembered value, else `load(key)`'s, remembered (an exception is not)."""
        found = self.get(key)
        if found is MISSING:
            found = load(key)
            self.put(key, found)
        return found

    def put(self, key: Hashable, value) -> None:
        ttl = chatbot_setting("AUTH_CACHE_SECONDS")
        if not ttl:
            return
        with self._lock:
            if len(self._entries) >= self.max_entries:
                self._entries.pop(next(iter(self._entries)))  # the oldest put
            self._entries[key] = (time.monotonic() + ttl, value)

    def forget(self, key: Hashable) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def forget_where(self, matches: Callable[[object], bool]) -> None:
        with self._lock:
            for key in [key for key, (_, value) in self._entries.items() if matches(value)]:
                del self._entries[key]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


# API token key -> (user, token), as DRF's TokenAuthentication returns them.
token_users = Remembered()
# user id -> the user's UserQuota, or None.
user_quotas = Remembered()


def forget_all() -> None:
    """For tests: a flushed database reuses ids and sends no signals."""
    token_users.clear()
    user_quotas.clear()


def _forget_token(sender, instance: Token, **kwargs):
    token_users.forget(instance.key)


def _forget_user(sender, instance, **kwargs):
    token_users.forget_where(lambda found: found[0].pk == instance.pk)
    user_quotas.forget(instance.pk)


def _forget_quota(sender, instance: UserQuota, **kwargs):
    user_quotas.forget(instance.user_id)


for signal in (post_save, post_delete):
    signal.connect(_forget_token, sender=Token, weak=False)
    signal.connect(_forget_user, sender=settings.AUTH_USER_MODEL, weak=False)
    signal.connect(_forget_quota, sender=UserQuota, weak=False)
