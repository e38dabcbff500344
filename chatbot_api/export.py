"""A conversation as a file people keep: Markdown to read, JSON for programs."""

from __future__ import annotations

import json
import re

from .models import Conversation, Message

EXPORT_FORMATS = {"markdown": ("text/markdown; charset=utf-8", "md"), "json": ("application/json", "json")}


def as_json(conversation: Conversation, messages: list[Message]) -> str:
    return json.dumps(
        {
            "session_id": str(conversation.id),
            "title": conversation.title,
            "created_at": conversation.created_at.isoformat(),
            "messages": [
                {
                    "id": str(message.id),
                    "role": message.role,
                    "content": message.content,
                    "created_at": message.created_at.isoformat(),
                    **(
                        {
                            "status": message.status,
                            "model": message.model,
                            "finish_reason": message.finish_reason,
                            "prompt_tokens": message.prompt_tokens,
                            "completion_tokens": message.completion_tokens,
                        }
                        if message.role == Message.Role.ASSISTANT
                        else {}
                    ),
                }
                for message in messages
            ],
        },
        ensure_ascii=False,
        indent=2,
    )


def as_markdown(conversation: Conversation, messages: list[Message]) -> str:
    lines = [f"# {conversation.title or 'Conversation'}", ""]
    for message in messages:
        when = message.created_at.strftime("%Y-%m-%d %H:%M UTC")
        if message.role == Message.Role.USER:
            lines += [f"**You** · {when}", ""]
        else:
            facts = " · ".join(
                part
                for part in (
                    message.model,
                    message.status if message.status != Message.Status.COMPLETE else "",
                )
                if part
            )
            lines += [f"**Assistant** ({facts}) · {when}" if facts else f"**Assistant** · {when}", ""]
        lines += [message.content, "", "---", ""]
    return "\n".join(lines)


def filename(conversation: Conversation, extension: str) -> str:
    stem = (
        re.sub(r"[^\w-]+", "-", conversation.title or "conversation").strip("-").lower()[:60]
        or "conversation"
    )
    return f"{stem}.{extension}"
