"""The ASGI application a site serves: Django for HTTP, the chat WebSocket, and the lifespan.

In a site's `asgi.py`, after setting DJANGO_SETTINGS_MODULE:

    from chatbot_api.asgi import get_asgi_application

    application = get_asgi_application()

The WebSocket is found where the site's URLconf put the chat (`include("chatbot_web.urls")`
under any prefix has `<prefix>ws/chat/`), so no second routing table has to agree with it.
"""

from __future__ import annotations

from django.core.asgi import get_asgi_application as get_django_asgi_application

WEBSOCKET_CLOSE_NOT_FOUND = 4404  # an application close code: no WebSocket at this path


def get_asgi_application(http_application=None):
    """HTTP (the site's Django app unless given, behind load shedding), the chat WebSocket, lifespan."""
    http_application = http_application or get_django_asgi_application()  # sets Django up first

    from channels.auth import AuthMiddlewareStack
    from channels.routing import ProtocolTypeRouter
    from channels.security.websocket import AllowedHostsOriginValidator

    from .admission import AnswerAdmission
    from .lifespan import LifespanMiddleware

    gate = AnswerAdmission(http_application)  # one count of starting answers for both protocols
    return LifespanMiddleware(
        ProtocolTypeRouter(
            {
                "http": gate,
                "websocket": AllowedHostsOriginValidator(AuthMiddlewareStack(ChatWebSocketRouter(gate))),
            }
        )
    )


class ChatWebSocketRouter:
    """Routes a WebSocket to the chat consumer when the URLconf names its path `websocket`.

    The consumer gets the HTTP side's load-shedding gate in its scope (`admission.GATE`)."""

    def __init__(self, gate=None) -> None:
        from .admission import GATE
        from .consumers import ChatConsumer

        self.consumer = ChatConsumer.as_asgi()
        self.gate_scope = {GATE: gate}

    async def __call__(self, scope, receive, send):
        from django.urls import Resolver404, resolve

        path = scope["path"]
        root_path = scope.get("root_path", "")
        if root_path and path.startswith(root_path):
            path = path[len(root_path) :]
        try:
            match = resolve(path)
        except Resolver404:
            match = None
        if match is None or not getattr(match.func, "chatbot_websocket", False):
            await receive()  # websocket.connect
            await send({"type": "websocket.close", "code": WEBSOCKET_CLOSE_NOT_FOUND})
            return
        await self.consumer({**scope, **self.gate_scope}, receive, send)
