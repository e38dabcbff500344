"""The SQLite backend: writers take turns without polling; closed connections serve the next thread.

Real threads, each with its own connection to the test database file, as request
threads and the generations' database thread have.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from django.db import connection, connections, transaction

from chatbot_api.models import Conversation
from chatbot_api.sqlite3 import base as base_module
from chatbot_api.sqlite3.base import WRITE_LOCK, DatabaseWrapper

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(connection.vendor != "sqlite", reason="the SQLite backend's own lock"),
]


def in_thread(function):
    """Run `function` on a new thread with its own connection, closed afterwards."""

    def run():
        try:
            return function()
        finally:
            connections.close_all()

    with ThreadPoolExecutor(max_workers=1) as executor:
        return executor.submit(run).result(timeout=30)


def test_concurrent_writers_all_commit_and_the_lock_is_free_afterwards():
    def write(index: int) -> None:
        try:
            with transaction.atomic():
                Conversation.objects.create(title=f"t{index}")
                time.sleep(0.005)  # a transaction that takes a moment, as a turn does
        finally:
            connections.close_all()

    with ThreadPoolExecutor(max_workers=8) as executor:
        list(executor.map(write, range(40)))
    assert Conversation.objects.count() == 40
    assert not WRITE_LOCK.locked()


def test_a_failed_transaction_and_a_closed_connection_give_the_lock_back():
    def failing() -> None:
        with transaction.atomic():
            Conversation.objects.create(title="rolled back")
            raise ValueError("boom")

    with pytest.raises(ValueError):
        in_thread(failing)
    assert not WRITE_LOCK.locked()

    def closed_mid_transaction() -> None:
        with transaction.atomic():
            Conversation.objects.create(title="lost with its connection")
            connection.close()  # a broken connection, thrown away inside the block

    in_thread(closed_mid_transaction)
    assert not WRITE_LOCK.locked()
    assert not Conversation.objects.exists()


def test_a_writer_that_waited_the_busy_timeout_goes_on_without_the_lock(settings):
    options = connection.settings_dict["OPTIONS"]
    busy_timeout = options["timeout"]
    options["timeout"] = 0.2  # the lock waits as long as SQLite's busy timeout
    held = threading.Event()
    WRITE_LOCK.acquire()  # a writer of this process that never lets go
    try:
        started = time.monotonic()

        def write() -> float:
            with transaction.atomic():
                Conversation.objects.create(title="written anyway")
            held.set()
            return time.monotonic() - started

        waited = in_thread(write)
    finally:
        WRITE_LOCK.release()
        options["timeout"] = busy_timeout
    assert held.is_set() and 0.2 <= waited < 5
    assert Conversation.objects.filter(title="written anyway").exists()


# --- Idle connections kept for the next thread (a database file; the suite's own is in memory) ---


@pytest.fixture
def file_database(tmp_path):
    """Open a connection to a real SQLite file through the project's backend, on a thread of its own."""
    settings_dict = {**connection.settings_dict, "NAME": str(tmp_path / "pool.sqlite3")}

    def open_one():
        wrapper = DatabaseWrapper(settings_dict, alias="pooled")
        wrapper.ensure_connection()
        return wrapper

    yield settings_dict, open_one
    with base_module._idle_lock:
        kept = [
            each
            for key, idle in base_module._idle.items()
            if key[0] == settings_dict["NAME"]
            for each in idle
        ]
        base_module._idle = {k: v for k, v in base_module._idle.items() if k[0] != settings_dict["NAME"]}
    for each in kept:
        each.close()


def on_a_thread(function):
    with ThreadPoolExecutor(max_workers=1) as executor:
        return executor.submit(function).result(timeout=30)


def test_a_closed_connection_to_a_file_serves_the_next_thread_and_works(file_database):
    _, open_one = file_database

    def write_and_close(title: str):
        wrapper = open_one()
        with wrapper.cursor() as cursor:
            cursor.execute("CREATE TABLE IF NOT EXISTS t (title TEXT)")
            cursor.execute("INSERT INTO t VALUES (%s)", [title])
            raw = wrapper.connection
            cursor.execute("SELECT group_concat(title) FROM t")
            titles = cursor.fetchone()[0]
        wrapper.close()
        return raw, titles

    first, _ = on_a_thread(lambda: write_and_close("a"))
    second, titles = on_a_thread(lambda: write_and_close("b"))
    assert second is first, "the second thread got the first one's connection"
    assert titles == "a,b"


def test_a_connection_closed_in_a_transaction_or_past_the_limit_is_really_closed(file_database):
    _, open_one = file_database

    def close_in_a_transaction():
        wrapper = open_one()
        raw = wrapper.connection
        raw.execute("BEGIN")
        wrapper.close()
        return raw

    closed = on_a_thread(close_in_a_transaction)
    with pytest.raises(sqlite3.ProgrammingError):  # closed, not kept
        closed.execute("SELECT 1")

    def open_many():
        wrappers = [open_one() for _ in range(base_module.IDLE_CONNECTIONS + 4)]
        raws = [w.connection for w in wrappers]
        for wrapper in wrappers:
            wrapper.close()
        return raws

    raws = on_a_thread(open_many)
    kept = sum(1 for raw in raws if _is_open(raw))
    assert kept == base_module.IDLE_CONNECTIONS


def test_a_database_file_created_again_does_not_get_the_old_files_connections(file_database):
    settings_dict, open_one = file_database

    def open_and_close():
        wrapper = open_one()
        raw = wrapper.connection
        wrapper.close()
        return raw

    old = on_a_thread(open_and_close)
    for suffix in ("", "-wal", "-shm"):
        Path(settings_dict["NAME"] + suffix).unlink(missing_ok=True)
    Path(settings_dict["NAME"]).touch()  # a new file at the same path
    new = on_a_thread(open_and_close)
    assert new is not old and not _is_open(old)


def _is_open(raw) -> bool:
    try:
        raw.execute("SELECT 1")
    except sqlite3.ProgrammingError:
        return False
    return True
