from django.contrib.auth import views as auth_views
from django.urls import path
from django.views.i18n import JavaScriptCatalog

from . import views

urlpatterns = [
    path("", views.chat_page, name="chat"),
    path("login/", views.ThrottledLoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    # The page's JavaScript texts, in the language LocaleMiddleware picked for the request.
    path("jsi18n/", JavaScriptCatalog.as_view(packages=["chatbot_web"]), name="javascript-catalog"),
]
