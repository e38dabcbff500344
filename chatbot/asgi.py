"""ASGI entry point: HTTP (Django), the chat WebSocket and lifespan (start-up sweep, graceful stop)."""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatbot.settings")

from chatbot_api.asgi import get_asgi_application

application = get_asgi_application()
