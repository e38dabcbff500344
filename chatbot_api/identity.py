"""Who owns what: the signed-in user, or else the browser session."""

from __future__ import annotations

from rest_framework.exceptions import NotAuthenticated

from .conf import chatbot_setting
from .selectors import Owner


async def owner_for(request) -> Owner:
    """The owner of the request's conversations; starts a session for a new anonymous visitor."""
    user = request.user
    if user is not None and user.is_authenticated:
        return Owner(user_id=user.pk)
    if not chatbot_setting("ALLOW_ANONYMOUS"):
        raise NotAuthenticated("Sign in to use the chatbot.")
    session = request.session
    if not session.session_key:
        await session.asave()
    return Owner(session_key=session.session_key)


async def owner_for_scope(scope) -> Owner | None:
    """The same for a WebSocket: the user, else the session the page's cookie carries."""
    user = scope.get("user")
    if user is not None and user.is_authenticated:
        return Owner(user_id=user.pk)
    if not chatbot_setting("ALLOW_ANONYMOUS"):
        return None
    session = scope.get("session")
    if session is None:
        return None
    if not session.session_key:
        await session.asave()
    return Owner(session_key=session.session_key)
