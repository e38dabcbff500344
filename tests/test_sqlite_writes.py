"""The SQLite backend's write lock: this process's writers take turns without SQLite's polling.

Real threads, each with its own connection to the test database file, as request
threads and the generations' database thread have.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from django.db import connection, connections, transaction

from chatbot_api.models import Conversation
from chatbot_api.sqlite3.base import WRITE_LOCK

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
