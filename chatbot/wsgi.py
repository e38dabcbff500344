"""WSGI entry point, for management tooling only: answers stream under ASGI (chatbot.asgi)."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatbot.settings")
application = get_wsgi_application()
