"""Browser tests: Debian's Chromium driven by Playwright against the real ASGI app.

Playwright must never download a browser: it launches /usr/bin/chromium (CI installs it with
`apt-get install chromium`). The tests are plain sync functions: Playwright's sync API cannot
run inside an asyncio loop.
"""

from __future__ import annotations

import os

import pytest

from tests.browser.pages import DESKTOP, wait_ready
from tests.support.chromium import chromium


@pytest.fixture(scope="module")
def browser():
    # Playwright's sync API keeps an event loop on this thread, so Django would refuse the test
    # database's own queries (flush, fixtures) as "async unsafe": the documented opt-out.
    previous = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    try:
        with chromium() as launched:
            yield launched
    finally:
        if previous is None:
            os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
        else:
            os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = previous


@pytest.fixture(autouse=True)
def plain_static_files(settings):
    """Serve static files by their plain names: the tests run without `collectstatic`'s manifest."""
    settings.STORAGES = {
        **settings.STORAGES,
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    }


@pytest.fixture
def open_page(browser, live_server_url):
    """Open the chat page: `open_page(locale="it-IT", viewport=PHONE, color_scheme="dark")`.

    Fails the test if the page raised a JavaScript error or broke its Content-Security-Policy.
    """
    contexts = []
    errors: list[str] = []

    def open_(locale="en-US", viewport=DESKTOP, color_scheme="light", path="/", origin=None):
        context = browser.new_context(locale=locale, viewport=viewport, color_scheme=color_scheme)
        context.set_default_timeout(10_000)
        context.expose_binding("__cspViolation", lambda source, text: errors.append(f"CSP: {text}"))
        context.add_init_script(CSP_WATCH)
        contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto((origin or live_server_url) + path)
        if path == "/":
            wait_ready(page)
        return page

    yield open_
    for context in contexts:
        context.close()
    assert errors == [], "JavaScript errors or CSP violations on the page"


# Runs before the page's own scripts: every CSP violation is reported to the test.
CSP_WATCH = """
document.addEventListener("securitypolicyviolation", (event) => {
  window.__cspViolation(`${event.violatedDirective} blocked ${event.blockedURI || "inline"}`);
});
"""
