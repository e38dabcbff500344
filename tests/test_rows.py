"""`chatbot_api.rows`: a plain INSERT must store what `Model.save()` would have stored."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from django.contrib.auth.models import User
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from chatbot_api.models import Conversation, Message, UsageRecord
from chatbot_api.rows import insert, insert_sql

pytestmark = [pytest.mark.django_db(transaction=True)]


def stored(instance) -> dict:
    """Every concrete field of the row as the ORM reads it back."""
    row = type(instance).objects.get(pk=instance.pk)
    return {field.attname: field.value_from_object(row) for field in row._meta.concrete_fields}


def test_insert_stores_the_same_row_as_save():
    user = User.objects.create_user("rows")
    before = timezone.now()
    conversation = Conversation(user=user, title="Plain", model="m")
    insert(conversation)
    saved = Conversation.objects.create(user=user, title="Plain", model="m")

    by_insert, by_save = stored(conversation), stored(saved)
    # auto_now_add / auto_now were set on the instance, as save() sets them, and stored.
    assert before <= conversation.created_at <= timezone.now()
    assert by_insert["created_at"] == conversation.created_at
    assert by_insert["updated_at"] == conversation.updated_at
    ignored = {"id", "created_at", "updated_at"}
    assert {k: v for k, v in by_insert.items() if k not in ignored} == {
        k: v for k, v in by_save.items() if k not in ignored
    }
    assert not conversation._state.adding and conversation._state.db == "default"


def test_insert_keeps_every_field_of_a_message():
    conversation = Conversation(session_key="s" * 32)
    insert(conversation)
    answer_id = uuid.uuid4()
    heartbeat = timezone.now() - timedelta(seconds=3)
    answer = Message(
        id=answer_id,
        conversation=conversation,
        role=Message.Role.ASSISTANT,
        status=Message.Status.PENDING,
        content="ünïcödé ✓ 'quoted' \"twice\"",
        provider="openai",
        model="gpt",
        heartbeat_at=heartbeat,
        holds_slot=True,
        streaming=True,
        transport="sse",
    )
    insert(answer)

    row = stored(answer)
    assert row["id"] == answer_id and row["conversation_id"] == conversation.id
    assert row["content"] == answer.content and row["heartbeat_at"] == heartbeat
    assert row["holds_slot"] is True and row["streaming"] is True and row["tokens_estimated"] is False
    assert row["continuations"] == 0 and row["last_seq"] is None and row["prompt_tokens"] is None


def test_a_row_the_database_refuses_raises_and_rolls_back():
    conversation = Conversation(session_key="k" * 32)
    insert(conversation)
    taken = Message(conversation=conversation, role=Message.Role.USER, content="first")
    insert(taken)

    with pytest.raises(IntegrityError), transaction.atomic():
        insert(Message(conversation=conversation, role=Message.Role.USER, content="kept?"))
        insert(Message(id=taken.id, conversation=conversation, role=Message.Role.USER, content="again"))
    assert list(Message.objects.values_list("content", flat=True)) == ["first"]


def test_ignored_conflicts_leave_the_existing_row():
    conversation = Conversation(session_key="c" * 32)
    insert(conversation)
    message = Message(conversation=conversation, role=Message.Role.ASSISTANT)
    insert(message)
    first = UsageRecord(
        message=message, part=0, client_key="ip:1", provider="p", model="m", completion_tokens=7
    )
    with pytest.raises(ValueError, match="no primary key"):
        insert(first)  # an auto-increment key would not be read back
    with connection.cursor() as cursor:
        cursor.execute(*insert_sql(connection, first, ignore_conflicts_on=("message", "part")))
    again = UsageRecord(
        message=message, part=0, client_key="ip:1", provider="p", model="m", completion_tokens=9
    )
    with connection.cursor() as cursor:
        cursor.execute(*insert_sql(connection, again, ignore_conflicts_on=("message", "part")))
    assert list(UsageRecord.objects.values_list("completion_tokens", flat=True)) == [7]
