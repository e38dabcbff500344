"""Django settings for the streaming chatbot.

Every value an operator may change comes from the environment (or a `.env` file
in the project root); the README's configuration table lists them all. Defaults
are the embedded ones: SQLite, in-memory layers, the local model, DEBUG off.
"""

import os
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured
from dotenv import load_dotenv

BASE_DIR = Path(__file__).resolve().parent.parent
load_dotenv(BASE_DIR / ".env")


def env_bool(name: str, default: bool | None) -> bool | None:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise ImproperlyConfigured(f"{name}={raw!r} is not a boolean: use true or false.")


def env_number(name: str, default, cast=float, minimum=None):
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = cast(raw)
    except ValueError:
        raise ImproperlyConfigured(
            f"{name}={raw!r} is not a valid {cast.__name__}: fix it, or unset it to use the default."
        ) from None
    if minimum is not None and value < minimum:
        raise ImproperlyConfigured(f"{name} must be at least {minimum}, got {value}.")
    return value


def env_list(name: str, default: list[str] | None) -> list[str] | None:
    raw = os.environ.get(name)
    if not raw:
        return default
    return [item.strip() for item in raw.split(",") if item.strip()]


DEBUG = env_bool("DJANGO_DEBUG", False)

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "")
if not SECRET_KEY:
    if DEBUG or os.environ.get("CHATBOT_DEV_DEFAULTS") == "1":
        # Development only: `make run` sets CHATBOT_DEV_DEFAULTS so a fresh checkout starts.
        SECRET_KEY = "insecure-development-key-do-not-use-in-production"
    else:
        raise ImproperlyConfigured(
            "DJANGO_SECRET_KEY is not set. Generate one with "
            "`python -c 'import secrets; print(secrets.token_urlsafe(50))'` and put it in "
            "the environment or in .env (or set DJANGO_DEBUG=true for local development)."
        )

ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]"])
CSRF_TRUSTED_ORIGINS = env_list("DJANGO_CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    # daphne first: it makes `manage.py runserver` an ASGI server, so streaming,
    # background generations and WebSockets work there as under uvicorn.
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "channels",
    "chatbot_api",
    "chatbot_web",
]

# Django's own middlewares, with their hooks run on the event loop instead of a thread
# hop each (chatbot_api/middleware.py); the order is Django's usual one.
MIDDLEWARE = [
    "chatbot_api.middleware.SecurityMiddleware",
    "servestatic.middleware.ServeStaticMiddleware",
    "chatbot_api.middleware.SessionMiddleware",
    "chatbot_api.middleware.LocaleMiddleware",
    "chatbot_api.middleware.CommonMiddleware",
    "chatbot_api.middleware.CsrfViewMiddleware",
    "chatbot_api.middleware.AuthenticationMiddleware",
    "chatbot_api.middleware.MessageMiddleware",
    "chatbot_api.middleware.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "chatbot.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "django.template.context_processors.i18n",
            ],
        },
    },
]

WSGI_APPLICATION = "chatbot.wsgi.application"
ASGI_APPLICATION = "chatbot.asgi.application"

DATABASES = {
    "default": dj_database_url.parse(
        os.environ.get("DATABASE_URL") or f"sqlite:///{BASE_DIR / 'db.sqlite3'}",
        conn_max_age=int(env_number("DATABASE_CONN_MAX_AGE", 0, int, minimum=0)),
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # WAL lets the page read while a generation flushes; a busy timeout instead of
    # "database is locked" when two writers meet; and this process's writers queue on a
    # lock instead of polling SQLite's (chatbot_api/sqlite3/base.py).
    DATABASES["default"]["ENGINE"] = "chatbot_api.sqlite3"
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {
            "timeout": 20,
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
            "transaction_mode": "IMMEDIATE",
        }
    )
elif DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    # A connection pool per worker process (psycopg_pool): a burst with more requests in
    # flight than PostgreSQL's max_connections waits for a connection instead of failing
    # with "too many clients". Pooling replaces persistent connections (CONN_MAX_AGE).
    DATABASE_POOL_SIZE = int(env_number("DATABASE_POOL_SIZE", 20, int, minimum=0))
    if DATABASE_POOL_SIZE and not DATABASES["default"]["CONN_MAX_AGE"]:
        DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
            "min_size": 1,
            "max_size": DATABASE_POOL_SIZE,
            "timeout": 30,
        }

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# The model backend, refusing sign-ins while an account or address failed too often.
AUTHENTICATION_BACKENDS = ["chatbot_api.login_throttle.ThrottledModelBackend"]

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en"
LANGUAGES = [("en", "English"), ("it", "Italiano")]
LANGUAGE_COOKIE_AGE = 60 * 60 * 24 * 365  # the page's language choice is remembered for a year
LOCALE_PATHS = [BASE_DIR / "locale"]
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    # Hashed, compressed files from `collectstatic` (`make run` runs it), served by ServeStatic.
    "staticfiles": {"BACKEND": "servestatic.storage.CompressedManifestStaticFilesStorage"},
}

# A chat request is small; anything bigger is refused before it is parsed.
DATA_UPLOAD_MAX_MEMORY_SIZE = int(env_number("CHATBOT_MAX_BODY_BYTES", 64 * 1024, int, minimum=1024))

SESSION_COOKIE_SECURE = env_bool("DJANGO_SECURE_COOKIES", False)
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE
SESSION_COOKIE_AGE = 60 * 60 * 24 * 30
# Database sessions, written once when a request creates one (see chatbot_api/sessions.py).
SESSION_ENGINE = "chatbot_api.sessions"

LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "chatbot:chat"
LOGOUT_REDIRECT_URL = "chatbot:chat"

# The API sets its own DRF policy (authentication, permissions, parsers, errors) on its
# views; DRF reads only the schema class from here, when the views' modules are imported.
REST_FRAMEWORK = {"DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema"}

REDIS_URL = os.environ.get("REDIS_URL", "")

CACHES = {
    "default": (
        {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": REDIS_URL,
            # A frozen Redis fails a limit check in 2 s (503 server_busy) instead of hanging it.
            "OPTIONS": {"socket_timeout": 2, "socket_connect_timeout": 2},
        }
        if REDIS_URL
        else {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "LOCATION": "chatbot"}
    )
}

# No Channels layer: sockets read answers from the event log, never from each other. A
# channels-redis layer was configured once and unused; its 5 s blocking reads hit
# redis-py's 5 s socket timeout and closed every idle WebSocket.
CHANNEL_LAYERS = {}

# --- The chatbot itself -------------------------------------------------------
OPENAI_API_KEY = os.environ.get("OPENAI_API_KEY", "")
OPENAI_BASE_URL = os.environ.get("OPENAI_BASE_URL", "")

# Only what the environment sets: the app owns every default (chatbot_api/conf.py).
_chatbot_env = {
    "PROVIDER": os.environ.get("CHATBOT_PROVIDER") or ("openai" if OPENAI_API_KEY else None),
    "MODEL": os.environ.get("CHATBOT_MODEL"),
    "MAX_TOKENS": env_number("CHATBOT_MAX_TOKENS", None, int, minimum=1),
    "TEMPERATURE": env_number("CHATBOT_TEMPERATURE", None, float, minimum=0),
    "SYSTEM_PROMPT": os.environ.get("CHATBOT_SYSTEM_PROMPT"),
    "LOCAL_MODEL_PATH": os.environ.get("CHATBOT_LOCAL_MODEL_PATH"),
    "LOCAL_THREADS": env_number("CHATBOT_LOCAL_THREADS", None, int, minimum=0),
    "LOCAL_CONTEXT": env_number("CHATBOT_LOCAL_CONTEXT", None, int, minimum=256),
    "LOCAL_REPACK_WEIGHTS": env_bool("CHATBOT_LOCAL_REPACK_WEIGHTS", None),
    "HISTORY_TOKENS": env_number("CHATBOT_HISTORY_TOKENS", None, int, minimum=0),
    "CONNECT_TIMEOUT": env_number("CHATBOT_CONNECT_TIMEOUT", None, minimum=0.001),
    "FIRST_TOKEN_TIMEOUT": env_number("CHATBOT_FIRST_TOKEN_TIMEOUT", None, minimum=0.001),
    "IDLE_TIMEOUT": env_number("CHATBOT_IDLE_TIMEOUT", None, minimum=0.001),
    "TOTAL_TIMEOUT": env_number("CHATBOT_TOTAL_TIMEOUT", None, minimum=0.001),
    "FLUSH_INTERVAL": env_number("CHATBOT_FLUSH_INTERVAL", None, minimum=0.01),
    "KEEPALIVE_INTERVAL": env_number("CHATBOT_KEEPALIVE_INTERVAL", None, minimum=0.01),
    "CANCEL_ON_DISCONNECT": env_bool("CHATBOT_CANCEL_ON_DISCONNECT", None),
    "MAX_STARTING_ANSWERS": env_number("CHATBOT_MAX_STARTING_ANSWERS", None, int, minimum=0),
    "MAX_LOOP_LAG": env_number("CHATBOT_MAX_LOOP_LAG", None, minimum=0),
    "ALLOW_ANONYMOUS": env_bool("CHATBOT_ALLOW_ANONYMOUS", None),
    "REQUESTS_PER_MINUTE": env_number("CHATBOT_REQUESTS_PER_MINUTE", None, int, minimum=0),
    "CONCURRENT_STREAMS": env_number("CHATBOT_CONCURRENT_STREAMS", None, int, minimum=0),
    "TOKENS_PER_DAY": env_number("CHATBOT_TOKENS_PER_DAY", None, int, minimum=0),
    "AUTH_CACHE_SECONDS": env_number("CHATBOT_AUTH_CACHE_SECONDS", None, minimum=0),
    "LOGIN_FAILURES_PER_ACCOUNT": env_number("CHATBOT_LOGIN_FAILURES_PER_ACCOUNT", None, int, minimum=0),
    "LOGIN_FAILURES_PER_IP": env_number("CHATBOT_LOGIN_FAILURES_PER_IP", None, int, minimum=0),
    "LOGIN_LOCKOUT_SECONDS": env_number("CHATBOT_LOGIN_LOCKOUT_SECONDS", None, int, minimum=1),
    "METRICS_TOKEN": os.environ.get("CHATBOT_METRICS_TOKEN"),
    "METRICS_ALLOWED_IPS": env_list("CHATBOT_METRICS_ALLOWED_IPS", None),
    "OPENAI_MAX_RETRIES": env_number("OPENAI_MAX_RETRIES", None, int, minimum=0),
    "OPENAI_HTTP_CLIENT": os.environ.get("OPENAI_HTTP_CLIENT"),
    "EVENT_LOG": os.environ.get("CHATBOT_EVENT_LOG") or ("redis" if REDIS_URL else None),
    "EVENT_LOG_TTL": env_number("CHATBOT_EVENT_LOG_TTL", None, minimum=1),
    "ORPHAN_AFTER": env_number("CHATBOT_ORPHAN_AFTER", None, minimum=1),
    "SHUTDOWN_GRACE": env_number("CHATBOT_SHUTDOWN_GRACE", None, minimum=0),
}
CHATBOT = {key: value for key, value in _chatbot_env.items() if value is not None and value != ""}
if CHATBOT.get("PROVIDER") == "openai" and not OPENAI_API_KEY:
    raise ImproperlyConfigured(
        "CHATBOT_PROVIDER=openai needs OPENAI_API_KEY. Set it in the environment or .env "
        "(any non-empty value works for a local OpenAI-compatible server at OPENAI_BASE_URL), "
        "or use CHATBOT_PROVIDER=local for the embedded model."
    )

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": os.environ.get("DJANGO_LOG_LEVEL", "INFO")},
    # Client libraries log request details at DEBUG/INFO; keep them quiet so no key or prompt leaks.
    "loggers": {name: {"level": "WARNING"} for name in ("httpx", "httpx2", "httpcore", "openai")},
}

if not DEBUG:
    SECURE_CONTENT_TYPE_NOSNIFF = True
    X_FRAME_OPTIONS = "DENY"
