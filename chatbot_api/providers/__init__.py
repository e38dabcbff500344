"""Model backends behind one interface, built lazily from settings.

`get_provider()` builds the configured backend on first use and caches it; nothing
connects or loads weights at import time.
"""

from __future__ import annotations

from functools import lru_cache

from django.conf import settings

from .base import Chunk, Provider, Usage

__all__ = ["Chunk", "Provider", "Usage", "get_provider", "reset_provider"]


@lru_cache(maxsize=1)
def get_provider() -> Provider:
    name = settings.CHATBOT["PROVIDER"]
    if name == "openai":
        from .openai import OpenAIProvider

        return OpenAIProvider.from_settings()
    if name == "local":
        from .local import LocalProvider

        return LocalProvider.from_settings()
    from django.core.exceptions import ImproperlyConfigured

    raise ImproperlyConfigured(f"CHATBOT_PROVIDER={name!r} is not supported: use 'openai' or 'local'.")


def reset_provider() -> None:
    """Forget the cached provider (settings changed, or tests swapping backends)."""
    get_provider.cache_clear()
