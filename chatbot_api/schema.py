"""OpenAPI: teach drf-spectacular about our session authentication (a SessionAuthentication)."""

from drf_spectacular.authentication import SessionScheme


class CsrfSessionScheme(SessionScheme):
    target_class = "chatbot_api.authentication.CsrfSessionAuthentication"
