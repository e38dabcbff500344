"""Everything the generations write to the database.

One thread with its own connection does every write (batched partial-text flushes,
outcomes, heartbeats, the sweep's claims), so generations never queue behind request
threads. (Slots go back through `limits.give_back`, on another thread, so a slow Redis
never holds these writes up.)
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import TYPE_CHECKING
from uuid import UUID

from django.db import connections, transaction
from django.utils import timezone

from ..conf import chatbot_setting
from ..models import Message, UsageRecord
from ..rows import insert_sql
from .outcome import Outcome
from .tasks import detached_task

if TYPE_CHECKING:
    from .generation import Generation

logger = logging.getLogger("chatbot.generation")

Status = Message.Status


class DatabaseThread:
    """One thread, with its own connection, for every write the generations make.

    The writes are few (batched flushes, outcomes, heartbeats) and must never wait
    behind a request's thread or deadlock with it, so they do not share asgiref's
    thread-sensitive executor; one thread also keeps SQLite writers in a single file.
    """

    def __init__(self):
        self._executor: ThreadPoolExecutor | None = None

    async def run(self, function, /, *args):
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chatbot-db")
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, _in_connection, function, *args
        )

    def close(self) -> None:
        if self._executor is not None:
            self._executor.submit(connections.close_all)
            self._executor.shutdown(wait=False)
            self._executor = None


def _in_connection(function, *args):
    # The thread keeps its connection between calls, whatever CONN_MAX_AGE says (that setting
    # is for request threads): connecting cost more than the write itself, and closing SQLite's
    # last connection checkpoints and deletes the WAL, so every request paid that again.
    # A connection that failed is replaced before the next call.
    for connection in connections.all(initialized_only=True):
        if connection.errors_occurred:
            if connection.is_usable():
                connection.errors_occurred = False
            else:
                connection.close()
    return function(*args)


class AnswerStore:
    """Saves what generations produce: partial text in batches, outcomes once."""

    def __init__(self):
        self.db = DatabaseThread()
        # Generations with text not yet in the database, written together every flush interval.
        self._dirty: dict[UUID, Generation] = {}
        self._flusher: asyncio.Task | None = None
        # Counts batch writes, for the "writes per answer" benchmark and tests.
        self.flush_count = 0

    def mark_dirty(self, generation: Generation) -> None:
        self._dirty[generation.message_id] = generation
        flusher = self._flusher
        if flusher is None or flusher.done():
            self._flusher = detached_task(self._flush_soon(), name="generation-flush")

    def forget_dirty(self, generation: Generation) -> None:
        self._dirty.pop(generation.message_id, None)

    async def _flush_soon(self) -> None:
        """Wait one flush interval, then write every dirty partial answer in one transaction."""
        await asyncio.sleep(chatbot_setting("FLUSH_INTERVAL"))
        batch = {message_id: generation.text for message_id, generation in self._dirty.items()}
        self._dirty.clear()
        if batch:
            try:
                await self.db.run(_write_partials, batch)
                self.flush_count += 1
            except Exception:  # the database hiccuped: the next flush or the final save will catch up
                logger.warning("flushing %d partial answer(s) failed", len(batch), exc_info=True)

    async def save_outcome(self, message_id: UUID, fields: dict, record: UsageRecord) -> bool:
        """Write an answer's outcome and usage; retried briefly. False (and an ERROR) if it failed.

        When the full row cannot be written, the answer is at least marked failed, so it
        is never left `pending` for the sweep to empty.
        """
        for attempt in range(3):
            try:
                await self.db.run(_save_outcome, message_id, fields, record)
                return True
            except Exception:
                logger.warning(
                    "saving message %s failed (attempt %d)", message_id, attempt + 1, exc_info=True
                )
                await asyncio.sleep(0.2 * (attempt + 1))
        logger.error(
            "saving message %s failed; its outcome (%s, %d characters) is lost",
            message_id,
            fields.get("status"),
            len(fields.get("content", "")),
        )
        try:
            await self.db.run(_mark_save_failed, message_id, fields)
        except Exception:
            logger.error("marking message %s as failed did not work either", message_id, exc_info=True)
        return False

    async def close(self) -> None:
        flusher, self._flusher = self._flusher, None
        if flusher is not None:
            flusher.cancel()
        self.db.close()


def _write_partials(batch: dict[UUID, str]) -> None:
    """One statement executed for every streaming answer, in one transaction.

    `executemany` of a statement built once: the ORM's `update()` per answer cost ~0.17 ms
    of CPU each (42 ms for 250 answers, holding the GIL while every stream waits).
    """
    connection = connections[Message.objects.db]
    now = Message._meta.get_field("heartbeat_at").get_db_prep_value(timezone.now(), connection)
    to_db = Message._meta.pk.get_db_prep_value
    rows = [
        (text, Status.STREAMING, now, to_db(message_id, connection)) for message_id, text in batch.items()
    ]
    with transaction.atomic(using=connection.alias), connection.cursor() as cursor:
        cursor.executemany(_partials_sql(connection), rows)


def _partials_sql(connection) -> str:
    # Only while live: a late flush must never overwrite a saved outcome.
    def column(name: str) -> str:
        return connection.ops.quote_name(Message._meta.get_field(name).column)

    live = ", ".join(f"'{status}'" for status in Message.LIVE_STATUSES)
    return (
        f"UPDATE {connection.ops.quote_name(Message._meta.db_table)} SET {column('content')} = %s, "
        f"{column('status')} = %s, {column('heartbeat_at')} = %s "
        f"WHERE {column('id')} = %s AND {column('status')} IN ({live})"
    )


def _save_outcome(message_id: UUID, fields: dict, record: UsageRecord) -> None:
    """The answer's outcome and its usage record, in one transaction of two statements.

    Plain SQL built from the models' fields: the ORM's UPDATE, EXISTS and INSERT cost
    ~1 ms of CPU per answer, most of it compiling the queries (docs/benchmarks.md). The
    usage record is inserted unless the sweep wrote this part's already (the unique
    constraint, `ON CONFLICT ... DO NOTHING`: other errors still raise).
    """
    connection = connections[Message.objects.db]
    with transaction.atomic(using=connection.alias), connection.cursor() as cursor:
        cursor.execute(*_update_sql(connection, message_id, fields))
        if not cursor.rowcount:
            # Deleted meanwhile (with its conversation): the usage is still charged.
            record.message_id = None
        cursor.execute(*insert_sql(connection, record, ignore_conflicts_on=("message", "part")))


def _update_sql(connection, message_id: UUID, fields: dict) -> tuple[str, list]:
    quote, meta = connection.ops.quote_name, Message._meta
    columns, params = [], []
    for name, value in fields.items():
        field = meta.get_field(name)
        columns.append(f"{quote(field.column)} = %s")
        params.append(field.get_db_prep_save(value, connection))
    params.append(meta.pk.get_db_prep_value(message_id, connection))
    sql = f"UPDATE {quote(meta.db_table)} SET {', '.join(columns)} WHERE {quote(meta.pk.column)} = %s"
    return sql, params


def _mark_save_failed(message_id: UUID, fields: dict) -> None:
    """The least an answer whose outcome could not be saved gets: failed, with its text if possible."""
    live = Message.objects.filter(pk=message_id, status__in=Message.LIVE_STATUSES)
    failed = {
        "status": Status.FAILED,
        "finish_reason": "error",
        "error_code": "save_failed",
        "error_message": Outcome.save_failed().message,
        "heartbeat_at": timezone.now(),
        "last_seq": fields.get("last_seq"),
    }
    try:
        with transaction.atomic():
            live.update(content=fields.get("content", ""), **failed)
    except Exception:  # the text itself may be what the database refuses
        live.update(**failed)


def _heartbeat(message_ids: list[UUID], worker: str) -> None:
    Message.objects.filter(pk__in=message_ids, status__in=Message.LIVE_STATUSES).update(
        heartbeat_at=timezone.now(), worker=worker
    )


def _orphan_candidates(older_than: float, message_id: UUID | None, running: list[UUID]) -> tuple:
    """Live answers whose heartbeat is older than `older_than` (not this process's), and the cutoff."""
    cutoff = timezone.now() - timedelta(seconds=older_than)
    candidates = Message.objects.filter(status__in=Message.LIVE_STATUSES, heartbeat_at__lt=cutoff)
    if message_id is not None:
        candidates = candidates.filter(pk=message_id)
    rows = candidates.exclude(pk__in=running).values(
        "id",
        "content",
        "client_key",
        "holds_slot",
        "conversation_id",
        "conversation__user_id",
        "conversation__session_key",
        "provider",
        "model",
        "continuations",
        "completion_tokens",
    )[:500]
    return list(rows), cutoff


def _claim_orphans(rows: list[dict], cutoff, logged: dict[UUID, str], outcome: Outcome) -> list[dict]:
    """Mark the candidates that are still orphans with `outcome`, with their text; return them.

    Each row is claimed by a conditional update, so of several sweepers (workers, readers)
    exactly one goes on to close it. The text is the longer of the last flush and the event
    log's (`logged`), saved in the same update: nobody ever reads the ended answer shorter
    than a client saw it.
    """
    claimed = []
    for row in rows:
        text = logged.get(row["id"])
        content = text if text and len(text) > len(row["content"]) else row["content"]
        won = Message.objects.filter(
            pk=row["id"], status__in=Message.LIVE_STATUSES, heartbeat_at__lt=cutoff
        ).update(
            status=outcome.status,
            content=content,
            error_code=outcome.code,
            error_message=outcome.message,
            finish_reason=outcome.finish_reason,
            heartbeat_at=timezone.now(),
            holds_slot=False,
        )
        if won:
            claimed.append({**row, "content": content})
    return claimed


def _number_orphans_end(message_id: UUID, last_seq: int) -> None:
    Message.objects.filter(pk=message_id).update(last_seq=last_seq)


def _finish_orphan(orphan: dict, status: str, tokens: int) -> None:
    """Charge a swept answer; `tokens` is what its last part wrote (earlier parts were counted)."""
    part = orphan["continuations"]
    with transaction.atomic():
        total = tokens + ((orphan["completion_tokens"] or 0) if part else 0)
        Message.objects.filter(pk=orphan["id"]).update(completion_tokens=total, tokens_estimated=True)
        if not UsageRecord.objects.filter(message_id=orphan["id"], part=part).exists():
            UsageRecord.objects.create(
                message_id=orphan["id"],
                part=part,
                user_id=orphan["conversation__user_id"],
                session_key=orphan["conversation__session_key"] or "",
                client_key=orphan["client_key"],
                provider=orphan["provider"],
                model=orphan["model"],
                completion_tokens=tokens,
                estimated=True,
                outcome=status,
            )
