"""Answers are Markdown made safe; the user's own text is plain text. Nothing injected ever runs."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from tests.browser.pages import last_answer, screenshot, send, wait_answer_finished
from tests.support.fake_openai import Script

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

PAYLOADS = [
    "<img src=x onerror=window.__xss=1>",
    "<script>window.__xss=1</script>",
    "[click me](javascript:window.__xss=1)",
    "<svg onload=window.__xss=1><circle r=5 /></svg>",
    '<iframe src="javascript:window.__xss=1"></iframe>',
    '<a href="javascript:window.__xss=1">link</a>',
    '![pic](x" onerror="window.__xss=1)',
    '<details open ontoggle="window.__xss=1">d</details>',
    # A classic mutation-XSS vector against sanitisers.
    "<math><mtext><table><mglyph><style><img src=x onerror=window.__xss=1>"
    "</style></mglyph></table></mtext></math>",
]
ANSWER = "Here you go:\n\n" + "\n\n".join(PAYLOADS) + "\n\n```html\n<script>window.__xss=1</script>\n```\n"

# Anything in the messages that could run script or load a URL by itself.
DANGEROUS = (
    "script, iframe, object, embed, svg, math, img, style, form, "
    "[onerror], [onload], [ontoggle], [onclick], [srcdoc], a[href^='javascript' i]"
)


def assert_nothing_ran(page) -> None:
    page.wait_for_timeout(400)  # let an injected onerror/onload fire, if one got through
    assert page.evaluate("() => window.__xss") is None
    assert page.locator("#messageList").locator(DANGEROUS).count() == 0


@pytest.mark.parametrize("streaming", [True, False], ids=["streaming", "json"])
def test_injected_html_in_answers_never_runs(open_page, upstream, streaming):
    upstream.enqueue(Script(chunks=[ANSWER[i : i + 7] for i in range(0, len(ANSWER), 7)], interval=0.005))
    page = open_page()

    send(page, "Show me some HTML", streaming=streaming)

    answer = wait_answer_finished(page)
    assert_nothing_ran(page)
    body = answer.locator(".bubble-body")
    # Raw HTML is shown as text, not interpreted...
    expect(body).to_contain_text("<img src=x onerror=window.__xss=1>")
    expect(body).to_contain_text("<script>window.__xss=1</script>")
    # ...Markdown still works, and the code block is highlighted with a copy button.
    expect(answer.locator(".code-block code.language-html")).to_contain_text("<script>")
    expect(answer.locator(".code-block .copy-code")).to_have_count(1)
    link = answer.locator("a", has_text="click me")
    assert link.count() == 0 or not (link.get_attribute("href") or "").lower().startswith("javascript")
    screenshot(page, f"xss-answer-{'streaming' if streaming else 'json'}")

    # After a reload the same answer comes from the stored history: still inert.
    page.reload()
    page.wait_for_selector(".message-assistant:not(.running)")
    assert_nothing_ran(page)


def test_injected_html_in_the_users_message_is_plain_text(open_page, upstream):
    upstream.enqueue(Script(chunks=["ok"]))
    page = open_page()
    message = " ".join(PAYLOADS)

    send(page, message, streaming=True)

    wait_answer_finished(page)
    expect(page.locator(".message-user .bubble-body")).to_have_text(message)
    assert_nothing_ran(page)
    page.reload()
    expect(page.locator(".message-user .bubble-body")).to_have_text(message)
    assert_nothing_ran(page)
    # The sidebar title (the first message) is text too.
    expect(page.locator(".conversation-open")).to_have_count(1)
    assert page.locator("#conversationList").locator(DANGEROUS).count() == 0


def test_markdown_links_open_safely_and_code_can_be_copied(open_page, upstream):
    answer = "See [the docs](https://example.com/docs).\n\n```python\nprint('hi')\n```\n"
    upstream.enqueue(Script(chunks=[answer]))
    page = open_page()
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])

    send(page, "Links?", streaming=True)

    answer_item = wait_answer_finished(page)
    link = answer_item.locator("a", has_text="the docs")
    assert link.get_attribute("target") == "_blank"
    assert "noopener" in link.get_attribute("rel")
    expect(answer_item.locator("code.language-python .hljs-built_in")).to_have_text("print")
    answer_item.locator(".copy-code").click()
    expect(answer_item.locator(".copy-code")).to_contain_text("Copied")
    assert page.evaluate("() => navigator.clipboard.readText()") == "print('hi')"
    last_answer(page).locator(".copy-answer").click()
    assert page.evaluate("() => navigator.clipboard.readText()") == answer


def test_the_page_runs_under_a_strict_content_security_policy(open_page, upstream, browser, live_server_url):
    """Every page test fails on a CSP violation (conftest's watcher); this one checks the policy
    itself, that the page works under it, and that a stray inline script is refused."""
    upstream.enqueue(Script(chunks=["```python\nprint(1)\n```\n\nSafe **and** sound."]))
    page = open_page()
    response = page.request.get(live_server_url + "/")
    policy = response.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src 'self' 'nonce-" in policy
    assert "'unsafe-inline'" not in policy and "'unsafe-eval'" not in policy
    send(page, "Show me", streaming=True, transport="ws")  # WebSocket to self is allowed
    wait_answer_finished(page)
    expect(last_answer(page).locator("strong")).to_have_text("and")

    # The same check the fixture makes, shown to catch what it must: an injected inline script.
    context = browser.new_context()
    blocked: list[str] = []
    context.expose_binding("__report", lambda source, text: blocked.append(text))
    context.add_init_script(
        "document.addEventListener('securitypolicyviolation', (e) => {"
        " window.__violations = (window.__violations || 0) + 1; window.__report(e.violatedDirective); })"
    )
    probe = context.new_page()
    probe.goto(live_server_url + "/")
    probe.evaluate(
        """() => { const s = document.createElement('script'); s.textContent = 'window.__ran = 1';
                   document.body.append(s); }"""
    )
    probe.wait_for_function("() => window.__violations > 0")
    assert probe.evaluate("() => window.__ran") is None
    assert blocked and blocked[0].startswith("script-src")
    context.close()
