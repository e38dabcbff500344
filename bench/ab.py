"""Before/after on one machine: two source trees served side by side, requests alternating.

    .venv/bin/python -m bench.ab --base 9600912 --requests 60
    .venv/bin/python -m bench.ab --base 9600912 --requests 6 --burst 40   # 40 answers at once

On a shared machine two consecutive runs of the same code differ by more than most
changes do, so a change is measured by running the tree at `--base` (a git revision,
checked out in a temporary worktree) and this working tree at the same time, on the
same fake upstream, each on a fresh copy of the same database, and alternating the
requests between them (which one goes first flips every round). It prints the added
TTFT (each side's quantile minus the upstream direct's, measured in the same rounds)
per client, and each server's CPU per request. With `--burst N` every request of a
round is N requests sent at once (the server's own queueing then shows in the TTFT;
load shedding is off for both sides).
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

from . import load, servers
from .load import Stream, Summary
from .run import WARM_UP, ms

CLIENTS = ("sse", "sse-token")


async def _rounds(
    sides: dict[str, servers.Process], upstream_url: str, requests: int, text: str, burst: int = 1
):
    ttfts: dict[tuple[str, str], list[float]] = {}
    cpu: dict[str, float] = {}
    async with load.http_client() as client:

        async def one(side: str, name: str, client: httpx.AsyncClient = client) -> Stream:
            if side == "direct":
                return await load.direct(client, upstream_url, text)
            token = servers.API_TOKEN if name == "sse-token" else ""
            return await load.sse(client, sides[side].url, text, token=token)

        async def at_once(side: str, name: str) -> list[Stream]:
            if burst == 1:
                return [await one(side, name)]
            async with load.http_client() as fresh:  # new connections: none idles out mid-burst
                return await asyncio.gather(*(one(side, name, fresh) for _ in range(burst)))

        for side in sides:  # connections, lazy imports, the SDK client: not measured
            for name in CLIENTS:
                token = servers.API_TOKEN if name == "sse-token" else ""
                await load.sse(client, sides[side].url, WARM_UP, token=token)
        before = {side: process.cpu_seconds() for side, process in sides.items()}
        order = ["direct", *sides]
        for round_ in range(requests):
            for name in CLIENTS:
                for side in order if round_ % 2 == 0 else reversed(order):
                    ttfts.setdefault((side, name), []).extend(_ttfts(side, name, await at_once(side, name)))
        for side, process in sides.items():
            cpu[side] = (process.cpu_seconds() - before[side]) / (requests * len(CLIENTS) * burst)
    return ttfts, cpu


def _ttfts(side: str, name: str, streams: list[Stream]) -> list[float]:
    for stream in streams:
        if not stream.ok or stream.ttft is None:
            raise RuntimeError(f"{side} {name}: {stream.error or stream.terminal}")
    return [stream.ttft for stream in streams]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="git revision to compare this working tree with")
    parser.add_argument("--requests", type=int, default=60, help="requests per side and client")
    parser.add_argument("--chunks", type=int, default=8, help="chunks per answer (20 ms apart)")
    parser.add_argument(
        "--first-delay", type=float, default=0.0, help="the upstream's own time to first token, in seconds"
    )
    parser.add_argument("--burst", type=int, default=1, help="requests sent at once per round and side")
    args = parser.parse_args(argv)
    servers.raise_fd_limit()
    # A burst measures queueing, not refusals: load shedding off on both sides.
    no_shedding = {"CHATBOT_MAX_STARTING_ANSWERS": "0", "CHATBOT_MAX_LOOP_LAG": "0"} if args.burst > 1 else {}
    with tempfile.TemporaryDirectory(prefix="bench-ab-") as tmp:
        workdir, base_tree = Path(tmp), Path(tmp) / "base"
        git = ["git", "-C", str(servers.ROOT)]
        subprocess.run([*git, "worktree", "add", "--detach", "-q", str(base_tree), args.base], check=True)
        try:
            base_database = servers.Database(workdir / "base-db", root=base_tree)
            head_database = servers.Database(workdir / "head-db")
            text = load.message(chunks=args.chunks, interval=0.02, first_delay=args.first_delay)
            with (
                servers.upstream(workdir) as upstream,
                servers.server(
                    workdir, base_database, upstream_url=upstream.url, root=base_tree, **no_shedding
                ) as base,
                servers.server(workdir, head_database, upstream_url=upstream.url, **no_shedding) as head,
            ):
                sides = {f"base {args.base}": base, "this tree": head}
                ttfts, cpu = asyncio.run(_rounds(sides, upstream.url, args.requests, text, args.burst))
        finally:
            subprocess.run([*git, "worktree", "remove", "--force", str(base_tree)], check=False)
    direct = Summary.of(ttfts[("direct", "sse")] + ttfts[("direct", "sse-token")])
    print(f"upstream direct TTFT: p50 {ms(direct.p50)} · p99 {ms(direct.p99)} (n={direct.n})")
    for name in CLIENTS:
        for side in sides:
            added = Summary.of(ttfts[(side, name)]).minus(direct)
            print(f"{name:10} {side:22} added TTFT p50 {ms(added.p50):>8} · p99 {ms(added.p99):>8}"
                  f" · server CPU/request {cpu[side] * 1000:.1f} ms")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
