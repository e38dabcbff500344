"""The processes a benchmark runs: the fake upstream and the product under uvicorn, on 127.0.0.1.

Each is a context manager that kills its process on exit, whatever happened, so a failed
or interrupted run leaves nothing listening. The server's environment is built here in
full (no `.env`, see `bench.settings`), and its CPU time and memory are read from /proc.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# The server's settings; values a scenario changes are passed as overrides. Numbers and
# booleans set to "" mean "the product's default" (see chatbot/settings.py).
SERVER_ENV = {
    "DJANGO_SETTINGS_MODULE": "bench.settings",
    "DJANGO_SECRET_KEY": "benchmark-only-not-secret",
    "DJANGO_DEBUG": "false",
    "DJANGO_ALLOWED_HOSTS": "127.0.0.1,localhost",
    "DJANGO_LOG_LEVEL": "WARNING",
    "REDIS_URL": "",
    "CHATBOT_EVENT_LOG": "memory",  # one worker, its events in its own memory
    "CHATBOT_PROVIDER": "openai",
    "CHATBOT_MODEL": "",
    "OPENAI_API_KEY": "sk-benchmark",
    "OPENAI_MAX_RETRIES": "",
    "CHATBOT_SYSTEM_PROMPT": "You are a helpful assistant.",
    "CHATBOT_LOCAL_MODEL_PATH": "",
    "CHATBOT_FLUSH_INTERVAL": "",
    "CHATBOT_CANCEL_ON_DISCONNECT": "",
    "CHATBOT_HISTORY_TOKENS": "",
    # Every benchmark client comes from 127.0.0.1: the per-IP limits would refuse all but 3 streams.
    "CHATBOT_REQUESTS_PER_MINUTE": "0",
    "CHATBOT_CONCURRENT_STREAMS": "0",
    "CHATBOT_TOKENS_PER_DAY": "0",
    "CHATBOT_MAX_STARTING_ANSWERS": "",  # the product's load shedding, as deployed
    "PYTHONUNBUFFERED": "1",
}


def raise_fd_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit, inherited by every child: 1000 streams need 2000+ sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Process:
    """A child process and where its output went."""

    name: str
    popen: subprocess.Popen
    log: Path
    url: str = ""

    @property
    def pid(self) -> int:
        return self.popen.pid

    def pids(self) -> list[int]:
        """This process and its descendants (uvicorn's workers with `--workers`)."""
        found, queue = [], [self.pid]
        while queue:
            pid = queue.pop()
            found.append(pid)
            with contextlib.suppress(OSError):
                for task in Path(f"/proc/{pid}/task").iterdir():
                    queue += [int(child) for child in (task / "children").read_text().split()]
        return found

    def cpu_seconds(self) -> float:
        """User + system CPU time so far (all threads, all descendants alive), from /proc/PID/stat."""
        total = 0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
        return total / CLOCK_TICKS

    def rss_kib(self) -> int:
        """Resident memory of this process and its descendants."""
        total = 0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        if not total:
            raise RuntimeError(f"no VmRSS for {self.name}")
        return total

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            code = self.popen.returncode
            raise RuntimeError(f"{self.name} exited with {code}; see {self.log}:\n{self.tail()}")

    def tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""


@contextlib.contextmanager
def _spawn(
    name: str, argv: list[str], *, env: dict[str, str], log: Path, root: Path = ROOT
) -> Iterator[Process]:
    with open(log, "wb") as output:
        popen = subprocess.Popen(argv, cwd=root, env=env, stdout=output, stderr=subprocess.STDOUT)
    try:
        yield Process(name, popen, log)
    finally:
        _stop(popen)


def _stop(popen: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after a few seconds: a benchmark never leaves a process behind."""
    if popen.poll() is None:
        popen.send_signal(signal.SIGTERM)
        try:
            popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait(timeout=5)


def _wait_for(process: Process, ready, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        process.check_alive()
        if time.monotonic() > deadline:
            raise RuntimeError(f"{process.name} not up in {timeout:.0f}s, {process.log}:\n{process.tail()}")
        time.sleep(0.05)


def base_env(root: Path = ROOT) -> dict[str, str]:
    """This process's environment minus Django's settings module (pytest sets one)."""
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    env["PYTHONPATH"] = str(root)
    return env


@contextlib.contextmanager
def upstream(workdir: Path, *, chunks: int = 64, interval: float = 0.02) -> Iterator[Process]:
    """`bench.upstream` in its own process; `.url` is its OpenAI base URL (`.../v1`)."""
    argv = [PYTHON, "-m", "bench.upstream", "--port=0", "--chunks", str(chunks), "--interval", str(interval)]
    with _spawn("fake upstream", argv, env=base_env(), log=workdir / "upstream.log") as process:

        def ready() -> bool:
            for line in process.log.read_text(errors="replace").splitlines():
                if line.startswith("fake-openai ready "):
                    process.url = line.split()[-1]
                    return True
            return False

        _wait_for(process, ready, timeout=20)
        yield process


API_TOKEN = "bench-api-token-0123456789abcdef01234567"  # Token.key holds 40 characters


def _create_api_user(env: dict[str, str], root: Path) -> None:
    """A user with an API token (`API_TOKEN`): the way a program is meant to call the API."""
    api_user = (
        "from django.contrib.auth.models import User; from rest_framework.authtoken.models import Token; "
        f"Token.objects.get_or_create(key={API_TOKEN!r}, "
        "user=User.objects.get_or_create(username='bench')[0])"
    )
    subprocess.run([PYTHON, "manage.py", "shell", "-c", api_user], cwd=root, env=env, check=True, timeout=120)


@dataclass
class Database:
    """A migrated SQLite file, copied for every server so each starts from the same state.

    Migrated by the source tree `root` runs (`bench.ab` gives each tree its own, since
    two revisions may not share a schema).
    """

    workdir: Path
    root: Path = ROOT
    template: Path = field(init=False)
    copies: int = 0

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.template = self.workdir / "template.sqlite3"
        env = {**base_env(self.root), **SERVER_ENV, "DATABASE_URL": f"sqlite:///{self.template}"}
        migrate = [PYTHON, "manage.py", "migrate", "--noinput", "-v", "0"]
        subprocess.run(migrate, cwd=self.root, env=env, check=True, timeout=120)
        _create_api_user(env, self.root)

    def fresh(self) -> str:
        self.copies += 1
        path = self.workdir / f"db{self.copies}.sqlite3"
        shutil.copyfile(self.template, path)
        return f"sqlite:///{path}"


@dataclass
class PostgresDatabase:
    """A PostgreSQL database for scale-out runs, created and migrated once, shared by servers."""

    url: str

    def __post_init__(self) -> None:
        import psycopg

        base, _, name = self.url.rpartition("/")
        with psycopg.connect(
            base.replace("postgres://", "postgresql://") + "/postgres", autocommit=True
        ) as admin:
            if not admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone():
                admin.execute(f'CREATE DATABASE "{name}"')
        env = {**base_env(), **SERVER_ENV, "DATABASE_URL": self.url}
        subprocess.run(
            [PYTHON, "manage.py", "migrate", "--noinput", "-v", "0"], cwd=ROOT, env=env, check=True
        )
        _create_api_user(env, ROOT)

    def fresh(self) -> str:
        return self.url


@contextlib.contextmanager
def server(
    workdir: Path,
    database: Database | PostgresDatabase,
    *,
    upstream_url: str = "",
    root: Path = ROOT,
    workers: int = 1,
    **overrides: str,
) -> Iterator[Process]:
    """The product, `uvicorn chatbot.asgi:application`; `.url` is its origin.

    `root` is the source tree it runs (`bench.ab` runs two trees side by side).
    """
    port = free_port()
    env = {**base_env(root), **SERVER_ENV, "OPENAI_BASE_URL": upstream_url, "DATABASE_URL": database.fresh()}
    env.update(overrides)
    argv = [
        PYTHON,
        "-m",
        "uvicorn",
        "chatbot.asgi:application",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--lifespan",
        "on",
        "--no-access-log",
        "--log-level",
        "warning",
        "--backlog",
        "4096",
        *(["--workers", str(workers)] if workers > 1 else []),
    ]
    log = workdir / f"server-{port}.log"
    with _spawn("server", argv, env=env, log=log, root=root) as process:
        process.url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            try:
                return httpx.get(process.url + "/login/", timeout=2).status_code < 500
            except httpx.TransportError:
                return False

        _wait_for(process, ready, timeout=60)
        yield process


TRACEMALLOC_SITE = ROOT / "bench" / "tracemalloc_site"


def traced_env(directory: Path) -> dict[str, str]:
    """Server overrides that run it under tracemalloc, its snapshots written to `directory`."""
    return {"PYTHONPATH": f"{TRACEMALLOC_SITE}{os.pathsep}{ROOT}", "BENCH_TRACEMALLOC": str(directory)}


def tracemalloc_snapshot(pid: int, directory: Path, index: int, timeout: float = 120):
    """Ask a server started with `traced_env` for a snapshot (SIGUSR1) and load it."""
    os.kill(pid, signal.SIGUSR1)
    path = directory / f"snapshot-{pid}-{index}.pickle"
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"no tracemalloc snapshot from {pid} in {timeout:.0f} s")
        time.sleep(0.1)
    with path.open("rb") as file:
        return pickle.load(file)


def machine() -> dict[str, str]:
    """CPU model, cores, RAM, load and the versions that shape the numbers."""
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ram_kib = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_kib = int(line.split()[1])

    def version(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "not installed"

    versions = ", ".join(
        f"{name} {version(package)}"
        for name, package in (
            ("django", "django"),
            ("uvicorn", "uvicorn"),
            ("uvloop", "uvloop"),
            ("httptools", "httptools"),
            ("openai", "openai"),
            ("llama-cpp-python", "llama_cpp_python"),
            ("httpx", "httpx"),
            ("websockets", "websockets"),
        )
    )
    return {
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "ram": f"{ram_kib / 1024 / 1024:.1f} GiB",
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "versions": versions,
    }


def code_version() -> str:
    """The commit the servers ran, and whether tracked files differed from it (read-only git)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
        ).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    files = [line[3:] for line in changed if line.strip()]
    return f"commit {commit}" + (f" with uncommitted changes to {', '.join(files)}" if files else "")


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())
