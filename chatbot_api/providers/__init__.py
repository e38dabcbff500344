"""Model backends behind one interface, built lazily from settings.

`get_provider()` builds the configured backend on first use and caches it; nothing
connects or loads weights at import time.
"""

from __future__ import annotations

import logging
from functools import lru_cache

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from ..errors import ProviderError
from .base import Chunk, Provider, Usage

__all__ = ["Chunk", "Provider", "Usage", "get_provider", "reset_provider"]

logger = logging.getLogger("chatbot.providers")


@lru_cache(maxsize=1)
def get_provider() -> Provider:
    """The configured provider; a misconfigured one answers every request with `model_unavailable`.

    Start-up already refuses a bad configuration (system checks, settings); this keeps a
    server that was started anyway answering in the error shape instead of crashing.
    """
    name = settings.CHATBOT["PROVIDER"]
    try:
        if name == "openai":
            from .openai import OpenAIProvider

            return OpenAIProvider.from_settings()
        if name == "local":
            from .local import LocalProvider

            return LocalProvider.from_settings()
        raise ImproperlyConfigured(f"CHATBOT_PROVIDER={name!r} is not supported: use 'openai' or 'local'.")
    except ImproperlyConfigured as problem:
        logger.error("the model provider is misconfigured: %s", problem)
        return UnavailableProvider(name=name, model_id=settings.CHATBOT["MODEL"], reason=str(problem))


class UnavailableProvider(Provider):
    """Stands in for a provider that could not be built, so each answer fails with the reason."""

    def __init__(self, *, name: str, model_id: str, reason: str):
        self.name = name
        self.model_id = model_id
        self.reason = reason

    async def stream(self, messages, *, max_tokens, temperature):
        raise ProviderError(
            f"The model is not available: {self.reason}", code="model_unavailable", status_code=503
        )
        yield  # pragma: no cover


def reset_provider() -> None:
    """Forget the cached provider (settings changed, or tests swapping backends)."""
    get_provider.cache_clear()
