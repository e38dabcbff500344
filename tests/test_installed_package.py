"""The apps as a package, added to a new Django site the way the README says.

Builds the sdist and the wheel (from the sdist), installs the wheel into a fresh virtual
environment without the local-model extra, creates a project with `django-admin
startproject`, a custom user model and the chat under /assistant/, migrates, serves it under
uvicorn, and talks to it as clients do: SSE with an API token, the WebSocket with the page's
session, the page itself in Chromium. The model is a fake OpenAI server speaking the real
wire format. Nothing here imports the checkout's apps: the site only has what the wheel put
in its environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import httpx
import pytest
from websockets.sync.client import connect

from tests.browser.pages import answer_text, screenshot, send, wait_answer_finished, wait_ready
from tests.support.chromium import chromium
from tests.support.cluster import free_port, wait_for_port
from tests.support.fake_openai import FakeOpenAI, FakeOpenAIServer, Script
from tests.support.sse import TERMINAL, parse_sse

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "/assistant/"
INSTALL_TIMEOUT = 600  # the first run fetches the dependencies from the registry; later ones hit pip's cache
pytestmark = pytest.mark.timeout(INSTALL_TIMEOUT + 300)

SITE_SETTINGS = """

# --- Added the way README.md's "Add the chat to your Django site" says -------------------
INSTALLED_APPS += ["rest_framework", "rest_framework.authtoken", "accounts", "chatbot_api", "chatbot_web"]
AUTH_USER_MODEL = "accounts.User"
ASGI_APPLICATION = "site_project.asgi.application"
REST_FRAMEWORK = {"DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema"}
LOGIN_URL = "/accounts/login/"
TEMPLATES[0]["DIRS"] = [BASE_DIR / "templates"]
OPENAI_API_KEY = "sk-test-not-a-real-key"
OPENAI_BASE_URL = os.environ["UPSTREAM_URL"]
CHATBOT = {
    "PROVIDER": os.environ.get("SITE_PROVIDER", "openai"),
    "MODEL": "gpt-4.1-nano",
    "OPENAI_MAX_RETRIES": 0,
    "BASE_TEMPLATE": "site_base.html",
}
DEBUG = True  # static files from the apps' folders (staticfiles_urlpatterns), no collectstatic
"""

SITE_URLS = """
from django.contrib import admin
from django.contrib.staticfiles.urls import staticfiles_urlpatterns
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    path("assistant/", include("chatbot_web.urls")),
] + staticfiles_urlpatterns()
"""

SITE_ASGI = """
import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "site_project.settings")

from chatbot_api.asgi import get_asgi_application

application = get_asgi_application()
"""

SITE_BASE_TEMPLATE = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>{% block title %}{% endblock %} · Example site</title>
  {% block head %}{% endblock %}
</head>
<body class="{% block body_class %}{% endblock %}">
  <p id="site-banner" hidden>Example site</p>
  {% block body %}{% endblock %}
</body>
</html>
"""

USER_MODEL = """
from django.contrib.auth.models import AbstractUser
from django.db import models


class User(AbstractUser):
    nickname = models.CharField(max_length=50, blank=True)
"""


def run(*args, cwd=None, env=None, timeout=120):
    result = subprocess.run(
        [str(arg) for arg in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    dist = tmp_path_factory.mktemp("dist")
    # `python -m build` makes the sdist, then the wheel from the unpacked sdist: both must be complete.
    run(sys.executable, "-m", "build", "--outdir", dist, ROOT, timeout=INSTALL_TIMEOUT)
    (sdist,) = dist.glob("*.tar.gz")
    (built,) = dist.glob("*.whl")
    assert sdist.name.startswith("django_streaming_chatbot-")
    return built


def test_the_wheel_holds_the_apps_and_nothing_of_the_demo(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for expected in (
        "chatbot_api/migrations/0001_initial.py",
        "chatbot_web/templates/chatbot_web/chat.html",
        "chatbot_web/static/chatbot_web/conversation.js",
        "chatbot_web/static/chatbot_web/vendor/marked/marked.umd.js",
        "chatbot_web/locale/it/LC_MESSAGES/djangojs.mo",
    ):
        assert expected in names
    assert not [name for name in names if name.startswith(("chatbot/", "tests/", "bench/"))]
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "Classifier: Framework :: Django :: 5.2" in metadata
    assert "Provides-Extra: local" in metadata and "Provides-Extra: scale" in metadata
    assert "License-Expression: MIT" in metadata
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    assert not [line for line in requires if "llama" in line and "extra ==" not in line]
    for source in ("chatbot_api", "chatbot_web"):
        for path in (ROOT / source).rglob("*.py"):
            assert "chatbot.settings" not in path.read_text(), path


@pytest.fixture(scope="module")
def site(wheel, tmp_path_factory):
    """A new site in a fresh venv, served by uvicorn: yields (origin, upstream fake, environment)."""
    home = tmp_path_factory.mktemp("site")
    venv = home / "venv"
    run(sys.executable, "-m", "venv", venv)
    python = venv / "bin" / "python"
    pip_install = (python, "-m", "pip", "install", "--quiet")
    run(*pip_install, wheel, "uvicorn[standard]>=0.30,<1", timeout=INSTALL_TIMEOUT)
    assert "llama" not in run(python, "-m", "pip", "list").lower()  # no local extra, nothing compiled

    project = home / "project"
    project.mkdir()
    run(venv / "bin" / "django-admin", "startproject", "site_project", project)
    package = project / "site_project"
    settings = package / "settings.py"
    settings.write_text("import os\n" + settings.read_text() + SITE_SETTINGS)
    (package / "urls.py").write_text(SITE_URLS)
    (package / "asgi.py").write_text(SITE_ASGI)
    (project / "templates").mkdir()
    (project / "templates" / "site_base.html").write_text(SITE_BASE_TEMPLATE)
    accounts = project / "accounts"
    (accounts / "migrations").mkdir(parents=True)
    (accounts / "__init__.py").write_text("")
    (accounts / "migrations" / "__init__.py").write_text("")
    (accounts / "models.py").write_text(USER_MODEL)

    with FakeOpenAIServer(FakeOpenAI()) as upstream:
        env = {key: value for key, value in os.environ.items() if not key.startswith(("DJANGO_", "CHATBOT_"))}
        env |= {"UPSTREAM_URL": upstream.url, "PYTHONPATH": ""}  # the checkout is not on the path
        manage = (python, project / "manage.py")
        run(*manage, "makemigrations", "accounts", cwd=project, env=env)
        run(*manage, "migrate", "--noinput", cwd=project, env=env)
        create_user = (
            "from django.contrib.auth import get_user_model; "
            "from rest_framework.authtoken.models import Token; "
            "u = get_user_model().objects.create_user('ada', password='pw-for-tests', nickname='Ada'); "
            "print(Token.objects.create(user=u).key)"
        )
        token = run(*manage, "shell", "-c", create_user, cwd=project, env=env).strip().splitlines()[-1]

        port = free_port()
        server = subprocess.Popen(
            [python, "-m", "uvicorn", "site_project.asgi:application", "--host", "127.0.0.1",
             "--port", str(port), "--lifespan", "on", "--log-level", "warning"],  # fmt: skip
            cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        try:
            wait_for_port(port, timeout=60, process=server)
            yield {
                "origin": f"http://127.0.0.1:{port}",
                "upstream": upstream.fake,
                "token": token,
                "manage": manage,
                "project": project,
                "env": env,
            }
        finally:
            server.terminate()
            try:
                output, _ = server.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                server.kill()
                output, _ = server.communicate()
            assert "Traceback" not in output, output


def test_the_sites_checks_name_a_missing_extra_with_its_install_command(site):
    run(*site["manage"], "check", cwd=site["project"], env=site["env"])
    result = subprocess.run(
        [str(part) for part in (*site["manage"], "check")],
        cwd=site["project"], env={**site["env"], "SITE_PROVIDER": "local"}, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode != 0
    assert 'pip install "django-streaming-chatbot[local]"' in result.stderr


def test_a_token_client_streams_an_answer_over_sse_under_the_prefix(site):
    site["upstream"].enqueue(Script(chunks=["Hello", " from", " the", " site."]))
    headers = {"Authorization": f"Token {site['token']}", "Accept": "text/event-stream"}

    with httpx.Client(base_url=site["origin"], timeout=20) as client:
        body = {"message": "Hi", "streaming": True}
        response = client.post(f"{PREFIX}api/chat/", json=body, headers=headers)
        assert response.status_code == 200, response.text
        frames = parse_sse(response.content)
        events = [frame["data"] for frame in frames]
        assert [event["type"] for event in events if event["type"] in TERMINAL] == ["done"]
        text = "".join(event["text"] for event in events if event["type"] == "delta")
        assert text == "Hello from the site."

        auth = {"Authorization": headers["Authorization"]}
        conversations = client.get(f"{PREFIX}api/conversations/", headers=auth)
        assert [c["session_id"] for c in conversations.json()] == [events[0]["session_id"]]
        schema = client.get(f"{PREFIX}api/schema/", headers={"Accept": "application/json"}).json()
        assert schema["paths"] and all(
            path.startswith((f"{PREFIX}api/", f"{PREFIX}v1/")) for path in schema["paths"]
        )


def test_the_page_session_streams_over_the_websocket_under_the_prefix(site):
    site["upstream"].enqueue(Script(chunks=["Over", " the", " socket."]))
    origin = site["origin"]
    with httpx.Client(base_url=origin, timeout=20) as client:
        page = client.get(PREFIX)
        assert page.status_code == 200
        assert f'data-ws-path="{PREFIX}ws/chat/"' in page.text
        assert 'id="site-banner"' in page.text  # the page is in the site's own layout
        cookies = "; ".join(f"{name}={value}" for name, value in client.cookies.items())
        assert client.get(f"{PREFIX}ws/chat/").status_code == 426  # plain HTTP is told to upgrade

    url = f"ws://127.0.0.1:{origin.rsplit(':', 1)[1]}{PREFIX}ws/chat/"
    with connect(url, additional_headers={"Cookie": cookies, "Origin": origin}, open_timeout=10) as socket:
        socket.send(json.dumps({"type": "chat", "message": "Hi", "request_id": "r1"}))
        events, deadline = [], time.monotonic() + 20
        while not events or events[-1].get("type") not in TERMINAL:
            events.append(json.loads(socket.recv(timeout=max(0.1, deadline - time.monotonic()))))
    assert events[-1]["type"] == "done" and events[-1]["status"] == "complete"
    assert "".join(event["text"] for event in events if event["type"] == "delta") == "Over the socket."


def test_a_websocket_elsewhere_on_the_site_is_refused(site):
    url = f"ws://127.0.0.1:{site['origin'].rsplit(':', 1)[1]}/ws/chat/"  # not under the prefix
    with pytest.raises(Exception, match="403|4404|rejected"):
        with connect(url, additional_headers={"Origin": site["origin"]}, open_timeout=10) as socket:
            socket.recv(timeout=5)


def test_the_page_streams_in_chromium_under_the_prefix(site):
    site["upstream"].enqueue(Script(chunks=["Rendered", " in", " **Chromium**."], interval=0.05))
    with chromium() as browser:
        context = browser.new_context(locale="en-US")
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        # Every request the page makes must succeed (the browser's own /favicon.ico is the site's business).
        page.on(
            "response",
            lambda response: (
                response.status >= 400
                and not response.url.endswith("/favicon.ico")
                and errors.append(f"{response.status} {response.url}")
            ),
        )

        page.goto(site["origin"] + PREFIX)
        wait_ready(page)
        send(page, "Hello", streaming=True)
        wait_answer_finished(page)

        assert answer_text(page) == "Rendered in Chromium."
        assert page.locator(".message-assistant").last.get_attribute("data-status") == "complete"
        page.reload()
        wait_ready(page)
        page.wait_for_selector(".message-assistant")  # back from the API under the prefix
        assert page.locator(".conversation").count() == 1
        screenshot(page, "installed-package-site")
        context.close()
    assert errors == []


def test_the_site_user_model_owns_the_conversations(site):
    count = textwrap.dedent(
        """
        from chatbot_api.models import Conversation
        print(sorted({type(c.user).__name__ for c in Conversation.objects.exclude(user=None)}))
        """
    )
    output = run(*site["manage"], "shell", "-c", count, cwd=site["project"], env=site["env"])
    assert "['User']" in output
    label = "from django.contrib.auth import get_user_model; print(get_user_model()._meta.app_label)"
    assert "accounts" in run(*site["manage"], "shell", "-c", label, cwd=site["project"], env=site["env"])


def test_the_installed_terminal_client_lists_the_conversations(site):
    chat = Path(site["manage"][0]).parent / "chatbot-chat"
    output = run(chat, "--url", site["origin"] + PREFIX, "--token", site["token"], "--list", env=site["env"])
    assert "Hi" in output  # the conversation the SSE test started, under the prefix
