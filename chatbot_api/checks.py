"""System checks: a misconfigured provider fails `manage.py check`/`migrate`/`runserver` with the fix."""

from django.core.checks import Error, Warning, register
from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string

from .conf import chatbot_setting


@register()
def provider_configuration(app_configs, **kwargs):
    from .providers import provider_class

    name = chatbot_setting("PROVIDER")
    try:
        provider_class(name)
    except ImproperlyConfigured as problem:
        return [Error(str(problem), id="chatbot.E002")]
    if name != "local":
        return []
    from .providers.local import check_local_model

    return [Error(problem, id="chatbot.E001") for problem in check_local_model()]


SPECTACULAR_SCHEMA = "drf_spectacular.openapi.AutoSchema"


@register()
def site_configuration(app_configs, **kwargs):
    """What a site adding the apps must have, one line each with the fix (README: "Add to a site")."""
    from django.apps import apps
    from django.conf import settings

    problems = [
        Error(f"{app} is not in INSTALLED_APPS: add it ({why}).", id=check_id)
        for app, why, check_id in (
            ("rest_framework", "the chat API is built on DRF", "chatbot.E010"),
            ("rest_framework.authtoken", "API clients sign in with its tokens", "chatbot.E011"),
        )
        if not apps.is_installed(app)
    ]
    problems += _middleware_problems(settings.MIDDLEWARE)
    problems += _cache_problems(settings.CACHES.get("default", {}).get("BACKEND", ""))
    try:
        import channels  # noqa: F401
    except ImportError:
        problems.append(
            Error("channels is not installed: `pip install channels` (the WebSocket).", id="chatbot.E014")
        )
    if not getattr(settings, "ASGI_APPLICATION", None):
        problems.append(
            Warning(
                "ASGI_APPLICATION is not set: answers stream and WebSockets work only under ASGI. "
                "In your asgi.py use `application = chatbot_api.asgi.get_asgi_application()` and set "
                "ASGI_APPLICATION = '<project>.asgi.application'.",
                id="chatbot.W001",
            )
        )
    schema_class = getattr(settings, "REST_FRAMEWORK", {}).get("DEFAULT_SCHEMA_CLASS")
    if schema_class != SPECTACULAR_SCHEMA:
        problems.append(
            Warning(
                f"REST_FRAMEWORK['DEFAULT_SCHEMA_CLASS'] is {schema_class!r}: the chat API's "
                f"/api/schema/ needs {SPECTACULAR_SCHEMA!r}.",
                id="chatbot.W003",
            )
        )
    return problems


def _middleware_problems(middleware) -> list:
    needed = (
        ("django.contrib.sessions.middleware.SessionMiddleware", "anonymous chats belong to a session"),
        ("django.contrib.auth.middleware.AuthenticationMiddleware", "conversations belong to their user"),
    )
    return [
        Error(f"{name} is not in MIDDLEWARE: add it ({why}).", id="chatbot.E012")
        for name, why in needed
        if not any(_is_subclass(entry, name) for entry in middleware)
    ]


def _is_subclass(entry: str, name: str) -> bool:
    """`entry` is the middleware `name` or a subclass of it (chatbot_api.middleware's are)."""
    if entry == name:
        return True
    try:
        return issubclass(import_string(entry), import_string(name))
    except (ImportError, TypeError):
        return False


def _cache_problems(backend: str) -> list:
    if backend.endswith("DummyCache"):
        return [
            Error(
                "The default cache is a DummyCache: rate limits and quotas need one that keeps values "
                "(LocMemCache for one process, RedisCache for several).",
                id="chatbot.E013",
            )
        ]
    if backend.endswith("LocMemCache") and chatbot_setting("EVENT_LOG") == "redis":
        return [
            Warning(
                "EVENT_LOG is 'redis' (several workers) but the default cache is a LocMemCache: each "
                "worker counts the rate limits on its own. Use django.core.cache.backends.redis.RedisCache.",
                id="chatbot.W002",
            )
        ]
    return []
