"""System checks: a misconfigured provider fails `manage.py check`/`migrate`/`runserver` with the fix."""

from django.core.checks import Error, register
from django.core.exceptions import ImproperlyConfigured

from .conf import chatbot_setting


@register()
def provider_configuration(app_configs, **kwargs):
    from .providers import provider_class

    name = chatbot_setting("PROVIDER")
    try:
        provider_class(name)
    except ImproperlyConfigured as problem:
        return [Error(str(problem), id="chatbot.E002")]
    if name != "local":
        return []
    from .providers.local import check_local_model

    return [Error(problem, id="chatbot.E001") for problem in check_local_model()]
