from django.urls import path

from . import views

app_name = "openai"
urlpatterns = [
    path("chat/completions", views.ChatCompletionsView.as_view(), name="chat-completions"),
    path("chat/completions/<str:completion_id>", views.CompletionDetailView.as_view(), name="completion"),
    path("models", views.ModelListView.as_view(), name="models"),
    path("models/<path:model_id>", views.ModelDetailView.as_view(), name="model"),
]
