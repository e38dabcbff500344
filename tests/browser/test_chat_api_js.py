"""chat-api.js's small SSE parser, run in the browser on awkward inputs."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

PARSE = """
async (chunks) => {
  const { SseParser } = await import('/static/chatbot_web/chat-api.js');
  const parser = new SseParser();
  return chunks.flatMap((chunk) => parser.push(chunk));
}
"""


def test_sse_parser_handles_split_frames_comments_and_crlf(open_page):
    page = open_page()
    chunks = [
        "retry: 1000\n\n",
        ': keep-alive\n\nid: 1\nevent: meta\ndata: {"type":"meta","seq":1}\n',
        "\nid: 2\nevent: delta\nda",
        'ta: {"type":"delta","seq":2,"text":"a\\nb"}\n\n',
        'id: 3\r\nevent: delta\r\ndata: {"type":"delta",\r\ndata: "seq":3}\r\n\r\n',
        'id: 4\nevent: done\ndata:{"type":"done","seq":4}\n\n',
        'id: 5\nevent: delta\ndata: {"incomplete": ',
    ]

    frames = page.evaluate(PARSE, chunks)

    assert [(f["id"], f["event"]) for f in frames] == [
        ("1", "meta"),
        ("2", "delta"),
        ("3", "delta"),
        ("4", "done"),
    ]
    assert frames[1]["data"] == '{"type":"delta","seq":2,"text":"a\\nb"}'
    assert frames[2]["data"] == '{"type":"delta",\n"seq":3}'  # data lines joined by a newline
    assert frames[3]["data"] == '{"type":"done","seq":4}'  # no space after the colon is fine too
