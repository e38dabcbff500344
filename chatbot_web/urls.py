"""Everything the chat needs, under whatever prefix a site includes it at:

    path("assistant/", include("chatbot_web.urls"))

gives the page at /assistant/, the API at /assistant/api/, the OpenAI API at
/assistant/v1/ and the WebSocket at
/assistant/ws/chat/ (served by `chatbot_api.asgi.get_asgi_application`). Names are in the
`chatbot` namespace (`chatbot:chat`, `chatbot:api:chat`, ...).
"""

from django.urls import include, path
from django.views.i18n import JavaScriptCatalog, set_language

from . import views

app_name = "chatbot"
urlpatterns = [
    path("", views.chat_page, name="chat"),
    path("c/<str:session_id>", views.chat_page, name="conversation"),  # a link to one conversation
    path("api/", include("chatbot_api.urls")),
    path("v1/", include("chatbot_api.openai_api.urls")),  # the OpenAI API, for any OpenAI client
    path("ws/chat/", views.websocket_endpoint, name="websocket"),
    path("language/", set_language, name="set-language"),  # the settings panel's language choice
    # The page's JavaScript texts, in the language LocaleMiddleware picked for the request.
    path("jsi18n/", JavaScriptCatalog.as_view(packages=["chatbot_web"]), name="javascript-catalog"),
]
