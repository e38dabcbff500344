"""The chat page. Everything else the page needs comes from the JSON API (`chatbot_api`)."""

from django import forms
from django.contrib.auth.forms import AuthenticationForm
from django.contrib.auth.views import LoginView, redirect_to_login
from django.shortcuts import render
from django.urls import reverse
from django.views.decorators.csrf import ensure_csrf_cookie

from chatbot_api import login_throttle
from chatbot_api.conf import chatbot_setting
from chatbot_api.serializers import ChatRequestSerializer

# The page enforces the API's limit before sending, so it reads it from the API's own serializer.
MAX_MESSAGE_LENGTH = ChatRequestSerializer().fields["message"].max_length


@ensure_csrf_cookie
def chat_page(request):
    """The chat page; makes sure the browser has a session (it owns anonymous conversations)."""
    if not request.user.is_authenticated and not chatbot_setting("ALLOW_ANONYMOUS"):
        return redirect_to_login(request.get_full_path())
    if not request.session.session_key:
        request.session.save()
    api_root = reverse("api:conversation-list").removesuffix("conversations/")
    return render(
        request,
        "chatbot_web/chat.html",
        {
            "user": request.user,
            "api_root": api_root,
            "max_message_length": MAX_MESSAGE_LENGTH,
        },
    )


class ThrottledAuthenticationForm(AuthenticationForm):
    """The login form, saying so when sign-ins are throttled instead of "wrong password"."""

    def clean(self):
        try:
            login_throttle.check(self.request, self.data.get("username"))
        except login_throttle.LoginThrottled as throttled:
            raise forms.ValidationError(str(throttled.args[0]), code="throttled") from None
        return super().clean()


class ThrottledLoginView(LoginView):
    form_class = ThrottledAuthenticationForm
