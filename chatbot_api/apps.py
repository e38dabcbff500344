from django.apps import AppConfig


class ChatbotApiConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "chatbot_api"
    verbose_name = "Chatbot"

    def ready(self):
        # System checks, the OpenAPI auth extension, and hooks that reset cached clients and lookups.
        from . import checks, conf, lookups, schema, signals  # noqa: F401

        conf.validate()  # an unknown CHATBOT key stops the process here, with the valid ones
