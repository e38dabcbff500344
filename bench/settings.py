"""Django settings of the server under benchmark: the product's, with three bench-only changes.

1. No `.env`: every value comes from the environment `bench.servers` builds, so a
   developer's `.env` cannot change the numbers (or break the smoke test).
2. Plain static storage: the chat page (fetched only for its cookies) renders without
   `collectstatic`. The API and the streaming path do not touch static files.
3. With `BENCH_SQL_LOG=<file>`, every INSERT/UPDATE/DELETE is appended to that file as
   `<verb> <table> [partial|heartbeat]` (once per row of an `executemany`), to count
   database writes per answer (`partial` marks the batched flush of a streaming message's
   text, `heartbeat` the liveness update).
"""

import os
import re
import threading

import dotenv

dotenv.load_dotenv = lambda *args, **kwargs: False  # before chatbot.settings imports it: no .env

from chatbot.settings import *  # noqa: E402,F403
from chatbot.settings import STORAGES  # noqa: E402

STORAGES = {**STORAGES, "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"}}

_WRITE = re.compile(r'^\s*(INSERT INTO|UPDATE|DELETE FROM)\s+"?(\w+)"?', re.IGNORECASE)


def _kind(verb: str, sql: str) -> str:
    """Which of the generation's message updates this is: a partial-text flush or a heartbeat."""
    if verb != "UPDATE" or '"status" IN' not in sql:
        return ""
    return " partial" if '"content"' in sql else " heartbeat" if '"worker"' in sql else ""


def _install_write_log(path: str) -> None:
    from django.db.backends.signals import connection_created

    lock = threading.Lock()

    def log_writes(execute, sql, params, many, context):
        match = _WRITE.match(sql)
        if match:
            verb, table = match.group(1).split()[0].upper(), match.group(2)
            rows = len(params) if many else 1  # the batched flush is one executemany for every answer
            with lock, open(path, "a") as log:
                log.write(f"{verb} {table}{_kind(verb, sql)}\n" * rows)
        return execute(sql, params, many, context)

    def on_connection(sender, connection, **kwargs):
        if log_writes not in connection.execute_wrappers:
            connection.execute_wrappers.append(log_writes)

    connection_created.connect(on_connection, weak=False)


if os.environ.get("BENCH_SQL_LOG"):
    _install_write_log(os.environ["BENCH_SQL_LOG"])
