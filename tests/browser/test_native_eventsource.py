"""The browser's own EventSource on the events endpoint: every event once, then it stops.

EventSource reconnects by itself whenever the server closes the stream, sending the
last `id:` it saw as Last-Event-ID. Ended answers must then answer 204 No Content, the
one status that makes it stop; anything else is a reconnect loop.
"""

from __future__ import annotations

import pytest

from tests.support.fake_openai import Script

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

FOLLOW = """async ({ live }) => {
  const csrf = document.cookie.match(/csrftoken=([^;]+)/)[1];
  const response = await fetch("/api/chat/", {
    method: "POST",
    headers: { "Content-Type": "application/json", "X-CSRFToken": csrf, Accept: "application/x-ndjson" },
    body: JSON.stringify({ message: "Hi" }),
  });
  const reader = response.body.getReader();
  let buffered = "";
  while (!buffered.includes("\\n")) buffered += new TextDecoder().decode((await reader.read()).value);
  const messageId = JSON.parse(buffered.split("\\n")[0]).message_id;
  if (live) reader.cancel(); // leave: the answer goes on without this reader
  else while (!(await reader.read()).done);  // read it to its end first
  return await new Promise((resolve) => {
    const seen = [];
    let opens = 0;
    const source = new EventSource(`/api/messages/${messageId}/events`);
    source.onopen = () => opens++;
    for (const type of ["meta", "delta", "snapshot", "usage", "done", "error"]) {
      source.addEventListener(type, (event) => {
        // EventSource's own connection errors are also "error" events, but carry no data.
        if (event.data !== undefined) seen.push([type, Number(event.lastEventId)]);
      });
    }
    source.onerror = () => {
      if (source.readyState === EventSource.CLOSED) resolve({ seen, opens, closed: true });
    };
    setTimeout(() => { source.close(); resolve({ seen, opens, closed: false }); }, 8000);
  });
}"""


@pytest.mark.parametrize("live", [True, False], ids=["live-answer", "finished-answer"])
def test_native_eventsource_sees_each_event_once_and_stops(open_page, upstream, live):
    upstream.enqueue(Script(chunks=[f"{n} " for n in range(15)], interval=0.05 if live else 0))
    page = open_page()
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url) if "/events" in request.url else None)

    result = page.evaluate(FOLLOW, {"live": live})

    kinds = [kind for kind, _ in result["seen"]]
    ids = [seq for _, seq in result["seen"]]
    assert result["closed"], f"EventSource was still reconnecting after 8 s: {len(requests)} requests"
    assert kinds == ["meta"] + ["delta"] * 15 + ["usage", "done"]
    assert ids == list(range(1, len(ids) + 1)), "each event exactly once, in order"
    assert result["opens"] == 1
    assert len(requests) == 2, "one stream, then one reconnect answered 204: no loop"
