"""The chat page in a real browser: JSON and streaming modes, stop, reload, reconnection."""

from __future__ import annotations

import json
import re
import time
import urllib.request

import pytest
from playwright.sync_api import expect

from chatbot_api.models import Message
from tests.browser.pages import (
    answer_text,
    last_answer,
    sample_answer_growth,
    screenshot,
    send,
    wait_answer_finished,
    wait_for_chunks,
    wait_ready,
)
from tests.support.fake_openai import Script
from tests.support.netproxy import CuttableProxy

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

WORDS = [f" word{i}" for i in range(40)]
WORDS_TEXT = "".join(WORDS).strip()


def assistant_message() -> Message:
    return Message.objects.filter(role=Message.Role.ASSISTANT).order_by("created_at").first()


def assert_grew_in_steps(samples: list[str], final: str) -> None:
    """At least three distinct, ever longer prefixes of the final text: it was streamed."""
    texts = [sample.strip() for sample in samples]
    assert texts[-1] == final
    partial = [text for text in texts if text != final]
    assert len(partial) >= 3, f"the answer appeared in {len(texts)} step(s): {texts}"
    for shorter, longer in zip(texts, texts[1:], strict=False):
        assert longer.startswith(shorter) and len(longer) > len(shorter)


@pytest.mark.parametrize(
    ("locale", "thinking"),
    [("en-US", "The assistant is thinking..."), ("it-IT", "L'assistente sta pensando...")],
)
def test_json_mode_shows_thinking_then_the_whole_answer(open_page, upstream, locale, thinking):
    upstream.enqueue(Script(chunks=["Ciao", ", come", " stai?"], interval=0.4))
    page = open_page(locale=locale)
    expect(page.locator("#streamingCheckbox")).to_be_checked()  # streaming by default

    send(page, "Hello", streaming=False)  # the seed's checkbox still switches to JSON

    loading = last_answer(page).locator(".loading")
    expect(loading).to_have_text(thinking)
    assert last_answer(page).locator(".bubble-body").inner_text() == ""
    screenshot(page, f"json-thinking-{locale}")
    answer = wait_answer_finished(page)
    expect(answer.locator(".bubble-body")).to_have_text("Ciao, come stai?")
    expect(answer.locator(".loading")).to_have_count(0)
    expect(answer.locator(".streamed-mark")).to_have_count(0)  # the seed's 🔄 is for streamed answers
    assert upstream.history[-1].messages[-1] == {"role": "user", "content": "Hello"}


@pytest.mark.parametrize(
    ("locale", "streaming_text"), [("en-US", "📡 Streaming..."), ("it-IT", "📡 Streaming in corso...")]
)
def test_streaming_mode_shows_the_answer_growing(open_page, upstream, locale, streaming_text):
    upstream.enqueue(Script(chunks=WORDS[:12], interval=0.12))
    page = open_page(locale=locale)
    expect(page.locator("label.streaming-toggle")).to_contain_text("📡 Streaming")

    send(page, "Tell me something", streaming=True)

    expect(last_answer(page).locator(".loading")).to_have_text(streaming_text)
    samples = sample_answer_growth(page)
    expected = "".join(WORDS[:12]).strip()
    assert_grew_in_steps(samples, expected)
    answer = wait_answer_finished(page)
    expect(answer.locator(".streamed-mark")).to_have_text("🔄")
    expect(answer.locator(".loading")).to_have_count(0)
    expect(page.locator("#announcer")).to_have_text(expected)  # announced once, when complete
    screenshot(page, f"streaming-done-{locale}")
    assert assistant_message().content.strip() == expected


def test_streaming_mode_renders_mid_answer_state(open_page, upstream):
    upstream.enqueue(Script(chunks=WORDS, interval=0.1))
    page = open_page()
    send(page, "Tell me something", streaming=True)
    page.wait_for_function(
        "() => document.querySelector('.message-assistant .bubble-body').textContent.length > 40"
    )
    expect(page.locator("#stopButton")).to_be_visible()
    expect(page.locator("#sendButton")).to_be_disabled()
    screenshot(page, "streaming-in-progress")
    wait_answer_finished(page)
    expect(page.locator("#stopButton")).to_be_hidden()


AT_BOTTOM = """() => {
  const messages = document.getElementById('messages');
  return messages.scrollHeight - messages.scrollTop - messages.clientHeight < 48;
}"""


def test_auto_scroll_follows_until_the_reader_scrolls_up(open_page, upstream):
    upstream.enqueue(Script(chunks=[f"Line {i}.\n\n" for i in range(100)], interval=0.04))
    page = open_page()
    send(page, "Many lines", streaming=True)
    page.wait_for_function("() => document.querySelectorAll('.message-assistant p').length > 30")
    assert page.evaluate(AT_BOTTOM)

    page.hover("#messages")
    page.mouse.wheel(0, -5000)
    page.wait_for_function("() => document.getElementById('messages').scrollTop < 10")
    wait_for_chunks(upstream, 5)  # it keeps streaming, and the page stays where the user put it
    assert page.evaluate("() => document.getElementById('messages').scrollTop") < 10
    expect(page.locator("#scrollToBottom")).to_be_visible()
    screenshot(page, "scrolled-up-while-streaming")

    page.click("#scrollToBottom")
    expect(page.locator("#scrollToBottom")).to_be_hidden()
    wait_answer_finished(page)
    assert page.evaluate(AT_BOTTOM)


def test_websocket_transport_streams_and_is_remembered(open_page, upstream):
    upstream.enqueue(Script(chunks=WORDS[:10], interval=0.12), Script(chunks=["Second", " answer"]))
    page = open_page()
    ws_frames = []
    page.on("websocket", lambda ws: ws.on("framesent", lambda frame: ws_frames.append(frame)))

    send(page, "Over the socket", streaming=True, transport="ws")

    samples = sample_answer_growth(page)
    assert_grew_in_steps(samples, "".join(WORDS[:10]).strip())
    assert any('"type": "chat"' in f or '"type":"chat"' in f for f in ws_frames)
    expect(last_answer(page).locator(".streamed-mark")).to_have_count(1)

    page.reload()
    wait_ready(page)
    expect(page.locator("#transportSelect")).to_have_value("ws")
    expect(page.locator("#streamingCheckbox")).to_be_checked()
    send(page, "Again")
    expect(wait_answer_finished(page).locator(".bubble-body")).to_have_text("Second answer")


@pytest.mark.parametrize(
    ("streaming", "transport"), [(True, "sse"), (True, "ws"), (False, None)], ids=["sse", "ws", "json"]
)
def test_regenerate_replaces_the_last_answer_in_place(open_page, upstream, streaming, transport):
    second = "".join(WORDS[:8]).strip()
    upstream.enqueue(Script(chunks=["First answer"]), Script(chunks=WORDS[:8], interval=0.1))
    page = open_page()
    ws_frames = []
    page.on("websocket", lambda ws: ws.on("framesent", lambda frame: ws_frames.append(json.loads(frame))))
    send(page, "The question", streaming=streaming, transport=transport)
    expect(wait_answer_finished(page).locator(".bubble-body")).to_have_text("First answer")
    old = assistant_message()

    page.locator(".message-assistant .regenerate").click()

    if streaming:
        assert_grew_in_steps(sample_answer_growth(page), second)
    else:
        expect(last_answer(page).locator(".loading")).to_have_text("The assistant is thinking...")
    answer = wait_answer_finished(page)
    expect(answer.locator(".bubble-body")).to_have_text(second)
    expect(answer.locator(".streamed-mark")).to_have_count(1 if streaming else 0)
    expect(page.locator(".message-user .bubble-body")).to_have_text(["The question"])
    expect(page.locator(".message-assistant")).to_have_count(1)
    expect(page.locator(".regenerate:visible")).to_have_count(1)
    rows = Message.objects.filter(conversation=old.conversation).order_by("created_at")
    assert [(row.role, row.content.strip()) for row in rows] == [
        ("user", "The question"),
        ("assistant", second),
    ]
    assert not Message.objects.filter(pk=old.pk).exists()
    assert len(upstream.history) == 2
    assert upstream.history[-1].messages == upstream.history[0].messages
    assert [m for m in upstream.history[-1].messages if m["role"] == "user"] == [
        {"role": "user", "content": "The question"}
    ]
    if transport == "ws":
        assert [f["type"] for f in ws_frames] == ["chat", "regenerate"]
        assert ws_frames[-1]["message_id"] == str(old.pk)


def test_stop_a_regenerated_answer(open_page, upstream):
    upstream.enqueue(Script(chunks=["First answer"]), Script(chunks=WORDS, interval=0.1))
    page = open_page()
    send(page, "The question", streaming=True)
    wait_answer_finished(page)

    page.locator(".message-assistant .regenerate").click()
    page.wait_for_function(
        "() => document.querySelector('.message-assistant .bubble-body').textContent.split(' ').length >= 4"
    )
    page.click("#stopButton")

    answer = wait_answer_finished(page)
    expect(answer.locator(".badge-stopped")).to_have_text("Stopped")
    expect(page.locator(".message")).to_have_count(2)
    message = Message.objects.get(role=Message.Role.ASSISTANT)
    assert message.status == Message.Status.STOPPED
    assert 0 < len(message.content.strip()) < len(WORDS_TEXT)
    assert answer_text(page) == message.content.strip()


@pytest.mark.parametrize("transport", ["sse", "ws"])
def test_stop_keeps_the_partial_answer(open_page, upstream, transport):
    upstream.enqueue(Script(chunks=WORDS, interval=0.1))
    page = open_page()
    send(page, "Talk for a while", streaming=True, transport=transport)
    page.wait_for_function(
        "() => document.querySelector('.message-assistant .bubble-body').textContent.split(' ').length >= 4"
    )

    if transport == "ws":
        page.keyboard.press("Escape")  # the keyboard way to stop
    else:
        page.click("#stopButton")

    answer = wait_answer_finished(page)
    expect(answer.locator(".badge-stopped")).to_have_text("Stopped")
    expect(page.locator("#messageInput")).to_be_focused()  # not the page body
    screenshot(page, f"stopped-{transport}")
    message = assistant_message()
    assert message.status == Message.Status.STOPPED
    shown = answer_text(page)
    assert shown == message.content.strip()
    assert 0 < len(shown) < len(WORDS_TEXT)


def test_stop_in_json_mode(open_page, upstream):
    upstream.enqueue(Script(chunks=WORDS, interval=0.1))
    page = open_page(locale="it-IT")
    send(page, "Talk for a while", streaming=False)
    wait_for_chunks(upstream, 5)

    page.click("#stopButton")

    answer = wait_answer_finished(page)
    expect(answer.locator(".badge-stopped")).to_have_text("Interrotta")
    assert assistant_message().status == Message.Status.STOPPED


@pytest.mark.parametrize("transport", ["sse", "ws"])
def test_reload_mid_answer_shows_it_completed_exactly_once(open_page, upstream, transport):
    upstream.enqueue(Script(chunks=WORDS, interval=0.06))
    page = open_page()
    send(page, "A long one", streaming=True, transport=transport)
    page.wait_for_function(
        "() => document.querySelector('.message-assistant .bubble-body').textContent.length > 30"
    )

    page.reload()
    wait_ready(page)

    expect(page.locator(".message-user")).to_have_count(1)
    expect(page.locator(".message-assistant")).to_have_count(1)
    answer = wait_answer_finished(page)
    expect(answer.locator(".streamed-mark")).to_have_count(1)
    message = assistant_message()
    assert message.status == Message.Status.COMPLETE
    assert answer_text(page) == message.content.strip() == WORDS_TEXT
    assert answer_text(page).count("word1 ") == 1


@pytest.mark.parametrize("transport", ["sse", "ws"])
def test_network_drop_mid_answer_resumes_without_duplicates(open_page, upstream, live_server_url, transport):
    host, port = live_server_url.removeprefix("http://").split(":")
    proxy = CuttableProxy(host, int(port))
    try:
        upstream.enqueue(Script(chunks=WORDS, interval=0.06))
        page = open_page(origin=proxy.origin)
        send(page, "Keep talking", streaming=True, transport=transport)
        page.wait_for_function(
            "() => document.querySelector('.message-assistant .bubble-body').textContent.length > 30"
        )

        proxy.cut(refuse=True)
        if transport == "sse":
            page.context.set_offline(True)
            expect(page.locator("#connectionBanner")).to_have_text(
                "You are offline. The answer will continue when the connection is back."
            )
        else:
            expect(page.locator("#connectionBanner")).to_have_text("Connection lost. Reconnecting…")
        screenshot(page, f"reconnecting-{transport}")
        wait_for_chunks(upstream, 10)  # the answer goes on meanwhile on the server
        proxy.restore()
        page.context.set_offline(False)

        answer = wait_answer_finished(page)
        expect(page.locator("#connectionBanner")).to_be_hidden()
        expect(answer.locator(".badge")).to_have_count(0)
        assert answer_text(page) == WORDS_TEXT == assistant_message().content.strip()
    finally:
        proxy.close()


def test_resume_after_the_event_log_expired_shows_the_saved_text(open_page, upstream, live_server_url):
    """The server rebuilds a resumed stream from the database: the page still ends complete."""
    from chatbot_api.streaming.manager import get_manager

    log = get_manager().log  # the running server's: finished logs now expire at once
    log.ttl, log.purge_every = 0.05, 0.0
    host, port = live_server_url.removeprefix("http://").split(":")
    proxy = CuttableProxy(host, int(port))
    try:
        upstream.enqueue(Script(chunks=WORDS, interval=0.03), Script(chunks=["other"]))
        page = open_page(origin=proxy.origin)
        send(page, "Keep talking", streaming=True)
        page.wait_for_function(
            "() => document.querySelector('.message-assistant .bubble-body').textContent.length > 30"
        )
        proxy.cut(refuse=True)
        wait_until(lambda: assistant_message().status == Message.Status.COMPLETE)
        time.sleep(0.1)
        # Another visitor's message opens a new log, which purges our expired one.
        body = json.dumps({"message": "Someone else"}).encode()
        request = urllib.request.Request(
            f"{live_server_url}/api/chat/", body, {"Content-Type": "application/json"}
        )
        assert json.load(urllib.request.urlopen(request, timeout=10))["response"] == "other"
        proxy.restore()

        wait_answer_finished(page)
        answer = last_answer(page)
        expect(answer.locator(".bubble-body")).to_have_text(WORDS_TEXT)
        expect(answer.locator(".badge")).to_have_count(0)
    finally:
        proxy.close()


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_long_answer_is_rendered_once_per_frame(open_page, upstream):
    """2500 deltas: the bubble is re-rendered per animation frame, the list never."""
    tokens = [f" t{i}" for i in range(2500)]
    upstream.enqueue(Script(chunks=tokens, interval=0.001))
    page = open_page()
    page.evaluate(
        """() => {
          window.__renders = 0; window.__listChanges = 0; window.__longTasks = [];
          new MutationObserver((records) => { window.__listChanges += records.length; })
            .observe(document.getElementById('messageList'), { childList: true });
          new PerformanceObserver((list) => {
            for (const entry of list.getEntries()) window.__longTasks.push(entry.duration);
          }).observe({ type: 'longtask', buffered: false });
        }"""
    )
    send(page, "Count to 2500", streaming=True)
    page.wait_for_selector(".message-assistant .bubble-body")
    page.evaluate(
        """() => {
          const body = document.querySelector('.message-assistant:last-child .bubble-body');
          new MutationObserver(() => { window.__renders += 1; }).observe(body, { childList: true });
        }"""
    )

    wait_answer_finished(page, timeout=60_000)

    stats = page.evaluate(
        "() => ({ renders: window.__renders, list: window.__listChanges, longTasks: window.__longTasks })"
    )
    assert answer_text(page) == "".join(tokens).strip()
    assert stats["list"] == 2  # the user's message and the answer were added; nothing re-rendered
    assert 1 <= stats["renders"] < len(tokens) / 5, stats
    assert max(stats["longTasks"], default=0) < 250, stats
    screenshot(page, "long-answer")


def test_a_reload_shows_each_answer_as_it_was_asked_for(open_page, upstream):
    upstream.enqueue(
        Script(chunks=["Streamed."]), Script(chunks=["Whole."]), Script(chunks=WORDS, interval=0.1)
    )
    page = open_page()
    send(page, "First", streaming=True)
    wait_answer_finished(page)
    send(page, "Second", streaming=False)
    wait_answer_finished(page)
    send(page, "Third", streaming=False)  # still being written when the page reloads
    upstream.wait_for_request(3)

    page.reload()
    wait_ready(page)

    answers = page.locator(".message-assistant")
    expect(answers).to_have_count(3)
    expect(answers.nth(2).locator(".loading")).to_have_text("The assistant is thinking...")
    wait_answer_finished(page)
    expect(answers.nth(0).locator(".streamed-mark")).to_have_count(1)
    expect(answers.nth(1).locator(".streamed-mark")).to_have_count(0)
    expect(answers.nth(2).locator(".streamed-mark")).to_have_count(0)
    screenshot(page, "reload-keeps-how-answers-were-asked")


@pytest.mark.parametrize("streaming", [True, False], ids=["streaming", "json"])
def test_an_answer_cut_at_the_length_limit_says_so(open_page, upstream, streaming):
    upstream.enqueue(Script(chunks=["It was a dark and stormy"], finish_reason="length"))
    page = open_page()
    send(page, "Tell me a story", streaming=streaming)

    note = wait_answer_finished(page).locator(".message-note")

    expect(note).to_have_text("The answer was cut at the length limit.")
    page.reload()
    wait_ready(page)
    expect(last_answer(page).locator(".message-note")).to_have_text("The answer was cut at the length limit.")


@pytest.mark.parametrize("reload", [False, True], ids=["at-once", "after-reload"])
def test_continue_grows_the_cut_answer_in_place(open_page, upstream, reload):
    upstream.enqueue(Script(chunks=["It was a dark", " and stormy"], finish_reason="length"))
    page = open_page()
    send(page, "Tell me a story")
    wait_answer_finished(page)
    if reload:
        page.reload()
        wait_ready(page)
    screenshot(page, f"continue-offered-{'reload' if reload else 'live'}")
    upstream.enqueue(Script(chunks=[" night.", " The end."]))

    last_answer(page).locator(".continue-answer").click()

    answer = wait_answer_finished(page)
    expect(answer.locator(".bubble-body")).to_have_text(re.compile(r"dark and stormy night\. The end\."))
    expect(page.locator(".message-assistant")).to_have_count(1)
    expect(answer.locator(".message-note")).to_have_count(0)
    expect(answer.locator(".continue-answer")).to_have_count(0)
    expect(page.locator("#messageInput")).to_be_enabled()
    expect(page.locator("#messageInput")).to_be_focused()
    message = assistant_message()
    assert (message.content, message.continuations) == ("It was a dark and stormy night. The end.", 1)
    screenshot(page, f"continue-done-{'reload' if reload else 'live'}")


def test_a_first_json_answer_is_in_the_sidebar_while_it_is_written(open_page, upstream):
    upstream.enqueue(Script(chunks=WORDS, interval=0.1))
    page = open_page()
    send(page, "A new conversation", streaming=False)

    expect(page.locator(".conversation-open")).to_have_count(1)
    expect(last_answer(page)).to_have_class(re.compile(r"\brunning\b"))
    wait_answer_finished(page)


def test_finished_blocks_stay_put_while_the_answer_streams(open_page, upstream):
    """A selection in a finished block survives the frames that follow, and its code block's
    Copy can be clicked: only the block still being written is rendered again."""
    code = "```python\nprint('hello')\n```\n\n"
    upstream.enqueue(
        Script(chunks=[code, "First paragraph.\n\n", *[f" w{i}" for i in range(150)]], interval=0.03)
    )
    page = open_page()
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    send(page, "Show me code", streaming=True)
    page.wait_for_selector(
        ".message-assistant.running .code-block code .hljs-built_in"
    )  # highlighted once closed
    # The paragraph comes one frame after the code block: wait for it too, or it may not exist yet.
    page.wait_for_selector(".message-assistant.running .bubble-body p")
    page.evaluate(
        """() => {
          window.__removed = [];
          const body = document.querySelector('.message-assistant:last-child .bubble-body');
          new MutationObserver((records) => {
            for (const record of records) window.__removed.push(...record.removedNodes);
          }).observe(body, { childList: true });
          const paragraph = body.querySelector('p');
          const range = document.createRange();
          range.selectNodeContents(paragraph);
          getSelection().removeAllRanges();
          getSelection().addRange(range);
          window.__grownFrom = body.textContent.length;
        }"""
    )
    page.wait_for_function(  # many frames later, still streaming
        "() => document.querySelector('.message-assistant:last-child .bubble-body').textContent.length"
        " > window.__grownFrom + 100 && document.querySelector('.message-assistant.running')"
    )
    assert page.evaluate("() => getSelection().toString()") == "First paragraph."

    copy = last_answer(page).locator(".code-block .copy-code")
    landed = 0
    for _ in range(6):
        copy.click(timeout=2000)
        landed += copy.evaluate("(button) => button.classList.contains('copied')")
        page.wait_for_timeout(50)
    assert landed == 6
    assert page.evaluate("() => navigator.clipboard.readText()") == "print('hello')"
    removed = page.evaluate(
        "() => window.__removed.filter((node) => node.nodeType === 1 && node.matches('.code-block, p'))"
        ".map((node) => node.textContent.slice(0, 20))"
    )
    assert "First paragraph." not in removed and not [text for text in removed if "print" in text], removed
    wait_answer_finished(page, timeout=30_000)
    screenshot(page, "streaming-selection-kept")
