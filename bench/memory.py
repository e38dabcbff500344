"""Memory per open stream: N SSE answers held open on one worker, RSS before and during.

    .venv/bin/python -m bench.memory --streams 100 --tokens 500 --interval 0.05
    .venv/bin/python -m bench.memory --streams 100 --tokens 500 --interval 0.05 --ramp 0   # a burst
    .venv/bin/python -m bench.memory --streams 60 --tokens 120 --interval 0.1 --ramp 5 --trace

Load shedding is off (every stream is let in). The streams open evenly over `--ramp`
seconds (shorter than an answer), and the RSS is sampled halfway between the last one
opening and the first one ending, when all of them are open, against the idle worker
after a warm-up.
`--trace` runs the server under tracemalloc (much slower, and its RSS means nothing
then) and prints the Python objects the open streams hold, per stream, by package:
what is kept per stream, and by whom.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sys
import tempfile
from pathlib import Path

from . import load, servers

# Grouped by the first of these in the allocating file's path (else the file itself).
PACKAGES = (
    "django/db", "django/core/handlers", "django/http", "django/urls", "django", "rest_framework",
    "httpx", "openai", "aiohttp", "uvicorn", "chatbot_api/streaming", "chatbot_api", "asyncio",
    "asgiref", "json", "python3",
)  # fmt: skip


def _by_package(before, during, streams: int) -> list[tuple[str, float]]:
    sizes: collections.Counter[str] = collections.Counter()
    for stat in during.compare_to(before, "filename"):
        name = stat.traceback[0].filename
        sizes[next((p for p in PACKAGES if f"/{p}" in name), name)] += stat.size_diff
    return [(name, size / streams / 1024) for name, size in sizes.most_common()]


async def measure(streams: int, tokens: int, interval: float, ramp: float, trace: bool) -> None:
    if ramp >= tokens * interval:
        raise SystemExit(f"--ramp must be shorter than an answer ({tokens * interval:g} s)")
    workdir = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    env = {"CHATBOT_MAX_STARTING_ANSWERS": "0", "CHATBOT_MAX_LOOP_LAG": "0"}
    if trace:
        env |= servers.traced_env(workdir)
    database = servers.Database(workdir / "db")
    with (
        servers.upstream(workdir) as upstream,
        servers.server(workdir, database, upstream_url=upstream.url, **env) as server,
    ):
        text = load.message(chunks=tokens, interval=interval)
        async with load.http_client() as client:
            for _ in range(6):
                await load.sse(client, server.url, load.message(chunks=2, interval=0.0))
            await asyncio.sleep(1)
            idle = server.rss_kib()
            before = servers.tracemalloc_snapshot(server.pid, workdir, 0) if trace else None
            answers = asyncio.create_task(
                load.ramped(lambda: load.sse(client, server.url, text), streams, ramp)
            )
            await asyncio.sleep((ramp + tokens * interval) / 2)
            during_rss = server.rss_kib()
            during = servers.tracemalloc_snapshot(server.pid, workdir, 1) if trace else None
            results = await answers
        ok = sum(result.ok and len(result.deltas) == tokens for result in results)
        print(
            f"{streams} SSE streams of {tokens} tokens ({interval * 1000:g} ms apart) "
            f"opened over {ramp:g} s, {ok} whole"
        )
        print(f"RSS {idle} → {during_rss} KiB: {(during_rss - idle) / streams:.1f} KiB per open stream")
        if trace:
            packages = _by_package(before, during, streams)
            print(
                f"tracemalloc: {sum(size for _, size in packages):.1f} KiB of Python objects per open stream"
            )
            for name, size in packages[:20]:
                print(f"  {size:6.2f} KiB  {name}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--tokens", type=int, default=500, help="tokens per answer")
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between tokens")
    parser.add_argument("--ramp", type=float, default=10.0, help="seconds over which the streams open")
    parser.add_argument(
        "--trace", action="store_true", help="tracemalloc: Python objects per stream, by package"
    )
    args = parser.parse_args(argv)
    servers.raise_fd_limit()
    asyncio.run(measure(args.streams, args.tokens, args.interval, args.ramp, args.trace))
    return 0


if __name__ == "__main__":
    sys.exit(main())
