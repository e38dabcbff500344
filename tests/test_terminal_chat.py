"""`python manage.py chat` in a real pseudo-terminal (pexpect), against the whole product
under uvicorn: the answer streams as it is written, Ctrl-C stops it and only a second
Ctrl-C quits, a dropped connection resumes without repeating text, --list / --continue."""

from __future__ import annotations

import io
import os
import sys
import time

import pexpect
import pytest
from rest_framework.authtoken.models import Token

from chatbot_api.models import Conversation, Message
from tests.support.cluster import ROOT
from tests.support.fake_openai import Script
from tests.support.netproxy import CuttableProxy

TIMEOUT = 20


@pytest.fixture
def token(transactional_db, django_user_model):
    user = django_user_model.objects.create_user("linus", password="pw-for-tests")
    return Token.objects.create(user=user).key


def spawn(url: str, *args: str) -> pexpect.spawn:
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "chatbot.settings_test", "PYTHONUNBUFFERED": "1"}
    child = pexpect.spawn(
        sys.executable, ["manage.py", "chat", "--url", url, *args],
        cwd=str(ROOT), env=env, encoding="utf-8", timeout=TIMEOUT, dimensions=(40, 200),
    )  # fmt: skip
    return child


def test_an_answer_streams_and_shows_its_usage(live_server_url, upstream, token):
    upstream.enqueue(Script(chunks=["Hello", " from", " the", " terminal."], interval=0.05))
    child = spawn(f"{live_server_url}/", "--token", token)
    child.expect_exact("you> ")
    child.sendline("Hi there")

    child.expect_exact("bot> Hello")  # the first piece shows before the answer is complete
    child.expect_exact(" from the terminal.")
    child.expect(r"\[gpt-4\.1-nano · \d+ \+ 4 tokens · today \d+ tokens\]")
    child.expect_exact("you> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    answer = Message.objects.get(role="assistant")
    assert answer.content == "Hello from the terminal." and answer.conversation.user.username == "linus"


def test_ctrl_c_stops_the_answer_and_only_a_second_one_quits(live_server_url, upstream, token):
    upstream.enqueue(Script(chunks=[f" w{i}" for i in range(400)], interval=0.02))
    child = spawn(f"{live_server_url}/", "--token", token)
    child.expect_exact("you> ")
    child.sendline("Talk for a while")
    child.expect_exact("bot>  w0")

    child.sendintr()
    child.expect_exact("[stopping…]")
    child.expect(r"· stopped")
    child.expect_exact("you> ")  # still running: the first Ctrl-C only stopped the answer
    answer = Message.objects.get(role="assistant")
    assert answer.status == "stopped" and 0 < len(answer.content.split()) < 400

    child.sendintr()
    child.expect_exact("Ctrl-C again")
    child.sendintr()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_a_dropped_connection_resumes_without_repeating_text(live_server_url, upstream, token):
    words = [f" v{i}" for i in range(60)]
    upstream.enqueue(Script(chunks=words, interval=0.03))
    host, port = live_server_url.removeprefix("http://").split(":")
    proxy = CuttableProxy(host, int(port))
    try:
        child = spawn(f"{proxy.origin}/", "--token", token)
        child.logfile_read = transcript = io.StringIO()
        child.expect_exact("you> ")
        child.sendline("Count")
        child.expect_exact(" v5")
        proxy.cut()  # the network drops mid-answer
        child.expect_exact("[reconnecting…]")
        child.expect(r"\[gpt-4\.1-nano")
        child.expect_exact("you> ")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        proxy.close()
    answer = transcript.getvalue().split("bot> ", 1)[1].split("\r\n[gpt")[0]
    printed = answer.replace(" [reconnecting…]", "")
    assert printed.replace("\r\n", "") == "".join(words)  # every word once, in order
    assert Message.objects.get(role="assistant").status == "complete"


def test_list_and_continue_a_conversation(live_server_url, upstream, token):
    upstream.enqueue(Script(chunks=["Blue."]), Script(chunks=["Still blue."]))
    child = spawn(f"{live_server_url}/", "--token", token)
    child.expect_exact("you> ")
    child.sendline("Favourite colour?")
    child.expect_exact("you> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    conversation = Conversation.objects.get()

    listing = spawn(f"{live_server_url}/", "--token", token, "--list")
    listing.expect(pexpect.EOF)
    assert f"{conversation.id}" in listing.before and "Favourite colour?" in listing.before

    child = spawn(f"{live_server_url}/", "--token", token, "--continue", str(conversation.id))
    child.expect_exact("bot> Blue.")
    child.expect_exact("you> ")
    child.sendline("Sure?")
    child.expect_exact("bot> Still blue.")
    child.expect_exact("you> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    assert Conversation.objects.count() == 1 and conversation.messages.count() == 4
    sent = [m["content"] for m in upstream.history[-1].messages if m["role"] != "system"]
    assert sent == ["Favourite colour?", "Blue.", "Sure?"]


def test_an_anonymous_visitor_chats_with_the_pages_session(live_server_url, upstream):
    upstream.enqueue(Script(chunks=["Hi, stranger."]))
    child = spawn(f"{live_server_url}/")
    child.expect_exact("you> ")
    child.sendline("Hello?")
    child.expect_exact("bot> Hi, stranger.")
    child.expect_exact("you> ")
    started = time.monotonic()
    child.sendeof()
    child.expect(pexpect.EOF)
    assert time.monotonic() - started < TIMEOUT
    assert Conversation.objects.get().session_key
