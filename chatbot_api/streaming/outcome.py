"""How an answer ended: one value, converted to what each consumer needs.

A generation decides its `Outcome` once; the same value becomes the message's fields,
its usage record, its metrics and its terminal event, and a saved message turns back
into the same value when its events are rebuilt. Nobody works the status back out of
an error code: terminal `error` events carry `status` too.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import ChatbotError
from ..models import Message
from ..providers.base import Usage
from . import events as ev

Status = Message.Status

INTERRUPTED_MESSAGE = "The server stopped while this answer was being written; the partial answer was kept."
SAVE_FAILED_MESSAGE = "The answer could not be saved; what was shown may be incomplete after a reload."


@dataclass(frozen=True, slots=True)
class Outcome:
    status: str
    finish_reason: str = ""
    code: str = ""  # an error's machine-readable code ("" when the answer did not fail)
    message: str = ""
    retryable: bool = False
    usage: Usage | None = None
    ttft_ms: float | None = None
    duration_ms: float | None = None

    # -- the outcomes a generation can decide ---------------------------------------------------

    @classmethod
    def complete(cls, finish_reason: str = "") -> Outcome:
        return cls(Status.COMPLETE, finish_reason=finish_reason or "stop")

    @classmethod
    def stopped(cls) -> Outcome:
        return cls(Status.STOPPED, finish_reason="stopped")

    @classmethod
    def failed(cls, error: ChatbotError) -> Outcome:
        return cls(
            Status.FAILED,
            finish_reason="error",
            code=error.code,
            message=error.message,
            retryable=error.retryable,
        )

    @classmethod
    def interrupted(cls) -> Outcome:
        return cls(
            Status.INTERRUPTED,
            finish_reason="error",
            code="interrupted",
            message=INTERRUPTED_MESSAGE,
            retryable=True,
        )

    @classmethod
    def save_failed(cls) -> Outcome:
        return cls.failed(ChatbotError(SAVE_FAILED_MESSAGE, code="save_failed", retryable=True))

    @classmethod
    def of_message(cls, message: Message) -> Outcome:
        """The outcome a saved message records (a live one, read without its worker: interrupted)."""
        if message.is_live:
            return cls.interrupted()
        return cls(
            message.status,
            finish_reason=message.finish_reason,
            code=message.error_code,
            message=message.error_message,
            retryable=message.status == Status.INTERRUPTED,
        )

    def with_facts(self, **facts) -> Outcome:
        """The same outcome with its usage and timings (`usage=`, `ttft_ms=`, `duration_ms=`)."""
        return dataclasses.replace(self, **facts)

    # -- conversions -----------------------------------------------------------------------------

    @property
    def is_success(self) -> bool:
        return self.status in (Status.COMPLETE, Status.STOPPED)

    def terminal_event(self) -> tuple[str, dict]:
        """The terminal event (type, data) that ends the answer's stream."""
        if self.is_success:
            return ev.DONE, {"status": str(self.status), "finish_reason": self.finish_reason or "stop"}
        return ev.ERROR, {
            "status": str(self.status),
            "code": self.code or str(self.status),
            "message": self.message or INTERRUPTED_MESSAGE,
            "retryable": self.retryable,
        }

    def message_fields(self) -> dict:
        """The `Message` fields this outcome sets."""
        fields = {
            "status": self.status,
            "finish_reason": self.finish_reason,
            "error_code": self.code,
            "error_message": self.message,
            "duration_ms": self.duration_ms,
            "ttft_ms": self.ttft_ms,
        }
        if self.usage is not None:
            fields.update(
                prompt_tokens=self.usage.prompt_tokens,
                completion_tokens=self.usage.completion_tokens,
                tokens_estimated=self.usage.estimated,
            )
        return fields

    def usage_event(self) -> dict | None:
        if self.usage is None:
            return None
        return {
            "prompt_tokens": self.usage.prompt_tokens,
            "completion_tokens": self.usage.completion_tokens,
            "estimated": self.usage.estimated,
        }
