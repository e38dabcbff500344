"""A terminal chat against a running chatbot, local or remote: `python manage.py chat`.

The answer is printed as it is written. Ctrl-C stops the answer (the server keeps the
partial text, as the page's Stop does); a second Ctrl-C, or Ctrl-D, quits. A connection
that drops mid-answer is resumed after the last event received, so nothing is lost or
printed twice. It talks to the HTTP API only (no Django needed), so the installed
package's `chatbot-chat` command is the same program:

    chatbot-chat --url https://chat.example.com/ --token <API token>
    chatbot-chat --list
    chatbot-chat --continue <session_id>
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from urllib.parse import urljoin

import httpx

DEFAULT_URL = "http://127.0.0.1:8000/"
RESUME_DELAYS = (0.2, 0.5, 1.0, 2.0, 5.0)  # seconds before each reconnect; the last one repeats
MAX_RESUME_ATTEMPTS = 30
TIMEOUT = httpx.Timeout(30.0, read=None)  # a stream may be silent between keep-alives for long
PROMPT, ANSWER = "you> ", "bot> "


class ChatError(Exception):
    """A request the server refused, with its readable message."""


@dataclass
class AnswerReading:
    """One answer as it arrives: the last seq printed, how it ended, what it cost."""

    message_id: str | None = None
    session_id: str | None = None
    model: str = ""
    last_seq: int = 0
    terminal: dict | None = None
    usage: dict = field(default_factory=dict)
    text: str = ""

    def apply(self, event: dict, write: Callable[[str], None]) -> None:
        seq = event.get("seq")
        if isinstance(seq, int):
            if seq <= self.last_seq:
                return  # a replay after a resume repeats events: each seq once
            self.last_seq = seq
        kind = event.get("type")
        if kind == "meta":
            self.message_id, self.session_id = event["message_id"], event.get("session_id")
            self.model = event.get("model", "")
        elif kind == "delta":
            self.text += event["text"]
            write(event["text"])
        elif kind == "snapshot":  # rebuilt from the database: print only what is new
            new = event["text"][len(self.text) :] if event["text"].startswith(self.text) else ""
            self.text = event["text"]
            write(new)
        elif kind == "usage":
            self.usage = event
        elif kind in ("done", "error") and not (kind == "error" and seq is None and event.get("retryable")):
            self.terminal = event  # (a retryable error without seq ends this reader only: resume)


def sse_events(lines: Iterator[str]) -> Iterator[dict]:
    """The `data:` JSON of each Server-Sent Event."""
    data: list[str] = []
    for line in lines:
        if line.startswith("data:"):
            data.append(line[5:].lstrip())
        elif not line and data:
            yield json.loads("\n".join(data))
            data = []


class ChatClient:
    """The chatbot's HTTP API, as this terminal uses it."""

    def __init__(self, url: str, token: str | None):
        self.url = url if url.endswith("/") else url + "/"
        headers = {"Referer": self.url}
        if token:
            headers["Authorization"] = f"Token {token}"
        self.http = httpx.Client(base_url=urljoin(self.url, "api/"), headers=headers, timeout=TIMEOUT)
        self.anonymous = not token

    def close(self) -> None:
        self.http.close()

    def _start_session(self) -> None:
        """Anonymous use: the page's session and CSRF cookies, as a browser gets them."""
        if self.anonymous and "csrftoken" not in self.http.cookies:
            self.http.get(self.url).raise_for_status()
            self.http.headers["X-CSRFToken"] = self.http.cookies.get("csrftoken", "")

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        self._start_session()
        response = self.http.request(method, path, **kwargs)
        if response.status_code >= 400:
            raise ChatError(_error_text(response))
        return response

    def conversations(self) -> list[dict]:
        return self.request("GET", "conversations/").json()

    def conversation(self, session_id: str) -> dict:
        return self.request("GET", f"conversations/{session_id}").json()

    def usage(self) -> dict | None:
        try:
            return self.request("GET", "usage/").json()
        except (ChatError, httpx.HTTPError):
            return None

    def stop(self, message_id: str) -> None:
        self.request("POST", f"messages/{message_id}/stop")

    def stream(self, method: str, path: str, **kwargs) -> Iterator[dict]:
        self._start_session()
        headers = {"Accept": "text/event-stream"}
        with self.http.stream(method, path, headers=headers, **kwargs) as response:
            if response.status_code == 204:
                return  # nothing left after the last seq: the reading has everything
            if response.status_code >= 400:
                response.read()
                raise ChatError(_error_text(response))
            yield from sse_events(response.iter_lines())

    def ask(self, text: str, session_id: str | None) -> Iterator[dict]:
        body = {"message": text, "streaming": True, **({"session_id": session_id} if session_id else {})}
        return self.stream("POST", "chat/", json=body)

    def follow(self, message_id: str, after: int) -> Iterator[dict]:
        return self.stream("GET", f"messages/{message_id}/events", params={"after": after})


def _error_text(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return f"HTTP {response.status_code}"
    message = body.get("error", "") if isinstance(body, dict) else ""
    retry = response.headers.get("Retry-After")
    return (
        f"{message} (retry in {retry} s)" if retry and response.status_code == 429 else message or str(body)
    )


class Terminal:
    """The conversation loop: prompt, stream the answer, stop on Ctrl-C, resume on drops."""

    def __init__(self, client: ChatClient, out=sys.stdout, sleep=time.sleep):
        self.client, self.out, self.sleep = client, out, sleep
        self.session_id: str | None = None

    def write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def run(self) -> int:
        """Until Ctrl-D, or a second Ctrl-C in a row."""
        interrupted = False
        while True:
            try:
                text = input(PROMPT)
            except EOFError:
                self.write("\n")
                return 0
            except KeyboardInterrupt:
                if interrupted:
                    self.write("\n")
                    return 0
                interrupted = True
                self.write("\n(Ctrl-C again or Ctrl-D to quit)\n")
                continue
            interrupted = False
            if text.strip():
                self.answer(text)

    def answer(self, text: str) -> AnswerReading:
        """Print one answer as it is written. Ctrl-C stops it; a second one propagates (quit)."""
        reading = AnswerReading()
        self.write(ANSWER)
        try:
            self.read(reading, lambda: self.client.ask(text, self.session_id))
        except KeyboardInterrupt:
            if reading.message_id is None:
                raise
            self.write(" [stopping…]")
            self.client.stop(reading.message_id)
            self.read(reading, lambda: self.client.follow(reading.message_id, reading.last_seq))
        except ChatError as refused:
            self.write(f"\n! {refused}\n")
            return reading
        self.session_id = reading.session_id or self.session_id
        self.write("\n" + self.summary(reading) + "\n")
        return reading

    def read(self, reading: AnswerReading, request: Callable[[], Iterator[dict]]) -> None:
        """Read to the terminal event, resuming after the last seq whenever the stream breaks."""
        for attempt in range(MAX_RESUME_ATTEMPTS):
            before = reading.last_seq
            try:
                for event in request():
                    reading.apply(event, self.write)
                    if reading.terminal is not None:
                        return
            except httpx.TransportError:
                if reading.message_id is None:
                    raise ChatError("The server could not be reached.") from None
            if reading.message_id is None:
                raise ChatError("The server ended the answer before it started.")
            if attempt == 0 or reading.last_seq > before:
                self.write(" [reconnecting…]")
            self.sleep(RESUME_DELAYS[min(attempt, len(RESUME_DELAYS) - 1)])
            request = lambda: self.client.follow(reading.message_id, reading.last_seq)  # noqa: E731
        raise ChatError("The connection kept failing; the answer goes on on the server.")

    def summary(self, reading: AnswerReading) -> str:
        terminal = reading.terminal or {}
        parts = [reading.model] if reading.model else []
        if reading.usage:
            prompt, completion = (
                reading.usage.get("prompt_tokens", 0),
                reading.usage.get("completion_tokens", 0),
            )
            parts.append(f"{prompt} + {completion} tokens")
        if terminal.get("type") == "error":
            parts.append(f"failed: {terminal.get('message', terminal.get('code'))}")
        elif terminal.get("status") not in (None, "complete"):
            parts.append(terminal["status"])
        elif terminal.get("finish_reason") == "length":
            parts.append("cut at the length limit")
        usage = self.client.usage()
        today = (usage or {}).get("today") or {}
        if today:
            parts.append(f"today {today.get('prompt_tokens', 0) + today.get('completion_tokens', 0)} tokens")
        return "[" + " · ".join(parts) + "]"

    def show(self, conversation: dict) -> None:
        self.session_id = conversation["session_id"]
        self.write(f"— {conversation.get('title') or 'Conversation'} —\n")
        for message in conversation.get("messages", []):
            self.write(f"{PROMPT if message['role'] == 'user' else ANSWER}{message['content']}\n")


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chatbot-chat", description="Chat with the chatbot in a terminal.")
    add_arguments(parser)
    return parser


def add_arguments(parser) -> None:
    parser.add_argument(
        "--url", default=os.environ.get("CHATBOT_URL", DEFAULT_URL), help="the chat's address (CHATBOT_URL)"
    )
    parser.add_argument(
        "--token", default=os.environ.get("CHATBOT_TOKEN"), help="an API token (CHATBOT_TOKEN)"
    )
    parser.add_argument("--list", action="store_true", help="list the conversations and quit")
    parser.add_argument(
        "--continue", dest="continue_id", metavar="SESSION_ID", help="continue a conversation"
    )


def run(options, out=sys.stdout) -> int:
    client = ChatClient(options.url, options.token)
    terminal = Terminal(client, out=out)
    try:
        if options.list:
            for conversation in client.conversations():
                updated = conversation.get("updated_at", "")[:16].replace("T", " ")
                out.write(f"{conversation['session_id']}  {updated}  {conversation.get('title') or '—'}\n")
            return 0
        if options.continue_id:
            terminal.show(client.conversation(options.continue_id))
        return terminal.run()
    except ChatError as error:
        out.write(f"! {error}\n")
        return 1
    except httpx.TransportError as error:
        out.write(f"! {options.url} cannot be reached: {error}\n")
        return 1
    except KeyboardInterrupt:
        out.write("\n")
        return 0
    finally:
        client.close()


def main(argv=None) -> int:
    return run(parser().parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
