"""The chatbot's settings, read lazily from `settings.CHATBOT` so tests can override them."""

from django.conf import settings


def chatbot_setting(name: str):
    return settings.CHATBOT[name]
