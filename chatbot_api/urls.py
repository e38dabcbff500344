from django.urls import path

from . import views

app_name = "api"
urlpatterns = [
    path("chat/", views.ChatView.as_view(), name="chat"),
    path("messages/<str:message_id>", views.MessageDetailView.as_view(), name="message-detail"),
    path("messages/<str:message_id>/events", views.MessageEventsView.as_view(), name="message-events"),
    path("messages/<str:message_id>/stop", views.MessageStopView.as_view(), name="message-stop"),
    path(
        "messages/<str:message_id>/regenerate",
        views.MessageRegenerateView.as_view(),
        name="message-regenerate",
    ),
    path("messages/<str:message_id>/continue", views.MessageContinueView.as_view(), name="message-continue"),
    path("messages/<str:message_id>/edit", views.MessageEditView.as_view(), name="message-edit"),
    path("conversations/", views.ConversationListView.as_view(), name="conversation-list"),
    path(
        "conversations/<str:session_id>", views.ConversationDetailView.as_view(), name="conversation-detail"
    ),
    path(
        "conversations/<str:session_id>/export",
        views.ConversationExportView.as_view(),
        name="conversation-export",
    ),
    path("models/", views.ModelsView.as_view(), name="models"),
    path("usage/", views.UsageView.as_view(), name="usage"),
    path("token/", views.TokenView.as_view(), name="token"),
    path("schema/", views.SchemaView.as_view(), name="schema"),
]
