"""Sign-in and sign-out pages for a site that has none (the demo project includes these).

A site with its own login keeps it: the chat page links to `settings.LOGIN_URL` and to the
URL named `logout`, whoever provides them.
"""

from django.contrib.auth import views as auth_views
from django.urls import path

from . import views

urlpatterns = [
    path("login/", views.ThrottledLoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
]
