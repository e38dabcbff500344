"""The chat page, its translations, the sign-in page and the vendored libraries (no browser)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command

pytestmark = pytest.mark.django_db

APP = Path(__file__).resolve().parents[1] / "chatbot_web"
STATIC = APP / "static" / "chatbot_web"
LOCALE = APP / "locale"


@pytest.fixture(autouse=True)
def plain_static_files(settings):
    """Static URLs by plain names: the tests run without `collectstatic`'s manifest."""
    settings.STORAGES = {
        **settings.STORAGES,
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    }


def test_page_has_the_seeds_controls_and_a_csrf_cookie(client):
    response = client.get("/")

    assert response.status_code == 200
    assert "csrftoken" in response.cookies
    assert client.session.session_key  # anonymous conversations belong to this session
    html = response.content.decode()
    assert re.search(
        r'<label class="streaming-toggle">\s*<input type="checkbox" id="streamingCheckbox" />\s*'
        r'<span class="streaming-label">📡 Streaming</span>',
        html,
    )
    assert 'data-max-length="1000"' in html
    assert 'data-api-root="/api/"' in html
    assert 'aria-live="polite"' in html
    assert '<script type="module" src="/static/chatbot_web/chat.js">' in html
    assert '"chatbot/api": "/static/chatbot_web/chat-api.js"' in html
    for vendored in ("marked/marked.umd.js", "dompurify/purify.min.js", "highlightjs/highlight.min.js"):
        assert f"/static/chatbot_web/vendor/{vendored}" in html
    assert 'src="/jsi18n/"' in html
    assert 'href="/login/?next=/"' in html


def test_page_speaks_the_browsers_language(client):
    italian = client.get("/", HTTP_ACCEPT_LANGUAGE="it-IT,it;q=0.9,en;q=0.5").content.decode()
    english = client.get("/", HTTP_ACCEPT_LANGUAGE="en-US,en;q=0.9").content.decode()

    assert '<html lang="it">' in italian and "Nuova chat" in italian and "Scrivi un messaggio…" in italian
    assert '<html lang="en">' in english and "New chat" in english and "Write a message…" in english


def test_javascript_catalogue_has_the_seeds_italian_loading_texts(client):
    italian = client.get("/jsi18n/", HTTP_ACCEPT_LANGUAGE="it").content.decode()
    english = client.get("/jsi18n/", HTTP_ACCEPT_LANGUAGE="en").content.decode()

    assert "L'assistente sta pensando..." in italian or "L\\u0027assistente sta pensando..." in italian
    assert "\\ud83d\\udce1 Streaming in corso..." in italian or "📡 Streaming in corso..." in italian
    assert "Troppe richieste, riprova tra %s s." in italian
    assert "pensando" not in english


def test_signed_in_user_is_shown_with_a_sign_out_button(client):
    get_user_model().objects.create_user("ada", password="correct horse battery")

    response = client.post("/login/", {"username": "ada", "password": "correct horse battery"})
    assert response.status_code == 302 and response.url == "/"
    html = client.get("/").content.decode()
    assert "👤 ada" in html
    assert re.search(r'<form method="post" action="/logout/"', html)
    assert "/login/" not in html

    response = client.post("/logout/")
    assert response.status_code == 302
    assert "👤" not in client.get("/").content.decode()


def test_login_page_is_in_the_apps_style_and_translated(client):
    english = client.get("/login/?next=/")
    italian = client.get("/login/", HTTP_ACCEPT_LANGUAGE="it")

    assert english.status_code == 200
    html = english.content.decode()
    assert "/static/chatbot_web/chat.css" in html
    assert 'name="username"' in html and 'name="password"' in html and 'name="next" value="/"' in html
    assert "Sign in" in html
    assert "Accedi" in italian.content.decode()


def test_wrong_password_is_explained(client):
    response = client.post("/login/", {"username": "nobody", "password": "wrong"})

    assert response.status_code == 200
    assert 'class="form-error" role="alert"' in response.content.decode()


def test_page_asks_to_sign_in_when_anonymous_use_is_off(client, settings):
    settings.CHATBOT = {**settings.CHATBOT, "ALLOW_ANONYMOUS": False}

    response = client.get("/")

    assert response.status_code == 302
    assert response.url == "/login/?next=/"


@pytest.mark.parametrize(
    ("folder", "files"),
    [
        ("marked", ["marked.umd.js", "marked.umd.js.map", "LICENSE"]),
        ("dompurify", ["purify.min.js", "purify.min.js.map", "LICENSE", "LICENSE-MPL"]),
        (
            "highlightjs",
            ["highlight.min.js", "LICENSE", "styles/github.min.css", "styles/github-dark.min.css"],
        ),
    ],
)
def test_vendored_libraries_come_with_their_licences(folder, files):
    for name in files:
        assert (STATIC / "vendor" / folder / name).is_file(), f"{folder}/{name} is missing"


def test_vendor_readme_matches_the_vendored_versions():
    readme = (STATIC / "vendor" / "README.md").read_text()
    headers = {
        "marked": (STATIC / "vendor/marked/marked.umd.js").read_text()[:300],
        "DOMPurify": (STATIC / "vendor/dompurify/purify.min.js").read_text()[:300],
        "highlight.js": (STATIC / "vendor/highlightjs/highlight.min.js").read_text()[:300],
    }
    for name, header in headers.items():
        version = re.search(r"(\d+\.\d+\.\d+)", header).group(1)
        assert re.search(rf"\[{re.escape(name)}\].*\| {re.escape(version)} \|", readme), (name, version)


def test_every_javascript_text_is_in_the_italian_catalogue():
    source = "\n".join(path.read_text() for path in STATIC.glob("*.js"))  # the page's own modules
    texts = set(re.findall(r'\bn?gettext\(\s*"((?:[^"\\]|\\.)*)"', source))
    catalogue = (LOCALE / "it/LC_MESSAGES/djangojs.po").read_text()
    missing = [text for text in texts if f'msgid "{text}"' not in catalogue.replace('"\n"', "")]
    assert texts and not missing
    assert 'msgstr ""\n\n' not in catalogue.split("\n\n", 1)[1] + "\n\n"  # every text translated


@pytest.mark.skipif(shutil.which("msgfmt") is None, reason="needs GNU gettext's msgfmt")
@pytest.mark.parametrize("domain", ["django", "djangojs"])
def test_compiled_catalogues_are_up_to_date(domain, tmp_path):
    """The committed .mo files are what `compilemessages` makes of the .po files."""
    po = LOCALE / f"it/LC_MESSAGES/{domain}.po"
    compiled = tmp_path / f"{domain}.mo"
    subprocess.run(["msgfmt", "--check", "-o", str(compiled), str(po)], check=True, capture_output=True)
    assert compiled.read_bytes() == po.with_suffix(".mo").read_bytes(), "run `manage.py compilemessages`"


def test_collectstatic_with_the_manifest_storage_serves_the_page(client, settings, tmp_path):
    """Deployment: hashed names for every file, including the module that chat.js imports."""
    settings.STATIC_ROOT = tmp_path
    settings.STORAGES = {
        **settings.STORAGES,
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.ManifestStaticFilesStorage"},
    }
    call_command("collectstatic", interactive=False, verbosity=0)

    html = client.get("/").content.decode()
    modules = re.findall(r'"chatbot/[\w-]+": "/static/([^"]+)"', html)
    assert {"chatbot_web/chat-api", "chatbot_web/conversation", "chatbot_web/chat-views"} <= {
        re.sub(r"\.[0-9a-f]{12}\.js$", "", path) for path in modules
    }
    for path in modules:
        assert re.search(r"\.[0-9a-f]{12}\.js$", path) and (tmp_path / path).is_file(), path
    assert re.search(r'src="/static/chatbot_web/chat\.[0-9a-f]{12}\.js"', html)
