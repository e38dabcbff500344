"""Django's SQLite backend, whose write transactions queue on a lock in the process.

SQLite lets one writer in at a time. A second `BEGIN IMMEDIATE` waits in SQLite's busy
handler, which sleeps and retries (1, 2, 5 ... up to 100 ms between tries), so under a
burst of started answers the waiting request threads wake late, one sleep after the
writer ahead of them finished. Queued on a lock here instead, each is woken the moment
the one before it commits. The lock only orders this process's writers: SQLite still
decides (another process's writer waits in its busy handler as before), and a writer
that waited the whole busy timeout for the lock goes on without it and lets SQLite
answer, so a stuck transaction is the error it always was, never a hang.

Closed connections to a database file are kept for the next thread that connects.
Django gives every request a thread of its own, and so a connection of its own, which
it opens (the file, ~30 SQL functions registered, the PRAGMAs) and closes again per
request: ~5% of a started answer's CPU (docs/benchmarks.md). Only a connection with no
transaction open is kept, at most `IDLE_CONNECTIONS` of them; Django resets its
autocommit state when it takes one again, as it does for a new connection.
"""

from __future__ import annotations

import os
import threading

from django.db.backends.sqlite3 import base

# One per process: every connection to every SQLite file shares it (a site has one).
WRITE_LOCK = threading.Lock()

IDLE_CONNECTIONS = 16  # per database file; an idle one costs a file descriptor and its page cache
_idle: dict[tuple[str, int, int], list] = {}  # (file name, device, inode) -> connections
_idle_lock = threading.Lock()
# A forked child must never use its parent's connections (SQLite's rule): it starts without any.
os.register_at_fork(after_in_child=_idle.clear)


class DatabaseWrapper(base.DatabaseWrapper):
    holds_write_lock = False

    def get_new_connection(self, conn_params):
        key = self._idle_key()
        if key is not None:
            with _idle_lock:
                stale = [other for other in _idle if other[0] == key[0] and other != key]
                stale_connections = [each for other in stale for each in _idle.pop(other)]
                idle = _idle.get(key)
                reused = idle.pop() if idle else None
            for each in stale_connections:  # the file they opened is gone
                each.close()
            if reused is not None:
                return reused
        return super().get_new_connection(conn_params)

    def _start_transaction_under_autocommit(self):
        if self.transaction_mode in ("IMMEDIATE", "EXCLUSIVE"):  # a deferred BEGIN takes no lock yet
            timeout = self.settings_dict["OPTIONS"].get("timeout", 5)
            self.holds_write_lock = WRITE_LOCK.acquire(timeout=timeout)
        try:
            super()._start_transaction_under_autocommit()
        except BaseException:
            self._release_write_lock()
            raise

    def _commit(self):
        try:
            return super()._commit()
        finally:
            self._release_write_lock()

    def _rollback(self):
        try:
            return super()._rollback()
        finally:
            self._release_write_lock()

    def _close(self):
        try:
            if self._keep_idle():
                return None
            return super()._close()
        finally:
            self._release_write_lock()

    def _keep_idle(self) -> bool:
        """Keep the closing connection for the next thread, if it is clean and there is room."""
        connection, key = self.connection, self._idle_key()
        if connection is None or key is None or self.in_atomic_block or connection.in_transaction:
            return False
        with _idle_lock:
            idle = _idle.setdefault(key, [])
            if len(idle) >= IDLE_CONNECTIONS:
                return False
            idle.append(connection)
        return True

    def _idle_key(self) -> tuple[str, int, int] | None:
        """The file's name and identity: a file deleted and created again (a test database)
        must not get the old one's connections. None for an in-memory database, which lives
        and dies with its connections (Django never closes them)."""
        if self.is_in_memory_db():
            return None
        name = str(self.settings_dict["NAME"])
        try:
            stat = os.stat(name)
        except OSError:
            return None
        return name, stat.st_dev, stat.st_ino

    def _release_write_lock(self) -> None:
        if self.holds_write_lock:
            self.holds_write_lock = False
            WRITE_LOCK.release()
