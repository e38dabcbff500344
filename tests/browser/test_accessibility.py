"""Accessibility, checked by axe-core (WCAG 2.2 A/AA and its best practices, vendored and
pinned in tests/browser/vendor/) in each state of the page, and by the keyboard."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from tests.browser.pages import PHONE, axe_violations, screenshot, send, wait_answer_finished
from tests.support.fake_openai import Script

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

# Every token kind highlight.js colours differently, in the languages answers use most.
CODE_ANSWER = '''```python
import os  # a comment
@decorator
def f(x: int = 3) -> str:
    """Doc."""
    return print(len(x), "s", 0x1F, True, None, r"\\d+")
```

```js
const re = /a+/g; let t = `v ${x}`; function g() { return this.y ?? null; }
```

```diff
- old
+ new
```

```bash
echo "$HOME" | grep -v foo > /dev/null
```

A table:

| a | b |
|---|---|
| `code` | **bold** [link](https://example.com) |'''


@pytest.mark.parametrize("scheme", ["light", "dark"])
@pytest.mark.parametrize("locale", ["en-US", "it-IT"])
def test_axe_finds_nothing_on_an_answered_conversation(open_page, upstream, scheme, locale):
    upstream.enqueue(Script(chunks=[CODE_ANSWER]))
    page = open_page(color_scheme=scheme, locale=locale)
    assert axe_violations(page) == []  # the empty state

    send(page, "Show me code", streaming=True)
    wait_answer_finished(page)

    assert axe_violations(page) == []
    screenshot(page, f"a11y-answer-{scheme}-{locale}")


def test_axe_finds_nothing_in_the_error_stopped_and_phone_states(open_page, upstream):
    upstream.enqueue(Script(chunks=[f" w{i}" for i in range(200)], interval=0.02))
    page = open_page()
    send(page, "Long one", streaming=True)
    page.wait_for_selector(".message-assistant.running .bubble-body p")
    page.click("#stopButton")
    wait_answer_finished(page)
    page.fill("#messageInput", "x" * 1001)
    page.press("#messageInput", "Enter")
    expect(page.locator("#composerError")).to_be_visible()
    assert axe_violations(page) == []

    phone = open_page(viewport=PHONE, color_scheme="dark")
    assert axe_violations(phone) == []
    phone.click("#sidebarToggle")
    assert axe_violations(phone) == []


def test_landmarks_hold_everything_and_the_messages_can_be_scrolled_by_keyboard(open_page):
    page = open_page()
    assert page.locator("main").count() == 1
    assert page.locator("main #composer, main #messages").count() == 2
    page.focus("#messages")
    assert page.evaluate("() => document.activeElement.id") == "messages"  # tabindex=0: arrow keys scroll it


def test_the_phone_drawer_traps_focus_and_escape_gives_it_back(open_page):
    page = open_page(viewport=PHONE)
    page.click("#sidebarToggle")
    expect(page.locator("#newChatButton")).to_be_focused()

    visited = []
    for _ in range(12):  # Tab through everything reachable: only the drawer's controls
        page.keyboard.press("Tab")
        visited.append(
            page.evaluate("() => document.activeElement.closest('#sidebar, main')?.tagName ?? 'BODY'")
        )
    assert "MAIN" not in visited, visited
    assert page.evaluate("() => document.getElementById('main').inert") is True

    page.keyboard.press("Escape")
    expect(page.locator("#sidebarToggle")).to_be_focused()
    assert page.evaluate("() => document.getElementById('main').inert") is False
    screenshot(page, "a11y-drawer-closed")


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_axe_finds_nothing_on_the_sign_in_page(open_page, scheme):
    page = open_page(path="/login/", color_scheme=scheme)
    page.wait_for_selector("form.login-form")
    assert axe_violations(page) == []


def test_axe_finds_nothing_while_a_question_is_edited(open_page, upstream):
    upstream.enqueue(Script(chunks=["An answer."]))
    page = open_page(color_scheme="dark")
    send(page, "A question", streaming=True)
    wait_answer_finished(page)
    page.locator(".message-user .edit-question").click()
    expect(page.locator(".edit-form textarea")).to_be_focused()
    assert axe_violations(page) == []
