"""The chat page. Everything else the page needs comes from the JSON API (`chatbot_api`)."""

from django import forms
from django.conf import settings
from django.contrib.auth.forms import AuthenticationForm
from django.contrib.auth.views import LoginView, redirect_to_login
from django.http import JsonResponse
from django.shortcuts import render, resolve_url
from django.urls import NoReverseMatch, reverse
from django.utils.decorators import method_decorator
from django.views.decorators.csrf import ensure_csrf_cookie

from chatbot_api import login_throttle
from chatbot_api.conf import chatbot_setting
from chatbot_api.errors import error_body
from chatbot_api.serializers import ChatRequestSerializer

from .csp import content_security_policy

# The page enforces the API's limit before sending, so it reads it from the API's own serializer.
MAX_MESSAGE_LENGTH = ChatRequestSerializer().fields["message"].max_length


@ensure_csrf_cookie
@content_security_policy
def chat_page(request, session_id=None):
    """The chat page, at a conversation's link (`c/<session_id>`) or a new chat; makes sure
    the browser has a session (it owns anonymous conversations)."""
    if not request.user.is_authenticated and not chatbot_setting("ALLOW_ANONYMOUS"):
        return redirect_to_login(request.get_full_path())
    if not request.session.session_key:
        request.session.save()
    api_root = reverse("chatbot:api:conversation-list").removesuffix("conversations/")
    return render(
        request,
        "chatbot_web/chat.html",
        {
            **page_context(request),
            "api_root": api_root,
            "page_root": reverse("chatbot:chat"),
            "session_id": session_id or "",
            "max_message_length": MAX_MESSAGE_LENGTH,
        },
    )


THEME_COOKIE = "chatbot_theme"  # set by the page's theme setting (chat.js)
THEMES = ("light", "dark")


def page_context(request) -> dict:
    """What every chatbot page's template needs: its layout, its theme, the site's sign-in/out URLs."""
    theme = request.COOKIES.get(THEME_COOKIE)
    return {
        "base_template": chatbot_setting("BASE_TEMPLATE"),
        "theme": theme if theme in THEMES else "",
        "login_url": resolve_url(settings.LOGIN_URL),
        "logout_url": _logout_url(),
    }


def _logout_url() -> str | None:
    """The site's `logout` URL if it has one; else the page shows no sign-out button."""
    try:
        return reverse("logout")
    except NoReverseMatch:
        return None


def websocket_endpoint(request):
    """`ws/chat/` asked for over plain HTTP: the chat WebSocket lives here (chatbot_api.asgi)."""
    return JsonResponse(
        error_body("This URL is the chat's WebSocket: connect with a WebSocket client.", "upgrade_required"),
        status=426,
        headers={"Upgrade": "websocket", "Connection": "Upgrade"},
    )


websocket_endpoint.chatbot_websocket = True  # how chatbot_api.asgi finds the path in the URLconf


class ThrottledAuthenticationForm(AuthenticationForm):
    """The login form, saying so when sign-ins are throttled instead of "wrong password"."""

    def clean(self):
        try:
            login_throttle.check(self.request, self.data.get("username"))
        except login_throttle.LoginThrottled as throttled:
            raise forms.ValidationError(str(throttled.args[0]), code="throttled") from None
        return super().clean()


@method_decorator(content_security_policy, name="dispatch")
class ThrottledLoginView(LoginView):
    """The demo project's sign-in page (a site keeps its own)."""

    form_class = ThrottledAuthenticationForm
    template_name = "chatbot_web/login.html"

    def get_context_data(self, **kwargs):
        return {**super().get_context_data(**kwargs), **page_context(self.request)}
