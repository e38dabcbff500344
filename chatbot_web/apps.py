from django.apps import AppConfig


class ChatbotWebConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "chatbot_web"
    verbose_name = "Chat page"
