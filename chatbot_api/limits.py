"""Per-user rate limits and token quotas, counted in Django's cache.

Three limits, each a setting with a per-user override (`UserQuota`, editable in the
admin) and 0 meaning "off":

- requests per minute (a fixed one-minute window),
- answers streaming at the same time,
- tokens per day (prompt + completion, UTC days), charged when an answer ends.

Anonymous callers are counted per client IP. With the Redis cache (`REDIS_URL`)
the counters are shared by every worker of the cluster.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from asgiref.sync import sync_to_async
from django.core.cache import cache

from . import metrics
from .conf import chatbot_setting
from .errors import ChatbotError
from .lookups import user_quotas
from .models import UserQuota

logger = logging.getLogger("chatbot.limits")

# How long a stream slot may stay counted if its worker dies without releasing it.
STREAM_SLOT_GRACE = 60
# Background attempts to give back a slot the cache refused (back-off up to 15 s each).
RELEASE_RETRIES = 12


class RateLimited(ChatbotError):
    status_code = 429
    code = "rate_limited"
    retryable = True

    def __init__(self, message: str, *, limit: str, retry_after: int):
        retry_after = max(int(retry_after), 1)
        super().__init__(
            message,
            headers={"Retry-After": str(retry_after)},
            extra={"limit": limit, "retry_after": retry_after},
        )
        self.limit = limit
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class Limits:
    requests_per_minute: int
    concurrent_streams: int
    tokens_per_day: int


class RateLimiter:
    """Checks and counts the limits of one client key ("user:<id>" or "ip:<address>")."""

    clock = staticmethod(time.time)  # tests pin it instead of sleeping

    def limits_for(self, user_id: int | None) -> Limits:
        defaults = Limits(
            chatbot_setting("REQUESTS_PER_MINUTE"),
            chatbot_setting("CONCURRENT_STREAMS"),
            chatbot_setting("TOKENS_PER_DAY"),
        )
        if user_id is None:
            return defaults
        quota = user_quotas.get_or_load(
            user_id, lambda user_id: UserQuota.objects.filter(user_id=user_id).first()
        )
        if quota is None:
            return defaults
        return Limits(
            *(
                default if override is None else override
                for default, override in zip(
                    (defaults.requests_per_minute, defaults.concurrent_streams, defaults.tokens_per_day),
                    (quota.requests_per_minute, quota.concurrent_streams, quota.tokens_per_day),
                    strict=True,
                )
            )
        )

    def acquire(self, client_key: str, user_id: int | None) -> bool:
        """Count a new answer, or raise `RateLimited` naming the limit.

        Returns whether a stream slot was taken (the concurrency limit is on), which
        `release()` must then give back. The concurrency limit is checked before the
        per-minute one: a request refused because too many answers run at once must not
        spend the minute's budget.
        """
        limits = self.limits_for(user_id)
        now = self.clock()
        if limits.tokens_per_day:
            used = cache.get(self._tokens_key(client_key, now), 0)
            if used >= limits.tokens_per_day:
                raise RateLimited(
                    f"Daily token quota of {limits.tokens_per_day} reached; it resets at midnight UTC.",
                    limit="tokens_per_day",
                    retry_after=_seconds_to_midnight(now),
                )
        holds_slot = False
        if limits.concurrent_streams:
            key = self._streams_key(client_key)
            cache.add(key, 0, timeout=self._slot_ttl())
            if cache.incr(key) > limits.concurrent_streams:
                cache.decr(key)
                raise RateLimited(
                    f"Too many answers at once: the limit is {limits.concurrent_streams}; "
                    "wait for one to finish or stop it.",
                    limit="concurrent_streams",
                    retry_after=5,
                )
            cache.touch(key, self._slot_ttl())
            holds_slot = True
        if limits.requests_per_minute:
            window = int(now // 60)
            key = f"chatbot:rl:req:{client_key}:{window}"
            cache.add(key, 0, timeout=120)
            if cache.incr(key) > limits.requests_per_minute:
                if holds_slot:
                    self.release(client_key)
                raise RateLimited(
                    f"Too many requests: the limit is {limits.requests_per_minute} a minute.",
                    limit="requests_per_minute",
                    retry_after=(window + 1) * 60 - now,
                )
        return holds_slot

    def release(self, client_key: str, *, tokens: int = 0, slot: bool = True) -> None:
        """An answer ended: free its stream slot (if it held one) and charge its tokens."""
        if slot:
            key = self._streams_key(client_key)
            try:
                if cache.decr(key) < 0:
                    cache.set(key, 0, timeout=self._slot_ttl())
            except ValueError:  # the slot expired meanwhile
                pass
        if tokens:
            tokens_key = self._tokens_key(client_key, self.clock())
            cache.add(tokens_key, 0, timeout=2 * 86400)
            cache.incr(tokens_key, tokens)

    def streams_in_use(self, client_key: str) -> int:
        """Stream slots counted for this client now (tests and the fault suite check for leaks)."""
        return cache.get(self._streams_key(client_key), 0)

    def tokens_used_today(self, client_key: str) -> int:
        return cache.get(self._tokens_key(client_key, self.clock()), 0)

    @staticmethod
    def _streams_key(client_key: str) -> str:
        return f"chatbot:rl:streams:{client_key}"

    @staticmethod
    def _tokens_key(client_key: str, now: float) -> str:
        return f"chatbot:rl:tokens:{client_key}:{datetime.fromtimestamp(now, UTC):%Y%m%d}"

    @staticmethod
    def _slot_ttl() -> int:
        return int(chatbot_setting("TOTAL_TIMEOUT")) + STREAM_SLOT_GRACE


def _seconds_to_midnight(now: float) -> int:
    return 86400 - int(now) % 86400


rate_limiter = RateLimiter()


# The one place slots are taken and given back (the request, the generation's end, the sweep).


async def take_slot(client_key: str, user_id: int | None) -> bool:
    """`acquire()` off the event loop: whether a concurrency slot was taken (RateLimited if refused)."""
    try:
        # The request's own thread (asgiref's): acquire() reads the user's quota from the database.
        return await sync_to_async(rate_limiter.acquire)(client_key, user_id)
    except RateLimited as error:
        metrics.RATE_LIMITED.labels(error.limit).inc()
        raise


async def give_back(client_key: str, *, slot: bool, tokens: int = 0) -> None:
    """Free an answer's slot and charge its tokens, on a thread of its own.

    The counters live in the cache (Redis in a cluster): a slow or frozen cache must not
    hold up the caller, and a release it refused is retried in the background until it
    works, so no slot stays taken for longer than the cache is down.
    """
    if not client_key or not (slot or tokens):
        return
    if not await _release(client_key, slot, tokens, log_failure=False):
        from .streaming.tasks import detached_task

        detached_task(_release_later(client_key, slot, tokens), name=f"release-{client_key}")


async def _release(client_key: str, slot: bool, tokens: int, *, log_failure: bool) -> bool:
    try:
        await asyncio.to_thread(rate_limiter.release, client_key, tokens=tokens, slot=slot)
        return True
    except Exception:
        if log_failure:
            logger.error("releasing the rate-limit slot of %s failed", client_key, exc_info=True)
        return False


async def _release_later(client_key: str, slot: bool, tokens: int) -> None:
    delay = 0.5
    for _attempt in range(RELEASE_RETRIES):  # about two minutes; after that the slot expires by itself
        await asyncio.sleep(delay)
        if await _release(client_key, slot, tokens, log_failure=False):
            return
        delay = min(delay * 2, 15)
    await _release(client_key, slot, tokens, log_failure=True)
