"""The sign-in page looks like the app, and signing in shows who is signed in."""

from __future__ import annotations

import re

import pytest
from django.contrib.auth import get_user_model
from playwright.sync_api import expect

from tests.browser.pages import DESKTOP, PHONE, screenshot, wait_ready

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def show_account(page) -> None:
    """On a phone the account links are in the drawer."""
    toggle = page.locator("#sidebarToggle")
    if toggle.is_visible():
        toggle.click()
        expect(page.locator("#sidebar")).to_be_visible()


@pytest.mark.parametrize(
    ("viewport", "color_scheme", "locale", "sign_in"),
    [(DESKTOP, "light", "en-US", "Sign in"), (PHONE, "dark", "it-IT", "Accedi")],
    ids=["desktop-light-en", "phone-dark-it"],
)
def test_sign_in_and_out(open_page, viewport, color_scheme, locale, sign_in):
    get_user_model().objects.create_user("ada", password="correct horse battery")
    page = open_page(viewport=viewport, color_scheme=color_scheme, locale=locale)

    show_account(page)
    page.get_by_role("link", name=sign_in).click()
    expect(page).to_have_url(re.compile(r"/login/\?next=/$"))
    page.fill("input[name=username]", "ada")
    page.fill("input[name=password]", "wrong")
    page.click("button[type=submit]")
    expect(page.locator(".form-error")).to_be_visible()
    screenshot(page, f"login-{color_scheme}-{locale}")

    page.fill("input[name=password]", "correct horse battery")
    page.click("button[type=submit]")
    wait_ready(page)
    show_account(page)
    expect(page.locator(".account-user")).to_have_text("👤 ada")
    page.click(".logout-form button")
    wait_ready(page)
    show_account(page)
    expect(page.get_by_role("link", name=sign_in)).to_be_visible()
