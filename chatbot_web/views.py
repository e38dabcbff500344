from django.shortcuts import render
from django.views.decorators.csrf import ensure_csrf_cookie


@ensure_csrf_cookie
def chat_page(request):
    """The chat page; makes sure the browser has a session (it owns anonymous conversations)."""
    if not request.session.session_key:
        request.session.save()
    return render(request, "chatbot_web/chat.html")
