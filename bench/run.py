"""`python -m bench.run`: every benchmark scenario, one table (stdout and bench/results/latest.md).

Scenarios (docs/benchmarks.md explains each number and its target):

    latency  added TTFT and inter-token gaps at 1 stream, per transport, vs the upstream direct
    scale    streams per worker: 50 .. 1000 concurrent SSE streams at 20 tokens/s
    db       database writes per answer vs answer length, token count and flush interval
    local    tokens/s of the local model through the server vs llama.cpp in one process
    stop     from the stop request to the upstream connection closing
    overload a burst of new answers on top of running streams: refused at once, or started
    soak     thousands of mixed answers (SSE, NDJSON, JSON, WebSocket, clients leaving early): RSS per 1000
    workers  opt-in (needs Redis and PostgreSQL): 250 and 500 streams on 1 and 2 workers
             sharing the Redis event log and PostgreSQL (BENCH_REDIS_URL, BENCH_POSTGRES_URL)

The server (`uvicorn chatbot.asgi:application`, one worker unless stated) and the fake upstream run as
separate processes on 127.0.0.1; this process is the load generator. Everything is killed
on exit, and every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import itertools
import math
import os
import resource
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import openai

from bench import load, servers
from bench.load import Stream, Summary, WebSocketChat, http_client, message
from tests.support.fake_openai import FakeOpenAI, FakeOpenAIServer, Script

SCENARIOS = ("latency", "scale", "db", "local", "stop", "overload", "soak", "workers", "soak-cluster")
OPT_IN = ("workers", "soak-cluster")  # need Redis and PostgreSQL: only with --scenario
RESULTS = servers.ROOT / "bench" / "results" / "latest.md"
LOCAL_PROMPT = "Write a short story about a robot who learns to paint."
WARM_UP = message(chunks=4, interval=0)
STREAMED = ("sse", "sse-token", "websocket", "ndjson")
CLIENTS = {"sse": "sse (anonymous, no cookie: a new session each)", "sse-token": "sse (API token)"}
Runs = dict[str, list[Stream]]  # client name -> its answers
SOAK_CLIENTS = 20  # soak: answers in flight at once


@dataclass(frozen=True)
class Plan:
    """Sizes of every scenario: the full run, or `--quick` (the smoke test's)."""

    runs: int
    rounds: int  # latency: requests per client per run
    latency_chunks: int
    latency_interval: float
    steps: tuple[int, ...]  # scale: concurrent streams
    worker_steps: tuple[int, ...]  # workers: concurrent streams
    step_interval: float
    ramp: float  # scale: seconds over which a step's streams open
    hold: float  # scale: seconds all the streams of a step are open together
    db_configs: tuple[tuple[int, float, float], ...]  # (chunks, seconds between them, flush interval)
    db_answers: int
    stops: int
    stop_interval: float
    local_tokens: int
    local_pairs: int
    overload: tuple[int, int, float]  # (streams running, burst of new requests, seconds the burst takes)
    soak: tuple[int, int, int]  # (answers of warm-up, answers per block, blocks)
    soak_clients: int = SOAK_CLIENTS
    soak_minutes: float | None = None  # soak: blocks until this long after the warm-up, not `soak`'s count
    trace: bool = False  # soak: the server under tracemalloc

    @classmethod
    def full(cls, runs: int) -> Plan:
        return cls(
            runs=runs, rounds=10, latency_chunks=64, latency_interval=0.02,
            steps=(50, 100, 250, 500, 1000), worker_steps=(250, 500), step_interval=0.05, ramp=20.0, hold=5.0,
            db_configs=((64, 0.0, 0.25), (64, 0.02, 0.25), (256, 0.005, 0.25), (64, 0.02, 0.1)),
            db_answers=runs, stops=4 * runs, stop_interval=0.1, local_tokens=128, local_pairs=2 * runs,
            overload=(200, 200, 2.0), soak=(1000, 1000, 6),
        )  # fmt: skip

    @classmethod
    def quick(cls, runs: int) -> Plan:
        return cls(
            runs=runs, rounds=2, latency_chunks=16, latency_interval=0.005,
            steps=(2, 5), worker_steps=(2,), step_interval=0.05, ramp=0.2, hold=0.3,
            db_configs=((16, 0.0, 0.25), (16, 0.02, 0.25), (64, 0.005, 0.25)),
            db_answers=1, stops=1, stop_interval=0.05, local_tokens=16, local_pairs=1,
            overload=(3, 6, 0.05), soak=(10, 10, 3),
        )  # fmt: skip


@dataclass
class Row:
    scenario: str
    measure: str
    result: str
    target: str = ""
    met: bool | None = None


@dataclass
class Bench:
    plan: Plan
    workdir: Path
    database: servers.Database
    upstream: servers.Process

    def server(
        self, *, database: servers.PostgresDatabase | None = None, workers: int = 1, **overrides: str
    ) -> contextlib.AbstractContextManager[servers.Process]:
        """A fresh product server (its own copy of the database) on the shared upstream."""
        return servers.server(
            self.workdir,
            database or self.database,
            upstream_url=self.upstream.url,
            workers=workers,
            **overrides,
        )


def ms(seconds: float) -> str:
    return "n/a" if math.isnan(seconds) else f"{seconds * 1000:.1f} ms"


def quantiles(summary: Summary) -> str:
    return f"p50 {ms(summary.p50)} · p99 {ms(summary.p99)}"


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def progress(text: str) -> None:
    print(f"[bench] {text}", file=sys.stderr, flush=True)


def _rotated(items: list[str], by: int) -> list[str]:
    by %= len(items)
    return items[by:] + items[:by]


def _failures(streams: list[Stream]) -> str:
    errors = Counter(s.error or f"ended with {s.terminal or 'nothing'}" for s in streams if not s.ok)
    return "; ".join(f"{count}× {error[:120]}" for error, count in errors.most_common(3))


def _ttfts(streams: list[Stream]) -> Summary:
    return Summary.of([s.ttft for s in streams if s.ok and s.ttft is not None])


def _totals(streams: list[Stream]) -> Summary:
    return Summary.of([s.total for s in streams if s.ok and s.total is not None])


def _gaps(streams: list[Stream]) -> Summary:
    return Summary.of([gap for s in streams if s.ok for gap in s.gaps])


# --- 1 + 2: latency at one stream ------------------------------------------------------------------------


async def latency(bench: Bench) -> list[Row]:
    """Every transport, the upstream direct and the SDK direct, interleaved, one request at a time."""
    plan = bench.plan
    text = message(chunks=plan.latency_chunks, interval=plan.latency_interval)
    per_run: list[Runs] = []
    cpu: Counter[str] = Counter()  # this process's CPU per client: what reading the upstream costs
    sdk = openai.AsyncOpenAI(base_url=bench.upstream.url, api_key="sk-benchmark", max_retries=0)
    try:
        for run_number in range(plan.runs):
            progress(f"latency run {run_number + 1}/{plan.runs}")
            with bench.server() as server:
                async with http_client() as client:
                    socket = await WebSocketChat.open(server.url)
                    try:
                        clients = _latency_clients(client, sdk, socket, server.url, bench.upstream.url)
                        for run_one in clients.values():  # connections, lazy imports, the SDK client
                            await run_one(WARM_UP)
                        run: Runs = {name: [] for name in clients}
                        for round_ in range(plan.rounds):
                            for name in _rotated(list(clients), round_):
                                before = own_cpu()
                                run[name].append(await clients[name](text))
                                cpu[name] += own_cpu() - before
                    finally:
                        await socket.close()
            per_run.append(run)
    finally:
        await sdk.close()
    streams = {name: [s for run in per_run for s in run[name]] for name in per_run[0]}
    return _ttft_rows(plan, per_run, streams) + _gap_rows(plan, streams, cpu)


def _latency_clients(
    client: httpx.AsyncClient, sdk: openai.AsyncOpenAI, socket: WebSocketChat, origin: str, upstream: str
) -> dict[str, Callable[[str], Awaitable[Stream]]]:
    return {
        "direct": lambda text: load.direct(client, upstream, text),
        "openai-sdk": lambda text: load.sdk(sdk, text),
        "sse": lambda text: load.sse(client, origin, text),
        "sse-token": lambda text: load.sse(client, origin, text, token=servers.API_TOKEN),
        "websocket": socket.chat,
        "ndjson": lambda text: load.ndjson(client, origin, text),
        "json": lambda text: load.json_answer(client, origin, text),
    }


def _ttft_rows(plan: Plan, per_run: list[Runs], streams: Runs) -> list[Row]:
    scenario = f"1. TTFT, 1 stream ({plan.latency_chunks} chunks × {plan.latency_interval * 1000:g} ms)"
    base = _ttfts(streams["direct"])
    sdk = _ttfts(streams["openai-sdk"]).minus(base)
    rows = [
        Row(scenario, "upstream direct TTFT (the baseline)", f"{quantiles(base)} (n={base.n})"),
        Row(scenario, "added TTFT, openai SDK direct (the provider's client alone)", quantiles(sdk)),
    ]
    added: dict[str, Summary] = {}
    for name in STREAMED:
        added[name] = _ttfts(streams[name]).minus(base)
        by_run = " / ".join(ms(_ttfts(run[name]).p50 - _ttfts(run["direct"]).p50) for run in per_run)
        target, met = "", None
        if name in ("sse", "sse-token"):
            target, met = "p50 ≤ 3 ms, p99 ≤ 10 ms", added[name].p50 <= 0.003 and added[name].p99 <= 0.010
        result = f"{quantiles(added[name])} (p50 by run: {by_run})"
        rows.append(Row(scenario, f"added TTFT, {CLIENTS.get(name, name)}", result, target, met))
    ratio = added["websocket"].p50 / added["sse"].p50 if added["sse"].p50 > 0 else float("nan")
    rows.append(Row(scenario, "added TTFT, WebSocket / SSE (p50)", f"{ratio:.2f}×", "≤ 1.25×", ratio <= 1.25))
    answer = _totals(streams["json"]).minus(_totals(streams["direct"]))
    rows.append(Row(scenario, "added time to the whole answer, JSON mode", quantiles(answer)))
    return rows


def _gap_rows(plan: Plan, streams: Runs, cpu: Counter[str]) -> list[Row]:
    scenario = "2. Inter-token gap, 1 stream"
    base = _gaps(streams["direct"])
    rows = [Row(scenario, "upstream direct gap (the baseline)", quantiles(base))]
    for name in ("openai-sdk", *STREAMED):
        extra = _gaps(streams[name]).minus(base)
        target, met = ("≤ 2 ms", extra.p99 <= 0.002) if name in STREAMED else ("", None)
        result = f"{ms(extra.p99)} (p99 {ms(_gaps(streams[name]).p99)}, max {ms(_gaps(streams[name]).max)})"
        rows.append(Row(scenario, f"added gap p99, {name}", result, target, met))
    for name, items in streams.items():
        if any(not s.ok for s in items):
            rows.append(Row(scenario, f"errors, {name}", _failures(items), "0", False))
    relayed = [s for name in STREAMED for s in streams[name]]
    received, sent = sum(len(s.deltas) for s in relayed), plan.latency_chunks * len(relayed)
    rows.append(Row(scenario, "text frames received / sent by the upstream (SSE, WS, NDJSON)",
                    f"{received} / {sent}", "equal: no coalescing, no loss", received == sent))  # fmt: skip
    first = max((s.ttft or 0.0 for s in relayed), default=float("nan"))
    upstream_end = _totals(streams["direct"]).p50
    rows.append(Row(scenario, "first frame vs the upstream's last",
                    f"latest first frame {ms(first)}; the upstream's stream lasts {ms(upstream_end)}",
                    "first frame before the upstream ends", first < upstream_end))  # fmt: skip
    frames = {name: max(sum(len(s.deltas) for s in streams[name]), 1) for name in ("direct", "openai-sdk")}
    raw, typed = (cpu[name] / frames[name] * 1e6 for name in ("direct", "openai-sdk"))
    rows.append(Row(scenario, "load generator's CPU per text frame: raw httpx / openai SDK",
                    f"{raw:.0f} µs / {typed:.0f} µs (request overheads included)"))  # fmt: skip
    return rows


# --- 3: streams per worker ---------------------------------------------------------------------


async def _sample_rss(process: servers.Process, peak: list[int]) -> None:
    while True:
        with contextlib.suppress(OSError, RuntimeError):
            peak[0] = max(peak[0], process.rss_kib())
        await asyncio.sleep(0.2)


@dataclass
class Step:
    """One concurrency step, measured."""

    count: int
    chunks: int
    relayed: list[Stream]
    control: list[Stream]
    cpu: tuple[float, float, float]  # CPU seconds used by the server, the upstream, this process
    wall: float
    idle_rss: int
    peak_rss: int


async def scale(bench: Bench) -> list[Row]:
    """Per step: the control (straight to the upstream), then a fresh server relaying the same load."""
    plan = bench.plan
    rows: list[Row] = []
    for count in plan.steps:
        progress(f"scale: {count} streams")
        text, chunks, control = await _control(bench, count)
        with bench.server() as server:
            step = await _step(bench, server, count, text, chunks, control)
        rows.append(_scale_row(step, plan))
    return rows


async def _control(bench: Bench, count: int) -> tuple[str, int, list[Stream]]:
    """A step's load sent straight to the upstream: what the machine alone does to its timing."""
    plan = bench.plan
    chunks = math.ceil((plan.ramp + plan.hold) / plan.step_interval)
    text = message(chunks=chunks, interval=plan.step_interval)
    async with http_client() as client:
        direct = functools.partial(load.direct, client, bench.upstream.url, text)
        control = await load.ramped(direct, count, plan.ramp)
    return text, chunks, control


async def _step(
    bench: Bench, server: servers.Process, count: int, text: str, chunks: int, control: list[Stream]
) -> Step:
    async with http_client() as client:
        for _ in range(6):  # with several workers, the kernel spreads these over them
            await load.sse(client, server.url, WARM_UP)
        await asyncio.sleep(0.5)
        idle_rss, peak = server.rss_kib(), [0]
        before = (server.cpu_seconds(), bench.upstream.cpu_seconds(), own_cpu(), time.perf_counter())
        sampler = asyncio.create_task(_sample_rss(server, peak))
        try:
            relay = functools.partial(load.sse, client, server.url, text)
            relayed = await load.ramped(relay, count, bench.plan.ramp)
        finally:
            sampler.cancel()
        server.check_alive()
        used = (server.cpu_seconds(), bench.upstream.cpu_seconds(), own_cpu())
        cpu = (used[0] - before[0], used[1] - before[1], used[2] - before[2])
        wall = time.perf_counter() - before[3]
    return Step(count, chunks, relayed, control, cpu, wall, idle_rss, peak[0])


# --- 3b: scale-out (opt-in: needs Redis and PostgreSQL) -------------------------------------------

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/13")
POSTGRES_URL = os.environ.get("BENCH_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/chatbot_bench")


async def workers(bench: Bench) -> list[Row]:
    """The same steps on 1 and 2 uvicorn workers sharing the Redis event log and PostgreSQL."""
    plan = bench.plan
    scenario = "3b. Scale-out"
    backends = _cluster_backends(scenario)
    if isinstance(backends, Row):
        return [backends]
    store, database, env = backends
    rows: list[Row] = []
    for count in plan.worker_steps:
        text, chunks, control = await _control(bench, count)
        for worker_count in (1, 2):
            progress(f"workers: {count} streams on {worker_count} worker(s)")
            store.flushdb()
            with bench.server(database=database, workers=worker_count, **env) as server:
                step = await _step(bench, server, count, text, chunks, control)
            setup = f"{worker_count} worker{'s' if worker_count > 1 else ''}, Redis event log + PostgreSQL"
            rows.append(Row(f"{scenario}: {count} × 20 tok/s", setup, _step_result(step)[0]))
    return rows


def _cluster_backends(scenario: str):
    """(Redis client, PostgreSQL database, server environment), or the row saying why not."""
    try:
        import redis

        store = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3)
        store.ping()
        database = servers.PostgresDatabase(POSTGRES_URL)
    except Exception as error:  # a missing service is a result, not a crash
        return Row(scenario, "not run", f"needs Redis ({REDIS_URL}) and PostgreSQL ({POSTGRES_URL}): {error}")
    return store, database, {"REDIS_URL": REDIS_URL, "CHATBOT_EVENT_LOG": "redis"}


def _scale_row(step: Step, plan: Plan) -> Row:
    result, met = _step_result(step)
    seconds = step.chunks * plan.step_interval
    scenario = f"3. Streams per worker: {step.count} × 20 tok/s"
    measure = f"{step.count} SSE streams of {seconds:g} s, opened over {plan.ramp:g} s"
    return Row(scenario, measure, result, "no error, no lost frame, gaps ≤ 200 ms, ≤ 64 KiB/stream", met)


def _step_result(step: Step) -> tuple[str, bool]:
    """A step's measurements as text, and whether they meet scenario 3's targets."""
    relayed, count = step.relayed, step.count
    added = _ttfts_all(relayed).minus(_ttfts_all(step.control))
    worst_gap = max((gap for s in relayed for gap in s.gaps), default=float("nan"))
    control_gap = max((gap for s in step.control for gap in s.gaps), default=float("nan"))
    errors = sum(not s.ok for s in relayed)
    lost = sum(max(step.chunks - len(s.deltas), 0) for s in relayed)
    tokens = sum(len(s.deltas) for s in relayed)
    per_1k = step.cpu[0] / tokens * 1000 if tokens else float("nan")
    rss = (step.peak_rss - step.idle_rss) / count
    server, upstream, generator = (f"{used / step.wall:.0%}" for used in step.cpu)
    result = (
        f"added TTFT {quantiles(added)}; worst gap {ms(worst_gap)} (direct: {ms(control_gap)}); "
        f"errors {errors}; lost frames {lost}; {per_1k:.2f} CPU-s per 1k tokens (CPU: server {server}, "
        f"upstream {upstream}, load generator {generator}); {rss:.0f} KiB RSS per stream"
    )
    if errors:
        result += f" [{_failures(relayed)}]"
    return result, errors == 0 and lost == 0 and worst_gap <= 0.2 and rss <= 64


def _ttfts_all(streams: list[Stream]) -> Summary:
    """TTFT of every stream that got a first frame, failed or not (a slow start is the point here)."""
    return Summary.of([s.ttft for s in streams if s.ttft is not None])


# --- 4: database writes ------------------------------------------------------------------------

PARTIAL = "UPDATE chatbot_api_message partial"  # a batched flush of a streaming answer's text
DbConfig = tuple[int, float, float]  # chunks, seconds between them, flush interval


async def db_writes(bench: Bench) -> list[Row]:
    """Statements the server runs per answer, logged by `bench.settings` (BENCH_SQL_LOG)."""
    plan = bench.plan
    scenario = "4. Database writes per answer"
    rows: list[Row] = []
    flushes: dict[DbConfig, float] = {}
    durations: dict[DbConfig, float] = {}
    for flush in sorted({config[2] for config in plan.db_configs}, reverse=True):
        log = bench.workdir / f"sql-{flush:g}.log"
        with bench.server(BENCH_SQL_LOG=str(log), CHATBOT_FLUSH_INTERVAL=f"{flush:g}") as server:
            async with http_client() as client:
                await load.sse(client, server.url, WARM_UP)
                for chunks, interval, _ in [config for config in plan.db_configs if config[2] == flush]:
                    progress(f"db: {chunks} tokens × {interval * 1000:g} ms, flush {flush:g} s")
                    await asyncio.sleep(0.3)  # the warm-up's or the last config's writes are all in
                    seen = len(_lines(log))
                    text = message(chunks=chunks, interval=interval)
                    answers = [await load.sse(client, server.url, text) for _ in range(plan.db_answers)]
                    await asyncio.sleep(0.3)
                    writes = Counter(_lines(log)[seen:])
                    flushes[(chunks, interval, flush)] = writes[PARTIAL] / len(answers)
                    durations[(chunks, interval, flush)] = _totals(answers).p50
                    rows.append(_db_row(scenario, (chunks, interval, flush), writes, answers))
    keys = ((64, 0.02, 0.25), (256, 0.005, 0.25), (64, 0.0, 0.25))
    if all(key in flushes for key in keys):
        slow, many, instant = (flushes[key] for key in keys)
        bounded = all(flushes[key] <= durations[key] / key[2] + 1 for key in flushes)
        rows.append(Row(
            scenario, "partial-text flushes follow duration / flush interval, not tokens",
            f"64 tokens in 1.3 s: {slow:g}; 4× the tokens in the same time: {many:g}; 64 tokens at once: "
            f"{instant:g}; every answer ≤ its duration / flush interval + 1: {bounded}",
            "4× tokens → < 2× flushes; instant → ≤ 1; bounded by time",
            many < 2 * slow and instant <= 1 and bounded,
        ))  # fmt: skip
    return rows


def _db_row(scenario: str, config: DbConfig, writes: Counter[str], answers: list[Stream]) -> Row:
    (chunks, interval, flush), n = config, len(answers)
    partial, duration = writes[PARTIAL] / n, _totals(answers).p50
    detail = ", ".join(f"{kind.lower()} {count / n:g}" for kind, count in sorted(writes.items()))
    failed = sum(not s.ok for s in answers)
    return Row(
        scenario, f"{chunks} tokens × {interval * 1000:g} ms, flush every {flush:g} s",
        f"{sum(writes.values()) / n:g} writes/answer, {partial:g} of them partial-text flushes (answer lasts "
        f"{ms(duration)} = {duration / flush:.1f} flush intervals) [{detail}]"
        + (f"; {failed} failed" if failed else ""),
    )  # fmt: skip


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


# --- 5: the local model ------------------------------------------------------------------------


async def local_model(bench: Bench) -> list[Row]:
    """SmolLM2 through the server (SSE) vs the same generation in this process, alternating.

    With as many llama.cpp threads as cores (the provider's default: the target's row), then
    with one core left free, which shows what the relay's own CPU takes from the model.
    """
    cores = os.cpu_count() or 1
    rows: list[Row] = []
    for threads in (cores, cores - 1) if cores > 1 else (cores,):
        relayed, direct = await _local_pairs(bench, threads)
        through, alone = _decode_rate(relayed), _decode_rate(direct)
        counts = sorted({s.completion_tokens for s in relayed + direct})
        target, met = ("≥ 95%", through / alone >= 0.95) if threads == cores else ("", None)
        tokens = bench.plan.local_tokens
        scenario = (
            f"5. Local model ({tokens} tokens, temperature 0, {threads} of {cores} cores for llama.cpp)"
        )
        rows.append(Row(
            scenario, "tokens/s received through the server (SSE) / llama.cpp in one process",
            f"{through:.1f} / {alone:.1f} tok/s = {through / alone:.1%} (first to last token, median of "
            f"{len(relayed)}; request to done: {_overall_rate(relayed):.1f} / {_overall_rate(direct):.1f}); "
            f"answers of {counts} tokens", target, met,
        ))  # fmt: skip
        if any(not s.ok for s in relayed):
            rows.append(Row(scenario, "errors", _failures(relayed), "0", False))
    return rows


async def _local_pairs(bench: Bench, threads: int) -> tuple[list[Stream], list[Stream]]:
    plan, tokens = bench.plan, bench.plan.local_tokens
    settings = {
        "CHATBOT_PROVIDER": "local", "CHATBOT_MAX_TOKENS": str(tokens), "CHATBOT_TEMPERATURE": "0",
        "CHATBOT_LOCAL_THREADS": str(threads), "CHATBOT_LOCAL_CONTEXT": "2048",
    }  # fmt: skip
    messages = [
        {"role": "system", "content": servers.SERVER_ENV["CHATBOT_SYSTEM_PROMPT"]},
        {"role": "user", "content": LOCAL_PROMPT},
    ]
    relayed: list[Stream] = []
    direct: list[Stream] = []
    with bench.server(**settings) as server:
        async with http_client() as client:
            await load.sse(client, server.url, LOCAL_PROMPT)  # loads the model
            llama = await asyncio.to_thread(load.DirectLlama, threads=threads, context=2048)
            try:
                await asyncio.to_thread(llama.answer, messages, max_tokens=tokens)
                for pair in range(plan.local_pairs):
                    progress(f"local model, {threads} threads: pair {pair + 1}/{plan.local_pairs}")
                    relayed.append(await load.sse(client, server.url, LOCAL_PROMPT))
                    direct.append(await asyncio.to_thread(llama.answer, messages, max_tokens=tokens))
            finally:
                llama.close()
    return relayed, direct


def _decode_rate(streams: list[Stream]) -> float:
    """Text pieces a second from the first to the last, the median over answers."""
    timed = [s.deltas for s in streams if s.ok and len(s.deltas) > 1]
    return load.percentile([(len(deltas) - 1) / (deltas[-1] - deltas[0]) for deltas in timed], 50)


def _overall_rate(streams: list[Stream]) -> float:
    """Tokens a second from the request to the last event, the median over answers."""
    return load.percentile([s.completion_tokens / s.total for s in streams if s.ok and s.completion_tokens
                            and s.total], 50)  # fmt: skip


# --- 6: stop --------------------------------------------------------------------------------


async def stop(bench: Bench) -> list[Row]:
    """Stop answers mid-stream as the page does; the upstream runs in this process to share its clock."""
    plan = bench.plan
    fake = FakeOpenAI(Script(chunks=(" tok",) * 400, interval=plan.stop_interval))
    to_close: list[float] = []
    to_reply: list[float] = []
    to_done: list[float] = []
    problems: list[str] = []
    with (
        FakeOpenAIServer(fake) as upstream,
        servers.server(bench.workdir, bench.database, upstream_url=upstream.url) as server,
    ):
        client = await load.browser(server.url)
        try:
            fake.enqueue(Script(chunks=("Hi",)))
            await load.sse(client, server.url, "Warm up.")  # lazy imports and connections: not measured
            for index in range(1, plan.stops + 1):
                stream = Stream("sse")
                reader = asyncio.create_task(load.sse(client, server.url, "Tell me a long story.", stream))
                async with asyncio.timeout(30):
                    while len(stream.deltas) < 3 and not reader.done():  # noqa: ASYNC110 (polls a plain list)
                        await asyncio.sleep(0.005)
                record = await fake.wait_for_request_async(index + 1)
                asked, asked_perf = time.monotonic(), time.perf_counter()
                response = await client.post(f"/api/messages/{stream.message_id}/stop")
                to_reply.append(time.monotonic() - asked)
                await fake.wait_for_disconnect_async(index, timeout=10)
                await asyncio.wait_for(reader, 30)
                to_close.append(record.closed_at - asked)
                if stream.end is not None:
                    to_done.append(stream.end - asked_perf)
                status = response.json().get("status") if response.is_success else response.status_code
                if status != "stopped" or not record.disconnected or stream.terminal != "done":
                    problems.append(f"status {status}, upstream saw a disconnect: {record.disconnected}, "
                                    f"stream ended with {stream.terminal or stream.error}")  # fmt: skip
        finally:
            await client.aclose()
    scenario = f"6. Stop ({plan.stop_interval * 1000:g} ms between upstream chunks)"
    close = Summary.of(to_close)
    target = min(1.0, 2 * plan.stop_interval)
    rows = [
        Row(scenario, "stop request → upstream connection closed",
            f"p50 {ms(close.p50)} · max {ms(close.max)} (n={close.n}); stop reply p50 "
            f"{ms(load.percentile(to_reply, 50))}; `done` event p50 {ms(load.percentile(to_done, 50))}",
            f"≤ {ms(target)} (1 s and 2 chunk intervals)", close.max <= target),
    ]  # fmt: skip
    if problems:
        rows.append(Row(scenario, "answers not ending as stopped", "; ".join(problems[:3]), "none", False))
    return rows


# --- 7: overload -----------------------------------------------------------------------------------

OVERLOAD_OPEN_RATE = 20.0  # new streams a second while the running ones open: what a worker starts easily
OVERLOAD_RUNNING_SECONDS = 8.0  # how long the running streams last once all are open: past the burst


async def overload(bench: Bench) -> list[Row]:
    """Streams running, then a burst of new answers faster than one worker can start them.

    The worker should refuse what it cannot start soon (503 `server_busy`, Retry-After) at
    once, start the rest, and keep the running streams' gaps small.
    """
    plan = bench.plan
    running_count, burst_count, burst_seconds = plan.overload
    opening = running_count / OVERLOAD_OPEN_RATE
    chunks = int((opening + OVERLOAD_RUNNING_SECONDS) / plan.step_interval)
    running_text = message(chunks=chunks, interval=plan.step_interval)
    burst_text = message(chunks=20, interval=plan.step_interval)
    scenario = (
        f"7. Overload: {burst_count} new answers in {burst_seconds:g} s on {running_count} running streams"
    )
    async with http_client() as client:  # the control: the same burst straight to the upstream
        direct = functools.partial(load.direct, client, bench.upstream.url, burst_text)
        control = await load.ramped(direct, burst_count, burst_seconds)
    with bench.server() as server:
        async with http_client() as client:
            for _ in range(3):
                await load.sse(client, server.url, WARM_UP)
            running = asyncio.create_task(
                load.ramped(
                    functools.partial(load.sse, client, server.url, running_text), running_count, opening
                )
            )
            await asyncio.sleep(opening + 1.0)  # all open and streaming
            burst = await load.ramped(
                functools.partial(load.sse, client, server.url, burst_text), burst_count, burst_seconds
            )
            streams = await running
        server.check_alive()
    refused = [s for s in burst if s.status == 503]
    admitted = [s for s in burst if s.status == 200]
    other = [s for s in burst if s.status not in (200, 503)]
    refusal = Summary.of([s.answered - s.start for s in refused if s.answered is not None])
    baseline = Summary.of([s.answered - s.start for s in control if s.answered is not None])
    worst_gap = max((gap for s in streams for gap in s.gaps), default=float("nan"))
    running_errors = sum(not s.ok for s in streams)
    admitted_errors = sum(not s.ok for s in admitted)
    rows = [
        Row(scenario, "new answers refused (503 server_busy) → time to the refusal",
            f"{len(refused)} of {burst_count} refused: p50 {ms(refusal.p50)} · p99 {ms(refusal.p99)} (the "
            f"same burst to the upstream, to its headers: p50 {ms(baseline.p50)} · p99 {ms(baseline.p99)}); "
            f"{len(admitted)} started (TTFT {quantiles(_ttfts(admitted))}, {admitted_errors} failed); "
            f"{len(other)} other", "refusals ≤ 50 ms (p99)",
            (refusal.p99 <= 0.05 if refused else None)),
        Row(scenario, f"the {running_count} running streams during the burst",
            f"worst gap {ms(worst_gap)}; {running_errors} ended in error", "gaps ≤ 200 ms, no error",
            worst_gap <= 0.2 and running_errors == 0),
    ]  # fmt: skip
    if other or running_errors:
        rows.append(Row(scenario, "failures", _failures([*other, *streams]), "none", False))
    return rows


# --- 8: soak -------------------------------------------------------------------------------------

SOAK_TEXT = message(chunks=8, interval=0.005)
SOAK_LOG_TTL = 5  # seconds a finished answer's events stay in memory (the product's default: 600)
SOAK_TOP_SITES = 8  # with --trace: the allocation sites that grew most, reported


async def soak(bench: Bench, *, cluster: bool = False) -> list[Row]:
    """Answers of every kind, 20 at a time, and the server's RSS after each block once warm.

    A worker that keeps something per answer (a cache, a registry, a log past its TTL,
    metric label sets) grows with the answers it served; one that only fragments its heap
    levels off. The slope after the warm-up tells which. `cluster`: on PostgreSQL and the
    Redis event log (`soak-cluster`), as a scaled-out worker runs. With `--soak-minutes`
    blocks go on until that long after the warm-up; with `--trace` the server runs under
    tracemalloc, and its Python objects after each block (a snapshot) say whether what
    grows is kept by Python code, and where, or is the allocator's.
    """
    backends = {"name": "SQLite + in-memory log", "database": None, "env": {}}
    if cluster:
        found = _cluster_backends("8b. Soak, PostgreSQL + Redis")
        if isinstance(found, Row):
            return [found]
        store, database, env = found
        store.flushdb()
        backends = {"name": "PostgreSQL + Redis log", "database": database, "env": env}
    warm_up, block, _ = bench.plan.soak
    clients, trace = bench.plan.soak_clients, bench.plan.trace
    done, failed = 0, Counter[str]()
    rss: list[int] = []
    snapshots: list = []
    # 20 answers starting at once is the load here, not an overload to shed. Finished
    # answers' logs are kept for the log TTL (600 s): a short one lets them go during the
    # run, so what still grows is kept by something else.
    overrides = {
        "CHATBOT_MAX_STARTING_ANSWERS": "0",
        "CHATBOT_MAX_LOOP_LAG": "0",
        "CHATBOT_EVENT_LOG_TTL": str(SOAK_LOG_TTL),
        **backends["env"],
        **(servers.traced_env(bench.workdir) if trace else {}),
    }
    started = time.monotonic()
    with bench.server(database=backends["database"], **overrides) as server:
        sockets = [await load.WebSocketChat.open(server.url) for _ in range(clients)]
        async with http_client() as client:
            kinds = [
                lambda n, client_index: load.sse(client, server.url, SOAK_TEXT, token=servers.API_TOKEN),
                lambda n, client_index: load.sse(client, server.url, SOAK_TEXT),
                lambda n, client_index: load.ndjson(client, server.url, SOAK_TEXT),
                lambda n, client_index: load.json_answer(client, server.url, SOAK_TEXT),
                lambda n, client_index: sockets[client_index].chat(SOAK_TEXT),
                lambda n, client_index: load.sse(
                    client, server.url, SOAK_TEXT, leave_after=2
                ),  # a tab closed
            ]
            warm_at: list[float] = []  # when the first block was measured
            counter = _soak_answers(bench.plan, warm_at)
            lock = asyncio.Lock()  # one block's measurement at a time

            async def one_client(index: int) -> None:  # its own WebSocket: one reader per socket
                nonlocal done
                for n in counter:
                    stream = await kinds[n % len(kinds)](n, index)
                    if stream.error or stream.terminal == "error":
                        failed[(stream.error or stream.terminal)[:80]] += 1
                    done += 1
                    if done >= warm_up and (done - warm_up) % block == 0:
                        async with lock:
                            await asyncio.sleep(0)  # the block's last answers may still be ending
                            warm_at[:] = warm_at or [time.monotonic()]
                            rss.append(server.rss_kib())
                            if trace:  # the other clients wait meanwhile: a snapshot takes seconds
                                snapshots.append(
                                    servers.tracemalloc_snapshot(server.pid, bench.workdir, len(snapshots))
                                )
                            progress(f"soak: {done} answers, RSS {rss[-1] / 1024:.1f} MiB")

            await asyncio.gather(*(one_client(index) for index in range(clients)))
        for socket in sockets:
            await socket.close()
        server.check_alive()
    scenario = (
        f"8{'b' if cluster else ''}. Soak ({backends['name']}): {done} answers in "
        f"{(time.monotonic() - started) / 60:.0f} min, {clients} in flight, 6 kinds, "
        f"log TTL {SOAK_LOG_TTL} s{', under tracemalloc' if trace else ''}"
    )
    return _soak_rows(scenario, bench.plan, rss, snapshots, failed)


def _soak_answers(plan: Plan, warm_at: list[float]) -> Iterator[int]:
    """The answers' numbers: `soak`'s count, or until `soak_minutes` after the warm-up."""
    warm_up, block, blocks = plan.soak
    for n in itertools.count():
        if plan.soak_minutes is None and n >= warm_up + block * blocks:
            return
        if (
            plan.soak_minutes is not None
            and warm_at
            and time.monotonic() - warm_at[0] > plan.soak_minutes * 60
        ):
            return
        yield n


def _soak_rows(scenario: str, plan: Plan, rss: list[int], snapshots: list, failed: Counter[str]) -> list[Row]:
    warm_up, block, _ = plan.soak
    per_block = [b - a for a, b in zip(rss, rss[1:], strict=False)]
    slope = statistics.median(per_block) * 1000 / block if per_block else float("nan")
    series = " → ".join(f"{kib / 1024:.1f}" for kib in rss)
    rows = [
        Row(scenario, f"server RSS after each {block} answers once warm ({warm_up} answers), MiB",
            f"{series}; median growth {slope:.0f} KiB per 1000 answers; {sum(failed.values())} failed",
            "flat within noise", None),
    ]  # fmt: skip
    if len(snapshots) > 1:
        rows += _soak_traced(scenario, snapshots, block)
    if failed:
        rows.append(
            Row(scenario, "failures", "; ".join(f"{c}× {e}" for e, c in failed.most_common(3)), "none")
        )
    return rows


def _soak_traced(scenario: str, snapshots: list, block: int) -> list[Row]:
    """Python objects after each block, and the sites that grew most from the first to the last."""
    traced = [sum(stat.size for stat in snapshot.statistics("filename")) for snapshot in snapshots]
    per_block = [b - a for a, b in zip(traced, traced[1:], strict=False)]
    slope = statistics.median(per_block) * 1000 / block / 1024
    answers = block * (len(snapshots) - 1)
    grown = [stat for stat in snapshots[-1].compare_to(snapshots[0], "lineno") if stat.size_diff > 0][
        :SOAK_TOP_SITES
    ]
    sites = "; ".join(
        f"{_short_path(stat.traceback[0].filename)}:{stat.traceback[0].lineno} "
        f"{stat.size_diff * 1000 / answers / 1024:+.1f} KiB ({stat.count_diff * 1000 / answers:+.0f} objects)"
        for stat in grown
    )
    series = " → ".join(f"{size / 1024 / 1024:.2f}" for size in traced)
    return [
        Row(scenario, f"Python objects (tracemalloc) after each {block} answers, MiB",
            f"{series}; median growth {slope:.1f} KiB per 1000 answers", "flat within noise", None),
        Row(scenario, f"sites grown most over the last {answers} answers, per 1000 answers", sites or "none"),
    ]  # fmt: skip


def _short_path(filename: str) -> str:
    for marker in ("site-packages/", "/python3.11/", str(servers.ROOT) + "/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


# --- the run -------------------------------------------------------------------------------------


RUNNERS: dict[str, Callable[[Bench], Awaitable[list[Row]]]] = {
    "latency": latency, "scale": scale, "db": db_writes, "local": local_model, "stop": stop,
    "overload": overload, "soak": soak, "workers": workers,
    "soak-cluster": functools.partial(soak, cluster=True),
}  # fmt: skip


async def run_all(plan: Plan, names: list[str], workdir: Path) -> tuple[list[Row], bool]:
    rows: list[Row] = []
    failed = False
    database = servers.Database(workdir)
    with servers.upstream(workdir) as upstream:
        bench = Bench(plan, workdir, database, upstream)
        for name in names:
            progress(f"{name} ...")
            started = time.monotonic()
            try:
                rows += await RUNNERS[name](bench)
            except Exception as error:  # report it in the table and go on with the next scenario
                failed = True
                message_ = f"{error.__class__.__name__}: {error}"[:2000]
                rows.append(Row(name, "scenario failed", message_, met=False))
            progress(f"{name} done in {time.monotonic() - started:.0f} s")
    return rows, failed


def render(rows: list[Row], *, command: str, plan: Plan, started: str, load_before: str, code: str) -> str:
    info = servers.machine()
    mark = {True: "met", False: "**missed**", None: ""}
    lines = [
        "# Benchmark results",
        "",
        f"- Command: `{command}`",
        f"- Date: {started} UTC; {plan.runs} run(s); load average (1/5/15 min) before: {load_before}, "
        f"after: {servers.load_average()}",
        f"- Code: {code}",
        f"- Machine: {info['cpu']}, {info['ram']} RAM, {info['os']}",
        f"- Versions: Python {info['python']}, {info['versions']}",
        "- One uvicorn worker; the fake upstream and this load generator are separate processes sharing "
        'the same cores. "Added" = a quantile through our server minus the same quantile straight to the '
        "upstream, both measured in this run.",
        "",
        "| Scenario | Measure | Result | Target | Status |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        cells = (row.scenario, row.measure, row.result, row.target, mark[row.met])
        lines.append("| " + " | ".join(cell.replace("|", "\\|").replace("\n", " ") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def _counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of counts: {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"counts must be positive: {text!r}")
    return counts


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 run, no local model (smoke test)")
    parser.add_argument("--scenario", action="append", choices=SCENARIOS, help="only these (repeatable)")
    parser.add_argument("--runs", type=int, help="repetitions of each measurement (default 3, --quick 1)")
    parser.add_argument("--output", type=Path, default=RESULTS, help="where to write the table (%(default)s)")
    parser.add_argument("--keep", action="store_true", help="keep the servers' logs and databases")
    parser.add_argument(
        "--steps",
        type=_counts,
        help="scale: these concurrent-stream counts, e.g. 100,250 (default 50 … 1000)",
    )
    parser.add_argument(
        "--ramp", type=float, help="scale, workers: seconds over which a step's streams open (default 20)"
    )
    parser.add_argument("--soak-minutes", type=float, help="soak: go on this long after the warm-up")
    parser.add_argument("--soak-clients", type=int, help=f"soak: answers in flight (default {SOAK_CLIENTS})")
    parser.add_argument(
        "--trace", action="store_true", help="soak: the server under tracemalloc, a snapshot per block"
    )
    args = parser.parse_args(argv)
    plan = Plan.quick(args.runs or 1) if args.quick else Plan.full(args.runs or 3)
    if args.steps:
        plan = dataclasses.replace(plan, steps=args.steps)
    if args.ramp:
        plan = dataclasses.replace(plan, ramp=args.ramp)
    plan = dataclasses.replace(
        plan,
        soak_minutes=args.soak_minutes,
        soak_clients=args.soak_clients or SOAK_CLIENTS,
        trace=args.trace,
    )
    names = args.scenario or [
        name for name in SCENARIOS if name not in OPT_IN and not (args.quick and name == "local")
    ]

    servers.raise_fd_limit()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: kill the children
    python = sys.executable
    if python.startswith(str(servers.ROOT)):
        python = os.path.relpath(python, servers.ROOT)
    command = " ".join([python, "-m", "bench.run", *argv])
    started, load_before = datetime.now(UTC).strftime("%Y-%m-%d %H:%M"), servers.load_average()
    code = servers.code_version()  # at the start: the servers import the tree as it is then
    workdir = Path(tempfile.mkdtemp(prefix="bench-"))
    failed = True
    try:
        rows, failed = _event_loop_run(run_all(plan, names, workdir))
    finally:
        if failed or args.keep:
            progress(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    table = render(rows, command=command, plan=plan, started=started, load_before=load_before, code=code)
    print(table)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(table)
    return 1 if failed else 0


def _event_loop_run(coroutine):
    """uvloop when installed (as uvicorn uses): a cheaper loop leaves more CPU to the server."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coroutine)


if __name__ == "__main__":
    sys.exit(main())
