"""System checks: a misconfigured provider fails `manage.py check`/`migrate`/`runserver` with the fix."""

from django.conf import settings
from django.core.checks import Error, register


@register()
def provider_configuration(app_configs, **kwargs):
    if settings.CHATBOT["PROVIDER"] != "local":
        return []
    from .providers.local import check_local_model

    return [Error(problem, id="chatbot.E001") for problem in check_local_model()]
