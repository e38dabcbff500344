"""OpenAPI: teach drf-spectacular about our session authentication (a SessionAuthentication)."""

from drf_spectacular.authentication import SessionScheme


class CsrfSessionScheme(SessionScheme):
    target_class = "chatbot_api.authentication.CsrfSessionAuthentication"


def only_chatbot_endpoints(endpoints):
    """drf-spectacular preprocessing hook: the chat API's endpoints, none of the site's others."""
    from .views import ApiPolicy

    return [endpoint for endpoint in endpoints if issubclass(getattr(endpoint[3], "cls", object), ApiPolicy)]
