from rest_framework.permissions import BasePermission

from .conf import chatbot_setting


class ChatAccess(BasePermission):
    """Signed-in users always; anonymous visitors unless `CHATBOT_ALLOW_ANONYMOUS` is off."""

    message = "Sign in to use the chatbot."

    def has_permission(self, request, view):
        return bool(request.user and request.user.is_authenticated) or chatbot_setting("ALLOW_ANONYMOUS")
