"""What starting an answer costs the server: CPU per request, and where it goes.

    .venv/bin/python -m bench.start --requests 300               # CPU per started answer, per client
    .venv/bin/python -m bench.start --requests 300 --profile     # + py-spy's breakdown by step

One server (one uvicorn worker, the product's defaults, SQLite), one fake upstream that
answers one chunk at once, and sequential requests: so the server's CPU per request is
the cost of a started answer (request parsing → limits → turn saved → upstream request
sent → first event written → outcome saved), with almost no per-token work in it.
With `--profile`, py-spy samples the server during the token client's requests and its
busy samples are split into the steps of `STEPS` and `LAYERS` (see `_step`).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from . import load, servers
from .load import Stream, Summary
from .run import WARM_UP, ms

ONE_CHUNK = load.message(chunks=1, interval=0)

# A sample is one step's if any frame of its stack ("function (file:line)") contains one of
# the step's patterns (first match in this order wins: the SDK's request counts as the
# upstream's even when Django's code is below it)...
STEPS: list[tuple[str, tuple[str, ...]]] = [
    ("upstream request (openai SDK, httpx)", ("openai/", "httpx", "httpcore", "anyio/")),
    ("saving the turn", ("_create_turn", "_save_turn")),
    ("outcome and usage saved", ("chatbot_api/streaming/outcome.py", "chatbot_api/streaming/store.py")),
    ("limits", ("chatbot_api/limits.py",)),
    ("load shedding's loop-lag probe", ("_watch_loop_lag",)),
    (
        "authentication, owner",
        (
            "chatbot_api/authentication.py",
            "chatbot_api/identity.py",
            "rest_framework/authentication.py",
            "authtoken/",
        ),
    ),
]
# ...otherwise to the layer of its innermost frame that is not a pass-through (the first three
# layers before the generic rest).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "Django middleware",
        (
            "django/middleware/",
            "django/contrib/sessions/",
            "django/contrib/auth/middleware",
            "django/contrib/messages/",
            "servestatic/",
        ),
    ),
    (
        "DRF dispatch, parsing, serializers, the view",
        ("rest_framework/", "chatbot_api/views.py", "chatbot_api/serializers.py", "chatbot_api/services.py"),
    ),
    ("event log, generation, SSE framing", ("chatbot_api/",)),
    ("Django handlers and ORM", ("django/",)),
    ("asgiref thread hops", ("asgiref/", "concurrent/futures", "threading.py")),
    ("uvicorn, event loop", ("uvicorn/", "uvloop", "asyncio/", "httptools")),
]
# Innermost frames of threads that wait (py-spy counts some of them as running).
IDLE = ("_worker (concurrent/futures/thread.py", "Condition.wait (threading.py", "_wait_for_tstate_lock")
PASS_THROUGH = (
    "MiddlewareMixin.__acall__",
    "convert_exception_to_response",
    "ServeStaticMiddleware.__call__",
    "InlineHooks.__acall__",
    "CsrfViewMiddleware.__acall__ (chatbot_api",
    "AnswerAdmission.__call__",  # and its send wrapper
    "LifespanMiddleware.__call__",
)


async def _requests(origin: str, n: int) -> dict[str, list[Stream]]:
    streams: dict[str, list[Stream]] = {"sse-token": [], "sse": []}
    async with load.http_client() as client:
        for name in streams:  # lazy imports, connections, the SDK client: not measured
            await load.sse(client, origin, WARM_UP, token=servers.API_TOKEN if name == "sse-token" else "")
        for _ in range(n):
            for name, runs in streams.items():
                token = servers.API_TOKEN if name == "sse-token" else ""
                stream = await load.sse(client, origin, ONE_CHUNK, token=token)
                if not stream.ok:
                    raise RuntimeError(f"{name}: {stream.error or stream.terminal}")
                runs.append(stream)
    return streams


async def _one_client(origin: str, n: int, token: str) -> None:
    async with load.http_client() as client:
        for _ in range(n):
            stream = await load.sse(client, origin, ONE_CHUNK, token=token)
            if not stream.ok:
                raise RuntimeError(stream.error or stream.terminal)


def breakdown(raw: str) -> list[tuple[str, float]]:
    """py-spy `--format raw` output (one `frame;frame;... count` line per stack) → share per step."""
    counts: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        if frames and frames[0].startswith("process "):
            frames = frames[1:]
        if frames and frames[0].startswith("thread "):
            frames = frames[1:]
        if not frames or any(marker in frames[-1] for marker in IDLE):
            continue
        total += int(count)
        step = _step(frames)
        counts[step] += int(count)
    steps = [name for name, _ in STEPS + LAYERS] + ["other"]
    return [(step, counts[step] / total) for step in steps if counts[step]] if total else []


def _step(frames: list[str]) -> str:
    for name, patterns in STEPS:
        if any(pattern in frame for frame in frames for pattern in patterns):
            return name
    specific, generic = LAYERS[:3], LAYERS[3:]
    for layers in (specific, generic):
        for frame in reversed(frames):
            if any(marker in frame for marker in PASS_THROUGH):
                continue
            for name, patterns in layers:
                if any(pattern in frame for pattern in patterns):
                    return name
    return "other"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300, help="requests per client")
    parser.add_argument(
        "--profile", action="store_true", help="sample the token client's requests with py-spy"
    )
    parser.add_argument("--raw", type=Path, help="with --profile: also keep py-spy's raw samples here")
    args = parser.parse_args(argv)
    servers.raise_fd_limit()
    with tempfile.TemporaryDirectory(prefix="bench-start-") as tmp:
        workdir = Path(tmp)
        database = servers.Database(workdir / "db")
        with (
            servers.upstream(workdir) as upstream,
            servers.server(workdir, database, upstream_url=upstream.url) as server,
        ):
            asyncio.run(_requests(server.url, 5))  # warm-up, then one measured pass per client
            cpu: dict[str, float] = {}
            for name, token in (("sse (API token)", servers.API_TOKEN), ("sse (anonymous, no cookie)", "")):
                before = server.cpu_seconds()
                asyncio.run(_one_client(server.url, args.requests, token))
                cpu[name] = (server.cpu_seconds() - before) / args.requests
            ttfts = asyncio.run(_requests(server.url, min(args.requests, 60)))
            samples = ""
            if args.profile:
                samples = _profile(server, workdir, args.requests)
                if args.raw:
                    args.raw.write_text(samples)
    for name, seconds in cpu.items():
        print(f"{name:28} server CPU per started answer {seconds * 1000:.2f} ms (n={args.requests})")
    for name, runs in ttfts.items():
        summary = Summary.of([stream.ttft for stream in runs])
        print(f"{name:28} TTFT p50 {ms(summary.p50)} · p99 {ms(summary.p99)} (the upstream's own included)")
    for step, share in breakdown(samples):
        print(f"  {share * 100:5.1f}%  {step}")
    return 0


def _profile(server: servers.Process, workdir: Path, requests: int) -> str:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    out = workdir / "profile.txt"
    argv = [py_spy, "record", "--nonblocking", "--format", "raw", "--rate", "500", "--threads",
            "--pid", str(server.pid), "--output", str(out)]  # fmt: skip
    spy = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        asyncio.run(asyncio.sleep(1.0))  # py-spy attaches
        asyncio.run(_one_client(server.url, requests, servers.API_TOKEN))
    finally:
        spy.send_signal(2)  # SIGINT: py-spy writes its output and exits
        with contextlib.suppress(subprocess.TimeoutExpired):
            spy.wait(timeout=30)
        if spy.poll() is None:
            spy.kill()
    return out.read_text() if out.exists() else ""


if __name__ == "__main__":
    sys.exit(main())
