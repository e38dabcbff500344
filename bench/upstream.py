"""The fake OpenAI upstream as its own process, with the script picked per request.

It is `tests.support.fake_openai` (the real Chat Completions SSE wire format) plus one
thing: the last user message may carry `chunks=N interval=S first_delay=S`, so one
upstream process serves every scenario (64 chunks 20 ms apart, 300 chunks at 20/s, ...)
and a request sent directly and the same request relayed by our server get the same
script. Without those words the script given on the command line is used.

    python -m bench.upstream --port 0     # prints "fake-openai ready <url>"
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from bench.servers import raise_fd_limit
from tests.support.fake_openai import FakeOpenAI, RecordedRequest, Script, serve_forever

CHUNK_TEXT = " tok"
_DIRECTIVE = re.compile(r"\b(chunks|interval|first_delay)=([0-9.]+)")


def directive(*, chunks: int, interval: float, first_delay: float = 0.0) -> str:
    """The words that make the upstream answer with this script."""
    return f"chunks={chunks} interval={interval:g} first_delay={first_delay:g}"


def script_for(text: str, default: Script) -> Script:
    """The script a user message asks for (see `directive()`), else `default`."""
    values = dict(_DIRECTIVE.findall(text))
    if not values:
        return default
    chunks = int(values.get("chunks", len(default.chunks)))
    return replace(
        default,
        chunks=(CHUNK_TEXT,) * chunks,
        interval=float(values.get("interval", default.interval)),
        first_delay=float(values.get("first_delay", default.first_delay)),
    )


class ScriptedUpstream(FakeOpenAI):
    """A `FakeOpenAI` whose script comes from the request's last user message.

    `_record()` is where the base class pops its script queue, synchronously: queueing the
    request's own script right before it cannot race another request.
    """

    def _record(self, scope: Any, path: str, body: dict[str, Any]) -> RecordedRequest:
        messages = body.get("messages") or [{}]
        content = messages[-1].get("content") if isinstance(messages[-1], dict) else ""
        self.enqueue(script_for(content if isinstance(content, str) else "", self.default))
        return super()._record(scope, path, body)


def serve(host: str, port: int, default: Script) -> None:
    """Serve until SIGINT/SIGTERM; print `fake-openai ready <url>` once listening."""
    raise_fd_limit()
    serve_forever(host, port, fake=ScriptedUpstream(default, keep_history=False), backlog=4096)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fake OpenAI upstream for the benchmarks.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--chunks", type=int, default=64)
    parser.add_argument("--interval", type=float, default=0.02)
    args = parser.parse_args(argv)
    serve(args.host, args.port, Script(chunks=(CHUNK_TEXT,) * args.chunks, interval=args.interval))


if __name__ == "__main__":
    main()
