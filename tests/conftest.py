"""Shared fixtures: a fake OpenAI server on loopback, settings pointing at it, the ASGI app."""

from __future__ import annotations

import time

import pytest

from tests.support.fake_openai import FakeOpenAI, FakeOpenAIServer, Script


@pytest.fixture(scope="session")
def fake_server():
    with FakeOpenAIServer(FakeOpenAI()) as server:
        yield server


@pytest.fixture
def upstream(fake_server, settings):
    """The fake OpenAI server, reset, with the chatbot's `openai` provider pointed at it."""
    fake_server.fake.reset()
    fake_server.fake.default = Script()
    settings.OPENAI_API_KEY = "sk-test-not-a-real-key"
    settings.OPENAI_BASE_URL = fake_server.url
    settings.CHATBOT = {
        **settings.CHATBOT,
        "PROVIDER": "openai",
        "MODEL": "gpt-4.1-nano",
        "OPENAI_MAX_RETRIES": 0,
    }
    yield fake_server.fake
    fake_server.fake.abort_streams()


@pytest.fixture
def chatbot_settings(settings):
    """Change CHATBOT settings for one test: `chatbot_settings(IDLE_TIMEOUT=0.2)`; unknown keys fail."""
    from chatbot_api.conf import DEFAULTS

    def update(**values):
        unknown = set(values) - set(DEFAULTS)
        assert not unknown, f"not chatbot settings: {unknown}"
        settings.CHATBOT = {**settings.CHATBOT, **values}
        if values.get("REQUESTS_PER_MINUTE"):
            _away_from_the_minutes_edge()

    return update


@pytest.fixture(autouse=True)
def no_load_shedding(settings):
    """Load shedding off (a loaded CI machine's event loop may lag 100 ms): its own tests turn it on."""
    settings.CHATBOT = {**settings.CHATBOT, "MAX_STARTING_ANSWERS": 0, "MAX_LOOP_LAG": 0}


@pytest.fixture(autouse=True)
def fresh_manager():
    """Every test gets its own generation manager, event logs, rate-limit counters and remembered
    lookups (a flushed database reuses ids, without the signals that forget them)."""
    from django.core.cache import cache

    from chatbot_api import lookups
    from chatbot_api.providers import reset_provider
    from chatbot_api.streaming.manager import reset_manager

    cache.clear()
    lookups.forget_all()
    reset_manager()
    reset_provider()
    yield
    reset_manager()
    reset_provider()


@pytest.fixture
async def manager(fresh_manager):
    """The generation manager, shut down (answers saved) when the test ends."""
    from chatbot_api.providers import get_provider
    from chatbot_api.streaming.manager import get_manager

    manager = get_manager()
    yield manager
    await manager.shutdown(grace=2)
    if get_provider.cache_info().currsize:  # close its HTTP pool while this test's loop still runs
        await get_provider().aclose()


@pytest.fixture
def live_server_url(transactional_db, fresh_manager, settings):
    """The whole product (chatbot.asgi, lifespan on) under a real uvicorn on loopback."""
    from chatbot.asgi import application
    from tests.support.servers import UvicornThread

    settings.ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
    with UvicornThread(application, lifespan="on", timeout_graceful_shutdown=3) as server:
        yield server.origin


@pytest.fixture(scope="session", autouse=True)
def close_thread_connections(django_db_setup, django_db_blocker):
    """Close the connection asgiref's request thread kept, so the test database can be dropped."""
    yield
    from asgiref.sync import SyncToAsync
    from django.db import connections

    with django_db_blocker.unblock():
        SyncToAsync.single_thread_executor.submit(connections.close_all).result(timeout=10)


MINUTE_EDGE_MARGIN = 10.0  # seconds a test counting requests against the minute needs


def _away_from_the_minutes_edge() -> None:
    """The per-minute limit is a fixed window: a test that counts requests to it must not
    straddle a minute boundary, where the count starts again (a slow CI run did)."""
    left = 60 - time.time() % 60
    if left < MINUTE_EDGE_MARGIN:
        time.sleep(left + 0.05)
