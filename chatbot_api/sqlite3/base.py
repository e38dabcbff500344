"""Django's SQLite backend, whose write transactions queue on a lock in the process.

SQLite lets one writer in at a time. A second `BEGIN IMMEDIATE` waits in SQLite's busy
handler, which sleeps and retries (1, 2, 5 ... up to 100 ms between tries), so under a
burst of started answers the waiting request threads wake late, one sleep after the
writer ahead of them finished. Queued on a lock here instead, each is woken the moment
the one before it commits. The lock only orders this process's writers: SQLite still
decides (another process's writer waits in its busy handler as before), and a writer
that waited the whole busy timeout for the lock goes on without it and lets SQLite
answer, so a stuck transaction is the error it always was, never a hang.
"""

from __future__ import annotations

import threading

from django.db.backends.sqlite3 import base

# One per process: every connection to every SQLite file shares it (a site has one).
WRITE_LOCK = threading.Lock()


class DatabaseWrapper(base.DatabaseWrapper):
    holds_write_lock = False

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
            return super()._close()
        finally:
            self._release_write_lock()

    def _release_write_lock(self) -> None:
        if self.holds_write_lock:
            self.holds_write_lock = False
            WRITE_LOCK.release()
