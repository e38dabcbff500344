"""Model backends behind one interface, found by name in a registry, built lazily from settings.

Like llm's model plugins: a provider is a `Provider` subclass with a `name` and a
`from_settings()` class method, published in the `chatbot.providers` entry-point
group. The built-in ones are named the same way (`BUILTIN`, "module:Class" as an entry
point says it), and an installed package adds its own in its `pyproject.toml`:

    [project.entry-points."chatbot.providers"]
    echo = "my_package.echo:EchoProvider"

`CHATBOT = {"PROVIDER": "echo"}` then selects it (docs/providers.md). Nothing is
imported until it is selected, and nothing connects or loads weights at import time.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from importlib.metadata import EntryPoint, entry_points

from django.core.exceptions import ImproperlyConfigured

from ..conf import chatbot_setting
from ..errors import ProviderError
from .base import Chunk, Provider, Usage

__all__ = ["Chunk", "Provider", "Usage", "get_provider", "provider_names", "reset_provider"]

logger = logging.getLogger("chatbot.providers")

ENTRY_POINT_GROUP = "chatbot.providers"
BUILTIN = {
    "openai": "chatbot_api.providers.openai:OpenAIProvider",
    "local": "chatbot_api.providers.local:LocalProvider",
}


@lru_cache(maxsize=1)
def _registry() -> dict[str, EntryPoint]:
    """Every provider by name: the built-ins, then the installed packages' (which may replace them)."""
    found = {name: EntryPoint(name, value, ENTRY_POINT_GROUP) for name, value in BUILTIN.items()}
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        if entry_point.name in found and entry_point.value != found[entry_point.name].value:
            logger.warning("provider %r from %s replaces %s", entry_point.name, entry_point.value,
                           found[entry_point.name].value)  # fmt: skip
        found[entry_point.name] = entry_point
    return found


def provider_names() -> list[str]:
    return sorted(_registry())


def provider_class(name: str) -> type[Provider]:
    """The registered provider class called `name`, or ImproperlyConfigured naming the known ones."""
    entry_point = _registry().get(name)
    if entry_point is None:
        raise ImproperlyConfigured(
            f"CHATBOT_PROVIDER={name!r} is not a registered provider: use one of "
            f"{', '.join(provider_names())} (packages add theirs in the {ENTRY_POINT_GROUP!r} "
            "entry-point group)."
        )
    try:
        cls = entry_point.load()
    except Exception as exc:  # a broken plugin must say which one
        raise ImproperlyConfigured(
            f"The provider {name!r} ({entry_point.value}) failed to load: {exc}"
        ) from exc
    if not (isinstance(cls, type) and issubclass(cls, Provider)):
        raise ImproperlyConfigured(f"The provider {name!r} ({entry_point.value}) is not a Provider subclass.")
    return cls


@lru_cache(maxsize=1)
def get_provider() -> Provider:
    """The configured provider; a misconfigured one answers every request with `model_unavailable`.

    Start-up already refuses a bad configuration (system checks); this keeps a server that
    was started anyway answering in the error shape instead of crashing.
    """
    name = chatbot_setting("PROVIDER")
    try:
        return provider_class(name).from_settings()
    except ImproperlyConfigured as problem:
        logger.error("the model provider is misconfigured: %s", problem)
        return UnavailableProvider(name=name, model_id=chatbot_setting("MODEL"), reason=str(problem))


class UnavailableProvider(Provider):
    """Stands in for a provider that could not be built, so each answer fails with the reason."""

    def __init__(self, *, name: str, model_id: str, reason: str):
        self.name = name
        self.model_id = model_id
        self.reason = reason

    @classmethod
    def from_settings(cls) -> UnavailableProvider:
        raise ImproperlyConfigured("not a provider to select")

    async def stream(self, messages, *, max_tokens, temperature):
        raise ProviderError(
            f"The model is not available: {self.reason}", code="model_unavailable", status_code=503
        )
        yield  # pragma: no cover


def reset_provider() -> None:
    """Forget the cached provider (settings changed, or tests swapping backends)."""
    get_provider.cache_clear()
    _registry.cache_clear()
