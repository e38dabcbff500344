from django.apps import AppConfig


class ChatbotApiConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "chatbot_api"
    verbose_name = "Chatbot"

    def ready(self):
        from . import checks, signals  # noqa: F401  (system checks; hooks that reset cached clients)
