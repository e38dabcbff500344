"""The provider registry: built-ins by name, a third-party provider found through its entry point."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test import AsyncClient

from chatbot_api import providers
from chatbot_api.providers.local import LocalProvider
from chatbot_api.providers.openai import OpenAIProvider

ROOT = Path(__file__).resolve().parents[1]


def test_the_built_ins_are_registered_by_name():
    assert {"openai", "local"} <= set(providers.provider_names())
    assert providers.provider_class("openai") is OpenAIProvider
    assert providers.provider_class("local") is LocalProvider


def test_an_unknown_provider_names_the_known_ones():
    with pytest.raises(
        ImproperlyConfigured, match=r"'nope' is not a registered provider: use one of .*local.*openai"
    ):
        providers.provider_class("nope")


@pytest.fixture
def echo_distribution(tmp_path, monkeypatch):
    """The example of docs/providers.md, installed as a real distribution with its entry point."""
    docs = (ROOT / "docs" / "providers.md").read_text()
    code = re.search(r"```python\n(.*?)```", docs, re.S).group(1)
    entry_point = re.search(r'\[project\.entry-points\."chatbot\.providers"\]\n(.*?)\n', docs).group(1)
    (tmp_path / "echo_plugin.py").write_text(code)
    info = tmp_path / "echo_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: echo-plugin\nVersion: 0.1\n")
    name, _, value = entry_point.partition("=")  # TOML's `echo = "module:Class"`, as pip writes it
    target = value.strip().strip('"')
    (info / "entry_points.txt").write_text(f"[chatbot.providers]\n{name.strip()} = {target}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    providers.reset_provider()
    yield
    providers.reset_provider()


@pytest.mark.django_db(transaction=True)
async def test_a_provider_from_an_installed_package_answers(echo_distribution, chatbot_settings, manager):
    chatbot_settings(PROVIDER="echo")

    response = await AsyncClient().post(
        "/api/chat/", {"message": "hello plugin world"}, content_type="application/json"
    )

    body = response.json()
    assert response.status_code == 200, body
    assert (body["response"], body["provider"], body["model"]) == ("hello plugin world ", "echo", "echo-1")
    assert body["usage"]["estimated"] is True


def test_an_unknown_setting_stops_the_start_with_the_valid_keys(tmp_path):
    (tmp_path / "typo_settings.py").write_text(
        textwrap.dedent(
            """
            from chatbot.settings_test import *  # noqa: F403
            CHATBOT = {"MAX_TOKEN": 5}
            """
        )
    )
    result = subprocess.run(
        [sys.executable, "-c", "import django; django.setup()"],
        cwd=ROOT,
        env={
            "PYTHONPATH": f"{tmp_path}:{ROOT}",
            "DJANGO_SETTINGS_MODULE": "typo_settings",
            "PATH": "/usr/bin",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode != 0
    assert (
        "Unknown CHATBOT setting(s): MAX_TOKEN. Valid keys:" in result.stderr
        and "MAX_TOKENS" in result.stderr
    )


def test_the_project_sets_only_what_the_environment_changes():
    from django.conf import settings

    from chatbot_api.conf import DEFAULTS, chatbot_setting

    assert set(settings.CHATBOT) <= set(DEFAULTS)
    assert chatbot_setting("MAX_TOKENS") == settings.CHATBOT.get("MAX_TOKENS", 150)
    with pytest.raises(KeyError, match="not a chatbot setting"):
        chatbot_setting("MAX_TOKEN")


def test_stop_scanner_cuts_at_the_first_stop_sequence_even_across_chunks():
    from chatbot_api.providers.base import StopScanner

    scanner = StopScanner(["END", "\n\n"])
    shown = [scanner.feed(piece) for piece in ["Hello E", "N", "D more"]]
    assert shown == [("Hello ", False), ("", False), ("", True)]  # "E", "EN" held back, never shown

    scanner = StopScanner(["END"])
    assert scanner.feed("a BE") == ("a B", False)
    assert scanner.feed("ND") == ("", True)

    scanner = StopScanner(["STOP", "ST"])
    assert scanner.feed("fir") == ("fir", False)
    assert scanner.feed("st: S") == ("st: ", False)  # "S" may start either sequence
    assert scanner.feed("Tx") == ("", True)  # "ST" comes first

    scanner = StopScanner(["END"])
    assert scanner.feed("the E") == ("the ", False)
    assert scanner.flush() == "E"  # the stream ended: what was held back is text after all
