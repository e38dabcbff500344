"""One error type for the application and one JSON shape for every failure.

Every API error, whatever raised it (validation, a missing conversation, the
model's server, a timeout), reaches the client as

    {"success": false, "error": "<human readable>", "code": "<machine code>", ...}

with the matching HTTP status. Streams carry the same `code`/`message` in their
terminal `error` event.
"""

from __future__ import annotations

import logging

from django.core.exceptions import RequestDataTooBig
from django.db import OperationalError
from django.http import Http404, JsonResponse
from rest_framework import exceptions as drf_exceptions
from rest_framework.response import Response

try:  # the scale extra: without it nothing talks to Redis, so nothing raises its errors
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    REDIS_ERRORS: tuple[type[Exception], ...] = (RedisConnectionError, RedisTimeoutError)
except ImportError:
    REDIS_ERRORS = ()

logger = logging.getLogger("chatbot.errors")


class ChatbotError(Exception):
    """An error the client should see, with its HTTP status and machine-readable code."""

    status_code = 400
    code = "bad_request"
    retryable = False

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status_code: int | None = None,
        retryable: bool | None = None,
        headers: dict | None = None,
        extra: dict | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.extra = extra or {}
        if code is not None:
            self.code = code
        if status_code is not None:
            self.status_code = status_code
        if retryable is not None:
            self.retryable = retryable
        self.headers = headers or {}


class NotFound(ChatbotError):
    status_code = 404
    code = "not_found"


class ProviderError(ChatbotError):
    """The model's server failed, refused, or could not be reached."""

    status_code = 502
    code = "upstream_error"


class ServerBusy(ChatbotError):
    """The database or Redis did not answer in time: a saturated worker or a backing service down."""

    status_code = 503
    code = "server_busy"
    retryable = True
    retry_after = 5

    def __init__(self):
        super().__init__(
            "The server is busy or one of its services is unreachable; try again shortly.",
            headers={"Retry-After": str(self.retry_after)},
        )


class ShuttingDown(ChatbotError):
    """This worker is shutting down: the client should go on with another one."""

    status_code = 503
    code = "server_shutdown"
    retryable = True

    def __init__(self):
        super().__init__(
            "This server is restarting; try again (another worker will answer).",
            headers={"Retry-After": "1"},
        )


# Errors that mean "try again later" (an empty connection pool after its timeout, a refused
# connection), answered 503 `server_busy` instead of a 500 that reads as a bug.
UNAVAILABLE_ERRORS = (OperationalError, *REDIS_ERRORS)


def unavailable_error(exc: BaseException) -> ServerBusy | None:
    return ServerBusy() if isinstance(exc, UNAVAILABLE_ERRORS) else None


class GenerationTimeout(ChatbotError):
    """One of the generation time limits (`connect`, `first_token`, `idle`, `total`) was hit."""

    status_code = 504
    retryable = True

    def __init__(self, limit: str, seconds: float):
        super().__init__(
            f"The model did not answer in time ({limit.replace('_', ' ')} limit of {seconds:g} s).",
            code=f"timeout_{limit}",
        )
        self.limit = limit


# Terminal `error` event codes -> HTTP status for JSON clients.
STATUS_BY_CODE = {
    "not_found": 404,
    "context_length_exceeded": 400,
    "rate_limited": 429,
    "model_unavailable": 503,
    "upstream_rate_limited": 503,
    "upstream_timeout": 504,
    "interrupted": 503,
    "server_busy": 503,
    "server_shutdown": 503,
    "save_failed": 500,
}


def status_for_code(code: str) -> int:
    if code.startswith("timeout_"):
        return 504
    return STATUS_BY_CODE.get(code, 502)


def error_body(message: str, code: str, **extra) -> dict:
    return {"success": False, "error": message, "code": code, **extra}


def _flatten_validation(detail, prefix: str = "") -> list[str]:
    if isinstance(detail, dict):
        out = []
        for field, value in detail.items():
            name = "" if field == "non_field_errors" else str(field)
            out.extend(_flatten_validation(value, f"{prefix}.{name}" if prefix and name else name or prefix))
        return out
    if isinstance(detail, list):
        return [line for item in detail for line in _flatten_validation(item, prefix)]
    return [f"{prefix}: {detail}" if prefix else str(detail)]


def api_exception_handler(exc, context):
    """DRF exception handler: every API failure in the one JSON shape."""
    if busy := unavailable_error(exc):
        logger.warning("answered 503: %s: %s", exc.__class__.__name__, exc)
        exc = busy
    if isinstance(exc, Http404):  # Django's own, e.g. from get_object_or_404: as DRF treats it
        exc = drf_exceptions.NotFound()
    if isinstance(exc, RequestDataTooBig):
        return Response(error_body("The request body is too large.", "payload_too_large"), status=413)
    if isinstance(exc, ChatbotError):
        body = error_body(exc.message, exc.code, retryable=exc.retryable, **exc.extra)
        return Response(body, status=exc.status_code, headers=exc.headers)
    if isinstance(exc, drf_exceptions.ValidationError):
        lines = _flatten_validation(exc.detail)
        return Response(
            error_body("; ".join(lines) or "Invalid input.", "invalid", details=exc.detail), status=400
        )
    if isinstance(exc, drf_exceptions.APIException):
        headers = {}
        if getattr(exc, "wait", None) is not None:
            headers["Retry-After"] = str(int(exc.wait) + 1)
        if isinstance(exc, drf_exceptions.NotFound):
            code = "not_found"
        else:
            code = exc.default_code if isinstance(exc.detail, str) else "error"
            codes = exc.get_codes()
            code = codes if isinstance(codes, str) else code
        message = (
            str(exc.detail)
            if not isinstance(exc.detail, (list, dict))
            else "; ".join(_flatten_validation(exc.detail))
        )
        return Response(error_body(message, code), status=exc.status_code, headers=headers)
    return None  # unexpected: Django's 500 handler below turns it into the same shape


def _api_of(request) -> str | None:
    """ "api" or "openai" when the path is under that API's prefix (wherever the site put it)."""
    from django.urls import NoReverseMatch, reverse

    for api, url_name, suffix in (
        ("api", "chatbot:api:chat", "chat/"),
        ("openai", "chatbot:openai:models", "models"),
    ):
        try:
            root = reverse(url_name).removesuffix(suffix)
        except NoReverseMatch:
            continue
        if request.path.startswith(root):
            return api
    return None


def _error_response(request, message: str, code: str, status: int):
    api = _api_of(request)
    if api == "openai":
        from .openai_api.wire import error_object

        return JsonResponse(error_object(message, code, status), status=status)
    if api == "api":
        return JsonResponse(error_body(message, code), status=status)
    return None


def json_not_found(request, exception=None):
    """handler404: JSON in the APIs' own shapes under their prefixes, Django's page elsewhere."""
    if response := _error_response(request, "Not found.", "not_found", 404):
        return response
    from django.views.defaults import page_not_found

    return page_not_found(request, exception)


def json_server_error(request):
    if response := _error_response(request, "Internal server error.", "server_error", 500):
        return response
    from django.views.defaults import server_error

    return server_error(request)
