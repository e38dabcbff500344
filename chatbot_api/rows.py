"""Rows written as one plain INSERT built from a model's fields, for the hot path of every answer.

`Model.save()` / `objects.create()` spend most of their ~0.3 ms per row compiling the
statement (docs/benchmarks.md); the statement is the same every time. These helpers
prepare each field's value as `save()` would (`pre_save`: defaults, `auto_now`,
`auto_now_add`; `get_db_prep_save`: the database's types) and send the INSERT as is.
Unlike `save()` they send no `pre_save`/`post_save` signals: use them for the product's
own rows only.
"""

from __future__ import annotations

from django.db import connections, router
from django.db.models import AutoField, BigAutoField, Model, SmallAutoField

AUTO_FIELDS = (AutoField, BigAutoField, SmallAutoField)


def insert_sql(connection, instance: Model, *, ignore_conflicts_on: tuple[str, ...] = ()) -> tuple[str, list]:
    """The INSERT of `instance` (its `auto_now*` fields set on it as `save()` sets them).

    `ignore_conflicts_on`: field names of a unique constraint; a row that conflicts on it
    is left alone (`ON CONFLICT (...) DO NOTHING`), any other error still raises.
    """
    quote, meta = connection.ops.quote_name, instance._meta
    fields = [
        field
        for field in meta.concrete_fields
        if not (
            field.primary_key and isinstance(field, AUTO_FIELDS) and field.value_from_object(instance) is None
        )
    ]
    params = [field.get_db_prep_save(field.pre_save(instance, True), connection) for field in fields]
    sql = (
        f"INSERT INTO {quote(meta.db_table)} ({', '.join(quote(field.column) for field in fields)}) "
        f"VALUES ({', '.join(['%s'] * len(fields))})"
    )
    if ignore_conflicts_on:
        columns = ", ".join(quote(meta.get_field(name).column) for name in ignore_conflicts_on)
        sql += f" ON CONFLICT ({columns}) DO NOTHING"
    return sql, params


def insert(*instances: Model) -> None:
    """Save new rows (each model's write database; in the caller's transaction, if any).

    Only rows whose primary key is known before the INSERT (the UUIDs here): an
    auto-increment key would not be read back."""
    for instance in instances:
        if instance.pk is None:
            raise ValueError(f"{type(instance).__name__} has no primary key yet: use save()")
        connection = connections[router.db_for_write(type(instance), instance=instance)]
        with connection.cursor() as cursor:
            cursor.execute(*insert_sql(connection, instance))
        instance._state.adding = False
        instance._state.db = connection.alias
