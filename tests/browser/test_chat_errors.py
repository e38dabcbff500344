"""Limits and failures are shown as readable, translated sentences: never raw JSON or stacks."""

from __future__ import annotations

import json
import re

import pytest
from playwright.sync_api import expect

from chatbot_api.models import Conversation, Message
from tests.browser.pages import last_answer, screenshot, send, wait_answer_finished
from tests.support.fake_openai import Script

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def assert_no_raw_error_text(page) -> None:
    text = page.locator("#messages").inner_text() + page.locator("#composer").inner_text()
    for raw in ('{"', "Traceback", "success", "upstream_error", "HTTP 500"):
        assert raw not in text


def test_the_1000_character_limit_is_shown_and_enforced(open_page, upstream):
    upstream.enqueue(Script(chunks=["Long message received."]))
    page = open_page()
    counter = page.locator("#charCounter")
    expect(counter).to_have_text("0 / 1000")

    page.fill("#messageInput", "x" * 1001)
    expect(counter).to_have_text("1001 / 1000")
    expect(counter).to_have_class("char-counter over")
    page.press("#messageInput", "Enter")

    expect(page.locator("#composerError")).to_have_text(
        "The message is too long: 1001 characters, the limit is 1000."
    )
    screenshot(page, "too-long")
    expect(page.locator(".message")).to_have_count(0)
    expect(page.locator("#messageInput")).to_have_value("x" * 1001)
    assert upstream.request_count == 0 and Message.objects.count() == 0

    # Emoji count as one character each, as the server counts them.
    page.fill("#messageInput", "😀" * 1000)
    expect(counter).to_have_text("1000 / 1000")
    page.press("#messageInput", "Enter")
    expect(wait_answer_finished(page).locator(".bubble-body")).to_have_text("Long message received.")
    expect(page.locator("#composerError")).to_be_hidden()


def test_shift_enter_makes_a_new_line(open_page, upstream):
    upstream.enqueue(Script(chunks=["ok"]))
    page = open_page()
    page.fill("#messageInput", "line one")
    page.press("#messageInput", "Shift+Enter")
    page.type("#messageInput", "line two")
    expect(page.locator(".message")).to_have_count(0)
    page.press("#messageInput", "Enter")
    expect(page.locator(".message-user .bubble-body")).to_have_text("line one\nline two")


@pytest.mark.parametrize(
    ("locale", "streaming", "expected"),
    [
        ("en-US", True, "The model server had a problem and could not answer. Try again."),
        ("it-IT", False, "Il server del modello ha avuto un problema e non ha potuto rispondere. Riprova."),
    ],
)
def test_upstream_failure_is_a_readable_translated_message(open_page, upstream, locale, streaming, expected):
    upstream.enqueue(Script(status=500))
    page = open_page(locale=locale)

    send(page, "Hello", streaming=streaming)

    answer = wait_answer_finished(page)
    expect(answer.locator(".message-error")).to_have_text(expected)
    expect(answer.locator(".badge-failed")).to_have_text("Failed" if locale == "en-US" else "Non riuscita")
    assert_no_raw_error_text(page)
    screenshot(page, f"upstream-error-{locale}")
    assert Message.objects.get(role="assistant").status == Message.Status.FAILED

    # The failure stays readable after a reload (from the stored error code).
    page.reload()
    expect(last_answer(page).locator(".message-error")).to_have_text(expected)


@pytest.mark.parametrize(
    ("locale", "expected"),
    [("en-US", "Too many requests, retry in 7 s."), ("it-IT", "Troppe richieste, riprova tra 7 s.")],
)
def test_rate_limit_shows_the_retry_delay(open_page, upstream, locale, expected):
    page = open_page(locale=locale)
    page.route(
        "**/api/chat/",
        lambda route: route.fulfill(
            status=429,
            headers={"Retry-After": "7", "Content-Type": "application/json"},
            body=json.dumps({"success": False, "error": "Request was throttled.", "code": "rate_limited"}),
        ),
    )

    send(page, "Are you there?", streaming=True)

    expect(page.locator("#composerError")).to_have_text(expected)
    screenshot(page, f"rate-limited-{locale}")
    # Nothing was sent: the bubbles go away and the text is back in the box to retry.
    expect(page.locator(".message")).to_have_count(0)
    expect(page.locator("#messageInput")).to_have_value("Are you there?")
    expect(page.locator("#composerError")).not_to_have_text(expected, timeout=3000)  # it counts down
    assert_no_raw_error_text(page)


def test_a_forgotten_conversation_id_is_dropped_on_load(open_page, upstream):
    page = open_page()
    page.evaluate("() => localStorage.setItem('chatbot.sessionId', '00000000-0000-0000-0000-000000000000')")

    page.reload()
    page.wait_for_selector("#app[data-ready=true]")

    page.wait_for_function("() => localStorage.getItem('chatbot.sessionId') === null")
    expect(page.locator(".message")).to_have_count(0)
    expect(page.locator("#composerError")).to_be_hidden()


@pytest.mark.parametrize("transport", ["sse", "ws"])
def test_a_conversation_deleted_elsewhere_is_explained(open_page, upstream, transport):
    upstream.enqueue(Script(chunks=["first"]), Script(chunks=["second"]))
    page = open_page()
    send(page, "Hello", streaming=True, transport=transport)
    wait_answer_finished(page)
    Conversation.objects.all().delete()  # another tab deleted it

    send(page, "Still there?")

    expect(page.locator("#composerError")).to_have_text("This conversation no longer exists.")
    expect(page.locator(".message")).to_have_count(0)
    expect(page.locator("#messageInput")).to_have_value("Still there?")
    page.press("#messageInput", "Enter")  # sending again starts a new conversation
    expect(wait_answer_finished(page).locator(".bubble-body")).to_have_text("second")
    assert Conversation.objects.count() == 1


@pytest.mark.parametrize("transport", ["sse", "ws"])
def test_the_servers_rate_limit_is_explained(open_page, upstream, chatbot_settings, transport):
    chatbot_settings(REQUESTS_PER_MINUTE=1)
    upstream.enqueue(Script(chunks=["first"]))
    page = open_page()
    send(page, "One", streaming=True, transport=transport)
    wait_answer_finished(page)

    send(page, "Two")

    expect(page.locator("#composerError")).to_have_text(re.compile(r"^Too many requests, retry in \d+ s\.$"))
    expect(page.locator(".message-user")).to_have_count(1)
    expect(page.locator("#messageInput")).to_have_value("Two")


@pytest.mark.parametrize(
    ("streaming", "transport"), [(True, "sse"), (True, "ws"), (False, None)], ids=["sse", "ws", "json"]
)
def test_a_refused_regenerate_keeps_the_old_answer(
    open_page, upstream, chatbot_settings, streaming, transport
):
    chatbot_settings(REQUESTS_PER_MINUTE=1)
    upstream.enqueue(Script(chunks=["first"]))
    page = open_page()
    send(page, "One", streaming=streaming, transport=transport)
    wait_answer_finished(page)

    page.locator(".message-assistant .regenerate").click()

    expect(page.locator("#composerError")).to_have_text(re.compile(r"^Too many requests, retry in \d+ s\.$"))
    expect(page.locator(".message-user .bubble-body")).to_have_text(["One"])
    expect(page.locator(".message-assistant .bubble-body")).to_have_text(["first"])
    expect(page.locator(".regenerate:visible")).to_have_count(1)
    expect(page.locator("#messageInput")).to_have_value("")
    assert Message.objects.get(role=Message.Role.ASSISTANT).content == "first"


def test_the_daily_token_allowance_is_explained(open_page, upstream, chatbot_settings):
    chatbot_settings(TOKENS_PER_DAY=1)
    upstream.enqueue(Script(chunks=["first", " answer"]))
    page = open_page(locale="it-IT")
    send(page, "One")
    wait_answer_finished(page)

    send(page, "Two")

    expect(page.locator("#composerError")).to_have_text(
        re.compile(r"^La quota di token di oggi è esaurita\. Si rinnova tra \d+ (s|min|h)\.$")
    )


def test_usage_today_comes_from_the_server(open_page, upstream):
    upstream.enqueue(
        Script(chunks=["Hello", " there"], usage={"prompt_tokens": 1200, "completion_tokens": 34})
    )
    page = open_page()
    expect(page.locator("#usageToday")).to_have_text("Usage today: 0 tokens (this address: 0 of 200,000)")

    send(page, "Hi", streaming=True)
    wait_answer_finished(page)

    expect(page.locator("#usageToday")).to_have_text(
        "Usage today: 1,234 tokens (this address: 1,234 of 200,000)"
    )
    # Another visitor from the same address: their own usage is theirs, the allowance is shared.
    neighbour = open_page()
    expect(neighbour.locator("#usageToday")).to_have_text(
        "Usage today: 0 tokens (this address: 1,234 of 200,000)"
    )


def test_usage_today_is_hidden_without_the_endpoint(open_page):
    page = open_page()
    page.route("**/api/usage/", lambda route: route.fulfill(status=404, json={"success": False}))
    with page.expect_response("**/api/usage/"):
        page.reload()
    page.wait_for_selector("#app[data-ready=true]")
    expect(page.locator("#usageToday")).to_be_hidden()


def test_a_too_long_error_goes_away_once_the_text_fits(open_page, upstream):
    page = open_page()
    page.fill("#messageInput", "x" * 1001)
    page.press("#messageInput", "Enter")
    expect(page.locator("#composerError")).to_be_visible()

    page.press("#messageInput", "Backspace")

    expect(page.locator("#composerError")).to_be_hidden()
    expect(page.locator("#charCounter")).to_have_text("1000 / 1000")


def test_a_start_the_busy_server_refused_is_sent_again(open_page, upstream, chatbot_settings):
    # The worker's event loop really lags (blocking sleeps scheduled on it), so load shedding
    # refuses the page's start with 503 server_busy, retry_safe; the page sends it again after
    # Retry-After, once the loop has caught up, instead of showing the refusal.
    import time

    from chatbot_api import metrics
    from tests.support.servers import answer_admission, lagging_loop

    chatbot_settings(MAX_STARTING_ANSWERS=8, MAX_LOOP_LAG=0.1)
    upstream.enqueue(Script(chunks=["first"]))
    upstream.enqueue(Script(chunks=["second"]))
    page = open_page()
    send(page, "One", streaming=True, transport="sse")
    wait_answer_finished(page)  # and the gate's lag probe now runs on the server's loop
    gate = answer_admission()
    shed = metrics.SHED.labels("loop_lag")
    shed_before = shed._value.get()
    with lagging_loop(gate):
        deadline = time.monotonic() + 10
        while gate.loop_lag <= 0.1 and time.monotonic() < deadline:
            time.sleep(0.05)
        send(page, "Two")
        while shed._value.get() == shed_before and time.monotonic() < deadline:
            time.sleep(0.02)
        assert shed._value.get() > shed_before, "the start was not refused"

    expect(last_answer(page).locator(".bubble-body")).to_have_text("second", timeout=15_000)
    wait_answer_finished(page)
    expect(page.locator("#composerError")).to_be_hidden()
    expect(page.locator(".message-user .bubble-body")).to_have_text(["One", "Two"])
    assert list(
        Message.objects.filter(role=Message.Role.USER)
        .order_by("created_at")
        .values_list("content", flat=True)
    ) == ["One", "Two"]
