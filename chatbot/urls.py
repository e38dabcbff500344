from django.contrib import admin
from django.urls import include, path

from chatbot_api.metrics import metrics_view

urlpatterns = [
    path("admin/", admin.site.urls),
    path("metrics", metrics_view, name="metrics"),
    path("", include("chatbot_web.auth_urls")),
    path("", include("chatbot_web.urls")),
]

handler404 = "chatbot_api.errors.json_not_found"
handler500 = "chatbot_api.errors.json_server_error"
