"""Django's middlewares with their hooks run on the event loop, not one thread hop each.

Under ASGI, `MiddlewareMixin` runs every `process_request`/`process_response` (and the
handler every `process_view`) through `sync_to_async`: eight middlewares are about
twenty thread hops per request, on the path of every answer's first token. The hooks
of these middlewares only read the request and set headers and cookies, so they run
inline; the one that can touch the database, the session's save, still runs on a
thread, and so does a message store that has something to write. Under WSGI, and for
any hook not listed here, they are Django's own.

    MIDDLEWARE = [
        "chatbot_api.middleware.SecurityMiddleware",
        "chatbot_api.middleware.SessionMiddleware",
        ...
    ]
"""

from __future__ import annotations

from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth import middleware as auth
from django.contrib.messages import middleware as messages
from django.contrib.sessions import middleware as sessions
from django.middleware import clickjacking, common, csrf, locale, security


class InlineHooks:
    """`__acall__` that calls the hooks directly; `response_needs_thread()` names the exceptions,
    `runs_inline()` False leaves a configuration to Django's own path."""

    def __init__(self, get_response):
        super().__init__(get_response)
        if self.async_mode and hasattr(self, "process_view") and self.runs_inline():
            sync_process_view = self.process_view

            async def process_view(request, view_func, view_args, view_kwargs):
                return sync_process_view(request, view_func, view_args, view_kwargs)

            self.process_view = process_view  # the handler runs a coroutine function as is

    async def __acall__(self, request):
        if not self.runs_inline():
            return await super().__acall__(request)  # MiddlewareMixin's: a hop per hook
        response = None
        if hasattr(self, "process_request"):
            response = self.process_request(request)
        response = response or await self.get_response(request)
        if hasattr(self, "process_response"):
            if self.response_needs_thread(request, response):
                return await sync_to_async(self.process_response, thread_sensitive=True)(request, response)
            response = self.process_response(request, response)
        return response

    def response_needs_thread(self, request, response) -> bool:
        return False

    def runs_inline(self) -> bool:
        return True


class SecurityMiddleware(InlineHooks, security.SecurityMiddleware):
    pass


class SessionMiddleware(InlineHooks, sessions.SessionMiddleware):
    def response_needs_thread(self, request, response) -> bool:
        # Only a save queries (and a save's expiry check may load the session first).
        session = getattr(request, "session", None)
        return session is not None and (session.modified or settings.SESSION_SAVE_EVERY_REQUEST)


class LocaleMiddleware(InlineHooks, locale.LocaleMiddleware):
    pass


class CommonMiddleware(InlineHooks, common.CommonMiddleware):
    pass


class CsrfViewMiddleware(InlineHooks, csrf.CsrfViewMiddleware):
    def runs_inline(self) -> bool:
        # With CSRF_USE_SESSIONS the token lives in the session, which a hook may have to load.
        return not settings.CSRF_USE_SESSIONS


class AuthenticationMiddleware(InlineHooks, auth.AuthenticationMiddleware):
    pass  # request.user stays lazy: whoever reads it does so on a thread (DRF, views)


class MessageMiddleware(InlineHooks, messages.MessageMiddleware):
    def response_needs_thread(self, request, response) -> bool:
        # Storing messages may fall back to the session, which may have to be loaded.
        store = getattr(request, "_messages", None)
        return store is not None and (store.used or store.added_new)


class XFrameOptionsMiddleware(InlineHooks, clickjacking.XFrameOptionsMiddleware):
    pass
