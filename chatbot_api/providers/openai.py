"""OpenAI chat completions, and every server that speaks its wire format.

With `OPENAI_BASE_URL` the same code talks to Ollama, vLLM, llama.cpp's server or
LM Studio. The `AsyncOpenAI` client is built on first use, never at import time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from functools import cached_property

import aiohttp
import httpx2
import openai
from django.conf import settings

from ..conf import chatbot_setting
from ..errors import ProviderError
from .base import Chunk, Provider, bounded_finish_reason, usage_from_counts

MODEL_LIST_TTL = 60.0  # seconds an upstream's model list is reused before asking again


class OpenAIProvider(Provider):
    name = "openai"
    default_model = "gpt-4.1-nano"
    context_window = 128_000
    supports_stop = True  # the upstream applies them

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str | None,
        model_id: str,
        connect_timeout: float,
        max_retries: int,
        http_client: str = "aiohttp",
    ):
        self.api_key = api_key
        self.base_url = base_url or None
        self.model_id = model_id
        self.connect_timeout = connect_timeout
        self.max_retries = max_retries
        self.http_client = http_client
        self._models: tuple[float, list[str]] = (0.0, [])  # (when listed, the list)

    @classmethod
    def from_settings(cls) -> OpenAIProvider:
        return cls(
            api_key=settings.OPENAI_API_KEY,
            base_url=settings.OPENAI_BASE_URL,
            model_id=chatbot_setting("MODEL") or cls.default_model,
            connect_timeout=chatbot_setting("CONNECT_TIMEOUT"),
            max_retries=chatbot_setting("OPENAI_MAX_RETRIES"),
            http_client=chatbot_setting("OPENAI_HTTP_CLIENT"),
        )

    @cached_property
    def client(self) -> openai.AsyncOpenAI:
        # Only the connect limit lives here: time-to-first-token, idle gap and total
        # duration are enforced by the generation loop, the same for every provider.
        # The SDK's aiohttp transport (its `openai[aiohttp]` extra) reads a stream with
        # aiohttp's C parser: ~13% less CPU per relayed answer than httpx's pure-Python h11
        # (docs/benchmarks.md); "httpx" keeps the SDK's default client.
        return openai.AsyncOpenAI(
            api_key=self.api_key,
            base_url=self.base_url,
            timeout=openai.Timeout(None, connect=self.connect_timeout),
            max_retries=self.max_retries,
            http_client=openai.DefaultAioHttpClient() if self.http_client == "aiohttp" else None,
        )

    async def list_models(self) -> list[str]:
        """The configured model, then the upstream's own list (Ollama's, vLLM's...), if it has one."""
        listed_at, models = self._models
        if models and time.monotonic() - listed_at < MODEL_LIST_TTL:
            return models
        try:
            upstream = [model.id async for model in self.client.models.list()]
        except (openai.APIError, httpx2.HTTPError, ValueError):
            upstream = []  # a server without /models (or unreachable now) serves the configured one
        models = [self.model_id, *(model for model in upstream if model != self.model_id)]
        self._models = (time.monotonic(), models)
        return models

    async def stream(
        self,
        messages: list[dict],
        *,
        max_tokens: int,
        temperature: float,
        model: str | None = None,
        stop: list[str] | None = None,
    ) -> AsyncIterator[Chunk]:
        # The SDK makes the request (auth, base URL, retries, HTTP errors) through its
        # low-level `post()`: the body is already plain JSON, so `create()`'s walk of every
        # message against its parameter types (a third of the request's CPU) is skipped. The
        # stream's `data:` frames are read as plain JSON too: the SDK's pydantic chunk
        # objects cost about five times more CPU per token than everything else in the relay.
        body = {
            "model": model or self.model_id,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
            **({"stop": stop} if stop else {}),
        }
        response = None
        try:
            response = await self.client.post(
                "/chat/completions", cast_to=httpx2.Response, body=body, stream=True
            )
            lines = response.aiter_lines()
            async for line in lines:
                chunk = _parse_frame(line)
                if chunk is _DONE:
                    await _read_to_end(lines)
                    break
                if chunk is not None:
                    yield chunk
        except openai.APIError as exc:
            raise _provider_error(exc) from exc
        except httpx2.TimeoutException as exc:
            if _refused(exc):
                raise _unreachable() from exc
            raise ProviderError(
                "The model server stopped answering mid-stream.",
                code="upstream_timeout",
                status_code=504,
                retryable=True,
            ) from exc
        except httpx2.TransportError as exc:
            raise _unreachable() from exc
        finally:
            # On stop or timeout this closes the connection: the model server sees the
            # disconnect and stops generating.
            if response is not None:
                await response.aclose()

    async def aclose(self) -> None:
        if "client" in self.__dict__:
            await self.client.close()
            del self.__dict__["client"]


_DONE = object()
END_OF_BODY_WAIT = 0.1  # seconds: what a server that sent `[DONE]` gets to end its body


async def _read_to_end(lines: AsyncIterator[str]) -> None:
    """Read what follows `[DONE]` (the chunked body's last bytes), briefly.

    A response closed before the end of its body takes its connection with it, and every
    answer would then open a new one to the model server; a server that sends more, or
    never ends the body, only loses its connection.
    """
    with contextlib.suppress(TimeoutError, httpx2.HTTPError):
        async with asyncio.timeout(END_OF_BODY_WAIT):
            async for _ in lines:
                pass


def _parse_frame(line: str) -> Chunk | object | None:
    """One line of the SSE body: a `Chunk`, `_DONE` at `[DONE]`, or None for anything empty."""
    if not line.startswith("data:"):
        return None  # blank separators, comments, `event:`/`id:` fields
    data = line[5:].strip()
    if data == "[DONE]":
        return _DONE
    try:
        frame = json.loads(data)
        if "error" in frame:
            error = frame["error"] or {}
            message = error.get("message") if isinstance(error, dict) else str(error)
            raise ProviderError(f"The model server sent an error: {message}", code="upstream_error")
        text, finish_reason, usage = "", None, None
        choices = frame.get("choices")
        if choices:
            choice = choices[0]
            text = (choice.get("delta") or {}).get("content") or ""
            if not isinstance(text, str):
                raise ProviderError(
                    f"The model server sent non-text content ({type(text).__name__}).",
                    code="upstream_protocol",
                )
            finish_reason = bounded_finish_reason(choice.get("finish_reason"))
        if isinstance(counts := frame.get("usage"), dict):
            # Implausible counts (negative, text, 10**20) are treated as missing: estimated later.
            usage = usage_from_counts(counts.get("prompt_tokens"), counts.get("completion_tokens"))
    except (ValueError, TypeError, AttributeError, IndexError, RecursionError) as exc:
        raise ProviderError(
            f"The model server sent a malformed stream frame ({exc.__class__.__name__}).",
            code="upstream_protocol",
        ) from exc
    if text or finish_reason or usage:
        return Chunk(text=text, finish_reason=finish_reason, usage=usage)
    return None


def _provider_error(exc: openai.APIError) -> ProviderError:
    if isinstance(exc, openai.APITimeoutError) and not _refused(exc):
        return ProviderError(
            "Could not connect to the model server in time (connect limit).",
            code="timeout_connect",
            status_code=504,
            retryable=True,
        )
    if isinstance(exc, openai.APIConnectionError):
        return _unreachable()
    if isinstance(exc, openai.RateLimitError):
        return ProviderError(
            "The model server is rate limiting us; try again in a moment.",
            code="upstream_rate_limited",
            status_code=503,
            retryable=True,
        )
    if isinstance(exc, openai.AuthenticationError | openai.PermissionDeniedError):
        return ProviderError(
            "The model server refused our credentials: check OPENAI_API_KEY.", code="upstream_auth"
        )
    if isinstance(exc, openai.NotFoundError):
        return ProviderError(
            "The model server does not know this model: check CHATBOT_MODEL.",
            code="model_unavailable",
            status_code=503,
        )
    if isinstance(exc, openai.APIStatusError):
        return ProviderError(
            f"The model server failed (HTTP {exc.status_code}).",
            code="upstream_error",
            retryable=exc.status_code >= 500,
        )
    return ProviderError(f"The model server sent an error: {exc.message}", code="upstream_error")


def _unreachable() -> ProviderError:
    return ProviderError(
        "Could not reach the model server, or it closed the connection mid-answer.",
        code="upstream_unavailable",
        retryable=True,
    )


def _refused(exc: BaseException) -> bool:
    """Whether a "timeout" was a refused or reset connection.

    The aiohttp transport maps every aiohttp connection error to httpx's `ConnectTimeout`
    (so the SDK raises `APITimeoutError` for a refused port too); the error it wraps tells.
    """
    while (exc := exc.__cause__ or exc.__context__) is not None:
        if isinstance(exc, TimeoutError):
            return False
        if isinstance(exc, aiohttp.ClientConnectionError) and not isinstance(exc, aiohttp.ServerTimeoutError):
            return True
    return False
