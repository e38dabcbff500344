"""Helpers the browser tests share: driving the chat page and keeping screenshots."""

from __future__ import annotations

import re
from pathlib import Path

SCREENSHOTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "screenshots"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}


def wait_ready(page) -> None:
    page.wait_for_selector("#app[data-ready=true]")


def send(page, text: str, *, streaming: bool | None = None, transport: str | None = None) -> None:
    """Type a message and press Enter, after choosing the mode and transport if given."""
    if streaming is not None:
        page.set_checked("#streamingCheckbox", streaming)
    if transport is not None:
        if not page.evaluate("() => document.getElementById('settings').open"):
            page.click("#settings summary")
        page.select_option("#transportSelect", transport)
        page.click("#settings summary")  # closed again, as a user leaves it
    page.fill("#messageInput", text)
    page.press("#messageInput", "Enter")


def last_answer(page):
    return page.locator(".message-assistant").last


def wait_answer_finished(page, timeout: float = 15_000):
    page.wait_for_function(
        "() => { const items = document.querySelectorAll('.message-assistant');"
        " return items.length && !items[items.length - 1].classList.contains('running'); }",
        timeout=timeout,
    )
    return last_answer(page)


def answer_text(page) -> str:
    return last_answer(page).locator(".bubble-body").inner_text().strip()


# Runs in the page: records each distinct text of the last answer until it finishes.
SAMPLE_ANSWER_GROWTH = """
async () => {
  const seen = [];
  const deadline = Date.now() + 20000;
  while (Date.now() < deadline) {
    const items = document.querySelectorAll('.message-assistant');
    const item = items[items.length - 1];
    const text = item ? item.querySelector('.bubble-body').textContent : '';
    if (text && text !== seen[seen.length - 1]) seen.push(text);
    if (item && !item.classList.contains('running')) return seen;
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
  return seen;
}
"""


def sample_answer_growth(page) -> list[str]:
    return page.evaluate(SAMPLE_ANSWER_GROWTH)


def screenshot(page, name: str) -> None:
    """Keep a picture of a state for people to look at (test-artifacts/ is not committed)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    filename = re.sub(r"[^\w.-]", "_", name) + ".png"
    page.screenshot(path=str(SCREENSHOTS / filename))


def wait_for_chunks(upstream, count: int, *, request: int = -1, timeout: float = 10.0) -> None:
    """Until the fake upstream has sent `count` more content chunks of a request (the latest) than now."""
    import time

    record = upstream.wait_for_request(max(len(upstream.history), 1) if request == -1 else request + 1)
    target = record.chunks_sent + count
    deadline = time.monotonic() + timeout
    while record.chunks_sent < target:
        assert time.monotonic() < deadline, f"only {record.chunks_sent} chunks sent after {timeout} s"
        time.sleep(0.01)


AXE = Path(__file__).resolve().parent / "vendor" / "axe.min.js"
# WCAG 2.2 A and AA, and axe's best practices (one main landmark, all content in landmarks).
AXE_TAGS = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa", "wcag22aa", "best-practice"]


def axe_violations(page) -> list[str]:
    """axe-core's violations on the page as it is now: "rule: target (summary)" lines."""
    if not page.evaluate("() => typeof window.axe === 'object'"):
        page.evaluate(AXE.read_text())  # evaluated, not a <script>: the page's CSP allows none inline
    return page.evaluate(
        """async (tags) => {
          const result = await axe.run(document, { runOnly: { type: "tag", values: tags } });
          return result.violations.flatMap((violation) => violation.nodes.map((node) =>
            `${violation.id}: ${node.target.join(" ")} (${node.failureSummary.split("\\n")[1] ?? ""})`));
        }""",
        AXE_TAGS,
    )
