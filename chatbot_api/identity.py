"""Who owns what: the signed-in user, or else the browser session."""

from __future__ import annotations

from dataclasses import dataclass, field

from channels.db import database_sync_to_async
from rest_framework.exceptions import AuthenticationFailed, NotAuthenticated

from .authentication import TokenAuthentication
from .conf import chatbot_setting


@dataclass(frozen=True, slots=True)
class Owner:
    """Who is asking: a signed-in user, or an anonymous browser session."""

    user_id: int | None = None
    session_key: str | None = None
    # Where the request came from: anonymous callers are rate-limited per IP.
    client_ip: str = field(default="", compare=False)

    def __post_init__(self):
        if self.user_id is None and not self.session_key:
            raise ValueError("an owner needs a user or a session key")

    @property
    def lookup(self) -> dict:
        if self.user_id is not None:
            return {"user_id": self.user_id}
        return {"user__isnull": True, "session_key": self.session_key}

    @property
    def create_kwargs(self) -> dict:
        if self.user_id is not None:
            return {"user_id": self.user_id}
        return {"session_key": self.session_key}

    @property
    def rate_key(self) -> str:
        """Whom the rate limits count: the user, else the client IP (a new session must not reset them)."""
        if self.user_id is not None:
            return f"user:{self.user_id}"
        return f"ip:{self.client_ip}" if self.client_ip else f"session:{self.session_key}"


async def owner_for(request) -> Owner:
    """The owner of the request's conversations; starts a session for a new anonymous visitor."""
    user = request.user
    client_ip = request.META.get("REMOTE_ADDR") or ""
    if user is not None and user.is_authenticated:
        return Owner(user_id=user.pk, client_ip=client_ip)
    if not chatbot_setting("ALLOW_ANONYMOUS"):
        raise NotAuthenticated("Sign in to use the chatbot.")
    session = request.session
    if not session.session_key:
        await session.asave()
    return Owner(session_key=session.session_key, client_ip=client_ip)


async def owner_for_scope(scope) -> Owner | None:
    """The same for a WebSocket: an API token, else the signed-in user, else the page's session.

    A token that is not valid (unknown, revoked, its user inactive) is refused, as over
    HTTP: never taken as anonymous."""
    client_ip = (scope.get("client") or ("",))[0] or ""
    user = await _token_user(scope)
    if user is INVALID_TOKEN:
        return None
    user = user or scope.get("user")
    if user is not None and user.is_authenticated:
        return Owner(user_id=user.pk, client_ip=client_ip)
    if not chatbot_setting("ALLOW_ANONYMOUS"):
        return None
    session = scope.get("session")
    if session is None:
        return None
    if not session.session_key:
        await session.asave()
    return Owner(session_key=session.session_key, client_ip=client_ip)


INVALID_TOKEN = object()


async def _token_user(scope):
    """The user of an `Authorization: Token <key>` header (non-browser WebSocket clients):
    None without one, INVALID_TOKEN for a key that names no active user."""
    header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
    kind, _, key = header.partition(" ")
    if kind.lower() != "token":
        return None
    try:  # the API's own lookup, remembered tokens included
        user, _ = await database_sync_to_async(TokenAuthentication().authenticate_credentials)(key.strip())
    except AuthenticationFailed:
        return INVALID_TOKEN
    return user
