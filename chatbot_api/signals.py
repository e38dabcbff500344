from django.core.signals import setting_changed
from django.dispatch import receiver


@receiver(setting_changed)
def reset_cached_clients(*, setting, **kwargs):
    """Called when a test overrides settings: rebuild the provider from the new values."""
    if setting in {"CHATBOT", "OPENAI_API_KEY", "OPENAI_BASE_URL"}:
        from .providers import reset_provider

        reset_provider()
