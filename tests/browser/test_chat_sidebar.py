"""Conversations in the sidebar, on desktop and phone, light and dark."""

from __future__ import annotations

from datetime import timedelta

import pytest
from playwright.sync_api import expect

from chatbot_api.models import Conversation, Message
from tests.browser.pages import PHONE, screenshot, send, wait_answer_finished, wait_ready
from tests.support.fake_openai import Script

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

ANSWER_ONE = "Rome is the **capital** of Italy."
ANSWER_TWO = "Use `sorted()`:\n\n```python\nprint(sorted([3, 1, 2]))\n```\n"


def conversation(page, title: str):
    return page.locator(".conversation", has=page.locator(".conversation-open", has_text=title))


def start_two_conversations(page, upstream) -> None:
    upstream.enqueue(Script(chunks=[ANSWER_ONE]), Script(chunks=[ANSWER_TWO]))
    send(page, "What is the capital of Italy?")
    wait_answer_finished(page)
    expect(page.locator(".conversation")).to_have_count(1)
    page.locator("#newChatButton, #newChatCompactButton").locator("visible=true").click()
    expect(page.locator(".message")).to_have_count(0)
    expect(page.locator("#emptyState")).to_be_visible()
    send(page, "How do I sort a list in Python?", streaming=True)
    wait_answer_finished(page)
    expect(page.locator(".conversation")).to_have_count(2)


def test_new_chat_switch_rename_delete(open_page, upstream):
    page = open_page()
    start_two_conversations(page, upstream)

    # Newest first, titled from the first message, the open one marked as current.
    titles = page.locator(".conversation-open").all_inner_texts()
    assert titles == ["How do I sort a list in Python?", "What is the capital of Italy?"]
    expect(page.locator(".conversation-open[aria-current=page]")).to_have_text(
        "How do I sort a list in Python?"
    )
    screenshot(page, "desktop-light-conversation")

    # Switching loads the other conversation's history.
    conversation(page, "capital of Italy").locator(".conversation-open").click()
    expect(page.locator(".message-user .bubble-body")).to_have_text(["What is the capital of Italy?"])
    expect(page.locator(".message-assistant .bubble-body")).to_have_text(["Rome is the capital of Italy."])
    expect(page.locator(".message-assistant strong")).to_have_text("capital")
    conversation(page, "sort a list").locator(".conversation-open").click()
    expect(page.locator(".message-assistant .code-block")).to_have_count(1)

    # Rename in place: Enter saves.
    conversation(page, "capital of Italy").locator(".conversation-rename").click()
    title_input = page.locator(".rename-form input")
    expect(title_input).to_be_focused()
    title_input.fill("Geography")
    title_input.press("Enter")
    expect(conversation(page, "Geography")).to_have_count(1)
    assert Conversation.objects.filter(title="Geography").count() == 1

    # Escape cancels a rename.
    conversation(page, "Geography").locator(".conversation-rename").click()
    page.locator(".rename-form input").fill("Not this")
    page.locator(".rename-form input").press("Escape")
    expect(conversation(page, "Geography")).to_have_count(1)

    # Delete asks first: dismissing keeps it...
    page.once("dialog", lambda dialog: dialog.dismiss())
    conversation(page, "Geography").locator(".conversation-delete").click()
    expect(page.locator(".conversation")).to_have_count(2)
    assert Conversation.objects.count() == 2

    # ...accepting deletes it.
    messages = []
    page.once("dialog", lambda dialog: (messages.append(dialog.message), dialog.accept()))
    conversation(page, "Geography").locator(".conversation-delete").click()
    expect(page.locator(".conversation")).to_have_count(1)
    assert "Geography" in messages[0]
    assert not Conversation.objects.filter(title="Geography").exists()

    # Deleting the open conversation leaves an empty new chat.
    page.once("dialog", lambda dialog: dialog.accept())
    page.locator(".conversation-delete").click()
    expect(page.locator(".conversation")).to_have_count(0)
    expect(page.locator(".message")).to_have_count(0)
    expect(page.locator("#conversationEmpty")).to_be_visible()
    assert Conversation.objects.count() == 0


def test_conversation_survives_a_reload_and_regenerate_replaces_the_answer(open_page, upstream):
    upstream.enqueue(Script(chunks=["First answer"]), Script(chunks=["Second", " answer"]))
    page = open_page()
    send(page, "Hello there", streaming=True)
    wait_answer_finished(page)

    page.reload()
    wait_ready(page)
    expect(page.locator(".message-user .bubble-body")).to_have_text(["Hello there"])
    expect(page.locator(".message-assistant .bubble-body")).to_have_text(["First answer"])

    page.locator(".message-assistant .regenerate").click()
    answer = wait_answer_finished(page)
    expect(answer.locator(".bubble-body")).to_have_text("Second answer")
    expect(page.locator(".message-user .bubble-body")).to_have_text(["Hello there"])
    expect(page.locator(".message-assistant .bubble-body")).to_have_text(["Second answer"])
    assert upstream.history[-1].messages == upstream.history[0].messages  # the same question, once
    assert Conversation.objects.count() == 1  # the same conversation
    assert Message.objects.count() == 2
    expect(page.locator(".regenerate:visible")).to_have_count(1)  # only the last answer's


@pytest.mark.parametrize("color_scheme", ["light", "dark"])
def test_phone_sidebar_is_a_drawer(open_page, upstream, color_scheme):
    page = open_page(viewport=PHONE, color_scheme=color_scheme, locale="it-IT")
    start_two_conversations(page, upstream)
    toggle = page.locator("#sidebarToggle")
    expect(page.locator("#sidebar")).not_to_be_visible()
    expect(toggle).to_have_attribute("aria-expanded", "false")
    screenshot(page, f"phone-{color_scheme}-conversation")

    toggle.click()
    expect(page.locator("#sidebar")).to_be_visible()
    expect(toggle).to_have_attribute("aria-expanded", "true")
    expect(page.locator("#newChatButton")).to_be_focused()
    page.wait_for_timeout(300)  # the drawer slides in
    screenshot(page, f"phone-{color_scheme}-sidebar")

    conversation(page, "capital of Italy").locator(".conversation-open").click()
    expect(page.locator("#sidebar")).not_to_be_visible()
    expect(page.locator(".message-user .bubble-body")).to_have_text(["What is the capital of Italy?"])

    toggle.click()
    page.keyboard.press("Escape")
    expect(page.locator("#sidebar")).not_to_be_visible()
    expect(toggle).to_be_focused()


def test_desktop_dark_theme_and_keyboard(open_page, upstream):
    page = open_page(color_scheme="dark")
    start_two_conversations(page, upstream)
    background = page.evaluate("() => getComputedStyle(document.body).backgroundColor")
    assert background == "rgb(15, 18, 23)"
    screenshot(page, "desktop-dark-conversation")

    # Everything is reachable with the keyboard, with a visible focus ring.
    page.focus("#newChatButton")
    page.keyboard.press("Tab")
    assert page.evaluate("() => document.activeElement.id") == "conversationSearch"
    page.keyboard.press("Tab")
    focused = page.evaluate("() => document.activeElement.className")
    assert "conversation-open" in focused
    outline = page.evaluate("() => getComputedStyle(document.activeElement).outlineStyle")
    assert outline == "solid"
    page.keyboard.press("Enter")  # opens the newest conversation (already open: stays)
    expect(page.locator(".message-user")).to_have_count(1)


def test_each_conversation_has_a_link_and_back_and_forward_move_between_them(
    open_page, upstream, live_server_url
):
    upstream.enqueue(Script(chunks=["About cats."]), Script(chunks=["About dogs."]))
    page = open_page()
    assert page.evaluate("() => location.pathname") == "/"
    send(page, "Cats?", streaming=True)
    wait_answer_finished(page)
    first = Conversation.objects.get().id
    expect(page).to_have_url(f"{live_server_url}/c/{first}")  # the new conversation got its link

    page.click("#newChatButton")
    expect(page).to_have_url(f"{live_server_url}/")
    send(page, "Dogs?", streaming=True)
    wait_answer_finished(page)
    second = Conversation.objects.exclude(id=first).get().id
    expect(page).to_have_url(f"{live_server_url}/c/{second}")

    page.click(f'.conversation[data-session-id="{first}"] .conversation-open')
    expect(page).to_have_url(f"{live_server_url}/c/{first}")
    expect(page.locator(".message-assistant .bubble-body")).to_have_text(["About cats."])

    page.go_back()
    expect(page).to_have_url(f"{live_server_url}/c/{second}")
    expect(page.locator(".message-assistant .bubble-body")).to_have_text(["About dogs."])
    page.go_forward()
    expect(page.locator(".message-assistant .bubble-body")).to_have_text(["About cats."])

    page.reload()
    wait_ready(page)
    expect(page.locator(".message-assistant .bubble-body")).to_have_text(["About cats."])
    expect(page.locator(f'.conversation[data-session-id="{first}"]')).to_have_class("conversation active")

    other = page.context.new_page()  # the link opens it in another tab of the same browser too
    other.goto(f"{live_server_url}/c/{second}")
    wait_ready(other)
    expect(other.locator(".message-assistant .bubble-body")).to_have_text(["About dogs."])


def test_a_link_to_a_conversation_that_is_not_yours_starts_a_new_chat(open_page, live_server_url):
    page = open_page(path="/c/4f7c2a7e-0000-4000-8000-000000000000")
    wait_ready(page)
    expect(page).to_have_url(f"{live_server_url}/")
    expect(page.locator("#emptyState")).to_be_visible()


@pytest.mark.parametrize("color_scheme", ["light", "dark"])
def test_the_transport_lives_in_a_settings_panel_and_streaming_is_on_by_default(open_page, color_scheme):
    page = open_page(color_scheme=color_scheme)
    expect(page.locator("#streamingCheckbox")).to_be_checked()
    expect(page.locator("#transportSelect")).to_be_hidden()

    page.click("#settings summary")
    expect(page.locator("#transportSelect")).to_be_visible()
    screenshot(page, f"settings-panel-{color_scheme}")
    page.keyboard.press("Escape")
    expect(page.locator("#transportSelect")).to_be_hidden()
    expect(page.locator("#settings summary")).to_be_focused()

    page.uncheck("#streamingCheckbox")  # remembered, as the seed's checkbox always was
    page.reload()
    wait_ready(page)
    expect(page.locator("#streamingCheckbox")).not_to_be_checked()


def test_export_downloads_the_open_conversation_and_bubbles_show_when_they_were_written(open_page, upstream):
    upstream.enqueue(Script(chunks=["Answer to export."]))
    page = open_page()
    expect(page.locator("#exportMenu")).to_be_hidden()  # nothing to export in a new chat
    send(page, "Export me", streaming=True)
    wait_answer_finished(page)

    expect(page.locator("#exportMenu")).to_be_visible()
    page.click("#exportMenu summary")
    screenshot(page, "export-menu")
    with page.expect_download() as download:
        page.click("#exportMarkdown")
    assert download.value.suggested_filename == "export-me.md"
    assert "Answer to export." in open(download.value.path(), encoding="utf-8").read()
    with page.expect_download() as download:
        page.click("#exportJson")
    assert download.value.suggested_filename == "export-me.json"

    for bubble in page.locator(".message .bubble").all():
        assert bubble.get_attribute("title")  # e.g. "2 Dec 2026, 15:04"
    page.reload()
    wait_ready(page)
    expect(page.locator(".message .bubble")).to_have_count(2)  # the conversation is loaded again
    titles = [bubble.get_attribute("title") for bubble in page.locator(".message .bubble").all()]
    assert all(titles)


def test_search_groups_and_suggestions(open_page, upstream):
    upstream.enqueue(Script(chunks=["Waves and wind."]), Script(chunks=["Cats nap a lot."]))
    page = open_page()
    suggestions = page.locator("#emptyState .suggestion")
    expect(suggestions).to_have_count(3)
    page.click("#emptyState .suggestion >> nth=1")  # sent as if typed
    expect(page.locator(".message-user .bubble-body")).to_have_text(["Write a haiku about the sea."])
    wait_answer_finished(page)
    page.click("#newChatButton")
    send(page, "Tell me about my pet", streaming=True)
    wait_answer_finished(page)
    old = Conversation.objects.get(title="Write a haiku about the sea.")
    Conversation.objects.filter(pk=old.pk).update(updated_at=old.updated_at - timedelta(days=3))
    page.reload()
    wait_ready(page)
    expect(page.locator(".conversation-group h2")).to_have_text(["Today", "Previous 7 days"])

    page.fill("#conversationSearch", "cats")  # in the answer's text only
    expect(page.locator(".conversation .conversation-open")).to_have_text(["Tell me about my pet"])
    page.fill("#conversationSearch", "zebra")
    expect(page.locator(".conversation")).to_have_count(0)
    expect(page.locator("#conversationEmpty")).to_have_text("No conversation matches your search.")
    screenshot(page, "search-no-match")
    page.fill("#conversationSearch", "")
    expect(page.locator(".conversation")).to_have_count(2)
    screenshot(page, "conversations-grouped-by-date")


def test_the_language_is_chosen_in_the_settings_and_remembered(open_page):
    page = open_page(locale="en-US")
    expect(page.locator("#messageInput")).to_have_attribute("placeholder", "Write a message…")
    page.click("#settings summary")
    with page.expect_navigation():
        page.select_option("#languageSelect", "it")
    wait_ready(page)
    expect(page.locator("#messageInput")).to_have_attribute("placeholder", "Scrivi un messaggio…")
    expect(page.locator("html")).to_have_attribute("lang", "it")
    screenshot(page, "language-italian")

    page.reload()  # remembered (a cookie), whatever the browser's own language
    wait_ready(page)
    expect(page.locator("#newChatButton")).to_contain_text("Nuova chat")
    page.click("#settings summary")
    with page.expect_navigation():
        page.select_option("#languageSelect", "en")
    wait_ready(page)
    expect(page.locator("#newChatButton")).to_contain_text("New chat")


def test_the_theme_is_the_systems_unless_chosen_and_is_remembered(open_page, upstream):
    upstream.enqueue(Script(chunks=["```python\nprint(1)\n```"]))
    page = open_page(color_scheme="dark")  # the system prefers dark
    background = "() => getComputedStyle(document.body).backgroundColor"
    assert page.evaluate(background) == "rgb(15, 18, 23)"

    page.click("#settings summary")
    page.select_option("#themeSelect", "light")
    assert page.evaluate(background) == "rgb(246, 247, 249)"
    send(page, "Code", streaming=True)
    wait_answer_finished(page)
    code_colour = "() => getComputedStyle(document.querySelector('.hljs-built_in')).color"
    assert page.evaluate(code_colour) == "rgb(179, 80, 0)"  # the light theme's, AA on white
    screenshot(page, "theme-light-chosen-on-a-dark-system")

    page.reload()  # the server renders the chosen theme at once: no dark flash first
    assert page.evaluate("() => document.documentElement.dataset.theme") == "light"
    wait_ready(page)
    assert page.evaluate(background) == "rgb(246, 247, 249)"

    page.click("#settings summary")
    page.select_option("#themeSelect", "system")
    assert page.evaluate(background) == "rgb(15, 18, 23)"
    page.reload()
    wait_ready(page)
    assert page.evaluate("() => document.documentElement.dataset.theme") is None
    expect(page.locator("#themeSelect")).to_have_value("system")


def test_the_model_picker_appears_for_several_models_and_each_conversation_keeps_its_own(open_page, upstream):
    upstream.models = ["llama3.2:1b"]
    upstream.enqueue(Script(chunks=["From llama."]), Script(chunks=["From the default."]))
    page = open_page()
    expect(page.locator("#modelPicker")).to_be_visible()
    expect(page.locator("#modelSelect")).to_have_value("gpt-4.1-nano")  # the configured default first

    page.select_option("#modelSelect", "llama3.2:1b")
    send(page, "Hi llama", streaming=True)
    wait_answer_finished(page)
    assert upstream.history[-1].model == "llama3.2:1b"
    expect(page.locator(".message-assistant .message-facts")).to_contain_text("llama3.2:1b")
    screenshot(page, "model-picker")

    page.click("#newChatButton")
    expect(page.locator("#modelSelect")).to_have_value("gpt-4.1-nano")
    send(page, "Hi default", streaming=True)
    wait_answer_finished(page)
    assert upstream.history[-1].model == "gpt-4.1-nano"

    llama = Conversation.objects.get(model="llama3.2:1b")
    page.click(f'.conversation[data-session-id="{llama.id}"] .conversation-open')
    expect(page.locator("#modelSelect")).to_have_value("llama3.2:1b")


def test_a_model_picked_before_the_conversation_list_loads_is_kept(open_page, upstream):
    """The list may arrive after the user picked: it must not put the default back."""
    upstream.models = ["llama3.2:1b"]
    upstream.enqueue(Script(chunks=["First."]), Script(chunks=["From llama."]))
    page = open_page()
    send(page, "A first conversation", streaming=True)
    wait_answer_finished(page)
    page.click("#newChatButton")

    held = []

    def hold_the_first(route):  # the page's first list is answered only after the pick
        if held:
            route.continue_()
        else:
            held.append(route)

    page.route("**/api/conversations/", hold_the_first)
    page.reload()
    expect(page.locator("#modelPicker")).to_be_visible()
    for _ in range(250):  # the route's handler runs while Playwright waits
        if held:
            break
        page.wait_for_timeout(20)
    assert held, "the page asked for its conversation list"
    page.select_option("#modelSelect", "llama3.2:1b")
    with page.expect_response("**/api/conversations/"):
        held[0].continue_()
    expect(page.locator(".conversation")).to_have_count(1)
    expect(page.locator("#modelSelect")).to_have_value("llama3.2:1b")

    send(page, "Hi llama", streaming=True)
    wait_answer_finished(page)
    assert upstream.history[-1].model == "llama3.2:1b"


def test_no_model_picker_when_there_is_one_model(open_page):
    page = open_page()
    expect(page.locator("#modelPicker")).to_be_hidden()


@pytest.mark.parametrize("streaming", [True, False])
def test_a_sent_question_is_edited_and_sent_again_replacing_the_later_turns(open_page, upstream, streaming):
    upstream.enqueue(Script(chunks=["One."]), Script(chunks=["Two."]), Script(chunks=["Edited answer."]))
    page = open_page()
    send(page, "First question", streaming=streaming)
    wait_answer_finished(page)
    send(page, "Second question", streaming=streaming)
    wait_answer_finished(page)

    page.locator(".message-user").first.hover()
    page.locator(".message-user >> nth=0 >> .edit-question").click()
    editor = page.locator(".edit-form textarea")
    expect(editor).to_have_value("First question")
    expect(page.locator(".edit-note")).to_have_text("The answers after this question will be replaced.")
    screenshot(page, f"edit-question-{'stream' if streaming else 'json'}")
    editor.fill("First question, edited")
    editor.press("Enter")

    wait_answer_finished(page)
    expect(page.locator(".message-user .bubble-body")).to_have_text(["First question, edited"])
    expect(page.locator(".message-assistant .bubble-body")).to_have_text(["Edited answer."])
    stored = [(m.role, m.content) for m in Message.objects.order_by("created_at")]
    assert stored == [("user", "First question, edited"), ("assistant", "Edited answer.")]

    page.locator(".message-user >> nth=0 >> .edit-question").click()  # Escape cancels an edit
    page.locator(".edit-form textarea").press("Escape")
    expect(page.locator(".message-user .bubble-body")).to_have_text(["First question, edited"])
    page.reload()
    wait_ready(page)
    expect(page.locator(".message-user .bubble-body")).to_have_text(["First question, edited"])
