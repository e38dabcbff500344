from django.conf import settings
from rest_framework import authentication
from rest_framework.authentication import SessionAuthentication, get_authorization_header

from .lookups import token_users


class TokenAuthentication(authentication.TokenAuthentication):
    """DRF's `Authorization: Token <key>`, with the key's user remembered for a few seconds
    (`lookups`): a started answer does not query the token table each time."""

    # (key, (user, token)) taken from `lookups` for this request before authenticating on
    # the event loop: used as is, so an entry that expires meanwhile cannot make it query.
    pinned: tuple[str, tuple] | None = None

    def authenticate_credentials(self, key):
        if self.pinned is not None and self.pinned[0] == key:
            return self.pinned[1]
        # An unknown key or an inactive user raises AuthenticationFailed: nothing remembered.
        return token_users.get_or_load(key, super().authenticate_credentials)


class CsrfSessionAuthentication(SessionAuthentication):
    """Session authentication that checks CSRF for every request carrying a session cookie.

    DRF checks CSRF only for signed-in users; anonymous conversations are owned by the
    session cookie too, so a cross-site request must not be able to use it either.
    Requests without cookies (scripts using a token, or none) have no ambient
    credentials to abuse and are not checked.
    """

    def authenticate(self, request):
        user = getattr(request._request, "user", None)
        if user is not None and user.is_active:
            self.enforce_csrf(request)
            return (user, None)
        if settings.SESSION_COOKIE_NAME in request._request.COOKIES:
            self.enforce_csrf(request)
        return None


class BearerTokenAuthentication(TokenAuthentication):
    """The same API tokens as OpenAI clients send keys: `Authorization: Bearer <token>`.

    SDKs refuse to run without a key, so the key `anonymous` (or none at all) means no
    key: the request is anonymous, allowed only where CHATBOT ALLOW_ANONYMOUS is on. Any
    other unknown key is refused, never taken as anonymous.
    """

    keyword = "Bearer"
    ANONYMOUS_KEYS = ([b"Bearer"], [b"Bearer", b"anonymous"])

    def authenticate(self, request):
        if get_authorization_header(request).split() in self.ANONYMOUS_KEYS:
            return None
        return super().authenticate(request)
