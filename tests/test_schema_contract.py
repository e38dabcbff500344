"""The OpenAPI schema is exact: schemathesis, a tool nobody here wrote, generates requests for
every operation from `/api/schema/` and checks the whole product's answers against it, as a
token client and as a browser (session cookie + CSRF): no server error, no undocumented
status code, no response, header or SSE event that breaks its schema. Bounded examples
and a fixed seed keep it short and repeatable."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest
from rest_framework.authtoken.models import Token

EXAMPLES = "12"
CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_schema_conformance",
        "response_headers_conformance",
    ]
)


@pytest.fixture
def contract_server(live_server_url, upstream, chatbot_settings):
    # Limits off: a run would otherwise spend most examples on (documented) 429s.
    chatbot_settings(REQUESTS_PER_MINUTE=0, CONCURRENT_STREAMS=0, TOKENS_PER_DAY=0)
    return live_server_url


def schemathesis(origin: str, *headers: str, cwd) -> subprocess.CompletedProcess:
    st = os.path.join(os.path.dirname(sys.executable), "st")
    command = [st, "run", f"{origin}/api/schema/", "--url", origin, "--checks", CHECKS,
               "--max-examples", EXAMPLES, "--seed", "20261202", "--no-color"]  # fmt: skip
    for header in headers:
        command += ["-H", header]
    # Its cache of past failures goes to the temporary directory, not the checkout.
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=cwd)


def test_the_schema_holds_for_a_token_client(contract_server, django_user_model, tmp_path):
    user = django_user_model.objects.create_user("schema", password="pw-for-tests")
    token = Token.objects.create(user=user).key

    result = schemathesis(contract_server, f"Authorization: Token {token}", cwd=tmp_path)

    assert result.returncode == 0, result.stdout[-6000:]
    assert "passed" in result.stdout


def test_the_schema_holds_for_a_browser_session_with_csrf(contract_server, tmp_path):
    with httpx.Client(base_url=contract_server) as browser:
        browser.get("/").raise_for_status()  # the page starts the session and sets the CSRF cookie
        session, csrf = browser.cookies["sessionid"], browser.cookies["csrftoken"]

    cookies = f"Cookie: sessionid={session}; csrftoken={csrf}"
    result = schemathesis(contract_server, cookies, f"X-CSRFToken: {csrf}", cwd=tmp_path)

    assert result.returncode == 0, result.stdout[-6000:]
    assert "passed" in result.stdout


@pytest.mark.django_db
def test_the_schema_states_what_the_server_enforces(client):
    schema = client.get("/api/schema/", headers={"Accept": "application/json"}).json()
    components, paths = schema["components"]["schemas"], schema["paths"]

    message = components["ChatRequest"]["properties"]["message"]
    assert (message["minLength"], message["maxLength"], message["pattern"]) == (1, 1000, r"\S")
    assert components["ConversationUpdate"]["required"] == ["title"]
    patch = paths["/api/conversations/{session_id}"]["patch"]["requestBody"]["content"]["application/json"]
    assert patch["schema"]["$ref"].endswith("/ConversationUpdate")
    events = paths["/api/messages/{message_id}/events"]["get"]
    last_event_id = next(p for p in events["parameters"] if p["name"] == "Last-Event-ID")
    assert last_event_id["schema"] == {"type": "integer", "minimum": 0}
    sse = events["responses"]["200"]["content"]["text/event-stream"]["schema"]
    assert sse["required"] == ["data"] and sse["properties"]["data"]["contentSchema"]["$ref"].endswith(
        "/StreamEvent"
    )
    for path, operations in paths.items():
        for method, operation in operations.items():
            assert {"401", "403", "503"} <= set(operation["responses"]), (method, path)
            assert "format" not in {p["name"] for p in operation.get("parameters", [])}
            assert {} in operation["security"]  # anonymous use is on by default
    assert "400" in paths["/api/conversations/{session_id}"]["patch"]["responses"]
    assert "404" in paths["/api/messages/{message_id}/stop"]["post"]["responses"]
