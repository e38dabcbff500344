"""System checks: a site that adds the apps is told what is missing, one line each with the fix."""

from django.core.checks import run_checks
from django.test import override_settings

from chatbot_api.checks import site_configuration


def ids(problems) -> set[str]:
    return {problem.id for problem in problems}


def test_the_demo_project_passes_every_check():
    assert [str(problem) for problem in run_checks() if problem.id.startswith("chatbot.")] == []


def test_missing_apps_and_middleware_are_named_with_the_fix(settings):
    settings.INSTALLED_APPS = [app for app in settings.INSTALLED_APPS if not app.startswith("rest_framework")]
    settings.MIDDLEWARE = [m for m in settings.MIDDLEWARE if "SessionMiddleware" not in m]

    problems = site_configuration(None)

    assert {"chatbot.E010", "chatbot.E011", "chatbot.E012"} <= ids(problems)
    session = next(problem for problem in problems if problem.id == "chatbot.E012")
    assert "SessionMiddleware" in session.msg and "add it" in session.msg


def test_a_cache_that_keeps_nothing_is_an_error_and_per_process_limits_a_warning(settings):
    settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.dummy.DummyCache"}}
    assert "chatbot.E013" in ids(site_configuration(None))

    settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
    with override_settings(
        CHATBOT={**settings.CHATBOT, "EVENT_LOG": "redis"}, REDIS_URL="redis://127.0.0.1:1/0"
    ):
        assert "chatbot.W002" in ids(site_configuration(None))


def test_no_asgi_application_and_a_foreign_schema_class_are_warnings(settings):
    del settings.ASGI_APPLICATION
    settings.REST_FRAMEWORK = {}

    problems = {problem.id: problem for problem in site_configuration(None)}

    assert "get_asgi_application()" in problems["chatbot.W001"].msg
    assert "drf_spectacular.openapi.AutoSchema" in problems["chatbot.W003"].msg
