// The page's views: they render the state conversation.js owns and never change it. Each
// view takes the elements it draws into; chat.js wires them to the state and to the user.
//
// Libraries (vendored classic scripts, loaded before the modules): marked, DOMPurify, highlight.js.
import {
  conversationTitle,
  dateGroup,
  errorText,
  gettext,
  interpolate,
  loadingText,
  noConversationsText,
  statusLabel,
  tokenCount,
} from "chatbot/texts";
import { isCut } from "chatbot/conversation";

const BADGE_STATUSES = new Set(["stopped", "failed", "interrupted"]);
const STICK_DISTANCE_PX = 48; // this close to the bottom, the list follows new text

// ---------------------------------------------------------------------------------------------
// Markdown: marked -> DOMPurify. Raw HTML in answers is shown as text, never run.

const SANITIZE_FRAGMENT = {
  USE_PROFILES: { html: true },
  FORBID_TAGS: ["style", "img", "form", "input", "button", "textarea", "select", "iframe", "video", "audio"],
  FORBID_ATTR: ["style"],
  RETURN_DOM_FRAGMENT: true,
};

window.DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A" && node.hasAttribute("href")) {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer nofollow");
  }
});

function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

let highlighting = true; // off while the block being rendered is still being written

function highlightCode(code, language) {
  if (!language || !highlighting) return escapeHtml(code);
  return window.hljs.highlight(code, { language, ignoreIllegals: true }).value;
}

const markdownParser = new window.marked.Marked({
  gfm: true,
  renderer: {
    html: ({ text }) => escapeHtml(text),
    // Images become links: an answer must not make the browser fetch URLs on its own.
    image: ({ href, text }) => `<a href="${escapeHtml(href)}">${escapeHtml(text || href)}</a>`,
    checkbox: ({ checked }) => (checked ? "☑ " : "☐ "),
    code: ({ text, lang }) => {
      const requested = (lang || "").trim().split(/\s+/)[0].toLowerCase();
      const language = requested && window.hljs.getLanguage(requested) ? requested : "";
      const label = requested.replace(/[^\w+#.-]/g, "");
      const codeClass = language ? `hljs language-${language}` : "hljs";
      const highlighted = highlightCode(text, language);
      return `<pre data-language="${label}"><code class="${codeClass}">${highlighted}</code></pre>`;
    },
  },
});

/** One top-level Markdown block as sanitised DOM nodes, its code highlighted unless `open`. */
function renderBlock(token, links, { open }) {
  const tokens = [token];
  tokens.links = links;
  highlighting = !open;
  const fragment = window.DOMPurify.sanitize(markdownParser.parser(tokens), SANITIZE_FRAGMENT);
  highlighting = true;
  decorateCodeBlocks(fragment);
  return [...fragment.childNodes];
}

/**
 * An answer's Markdown, rendered block by block. A block that is finished (any but the
 * last while the answer streams) keeps its DOM nodes, so a selection in it survives and
 * its Copy button stays clickable; only the block still being written is rendered again,
 * without highlighting until it closes. The work per frame is the last block's, however
 * long the answer has grown: the text before it is not even parsed again.
 */
class MarkdownBlocks {
  constructor(container) {
    this.container = container;
    this.blocks = []; // {raw, nodes, open}, in order; their raws concatenate to the text
    this.source = "";
  }

  /** Show `text` (which only grows while streaming); `final` re-reads it whole and closes the last block. */
  update(text, { final = false } = {}) {
    const source = text.replace(/\r\n?/g, "\n"); // as marked reads it, so raw lengths add up
    const grew = source.startsWith(this.source); // else the text was replaced (a snapshot): read it all
    this.source = source;
    const kept = final || !grew ? 0 : Math.max(0, this.blocks.length - 1);
    const offset = this.blocks.slice(0, kept).reduce((length, block) => length + block.raw.length, 0);
    const tokens = markdownParser.lexer(source.slice(offset));
    tokens.forEach((token, i) => {
      const index = kept + i;
      const open = !final && i === tokens.length - 1;
      const block = this.blocks[index];
      if (block && !block.open && !open && block.raw === token.raw) return; // finished and unchanged
      this.replace(index, { raw: token.raw, nodes: renderBlock(token, tokens.links, { open }), open });
    });
    for (let index = this.blocks.length - 1; index >= kept + tokens.length; index--) this.replace(index, null);
  }

  replace(index, block) {
    const old = this.blocks[index];
    const next = this.blocks.slice(index + 1).find((later) => later.nodes.length)?.nodes[0] ?? null;
    for (const node of old?.nodes ?? []) node.remove();
    if (block === null) {
      this.blocks.splice(index, 1);
      return;
    }
    for (const node of block.nodes) this.container.insertBefore(node, next);
    this.blocks[index] = block;
  }
}

/** Give each code block a header with its language and a copy button. */
function decorateCodeBlocks(container) {
  for (const pre of container.querySelectorAll("pre")) {
    const block = document.createElement("div");
    block.className = "code-block";
    const head = document.createElement("div");
    head.className = "code-head";
    const label = document.createElement("span");
    label.textContent = pre.dataset.language || gettext("code");
    head.append(label, actionButton("copy-code", "📋", gettext("Copy"), gettext("Copy code")));
    pre.replaceWith(block);
    block.append(head, pre);
  }
}

export function actionButton(className, icon, label, accessibleName = label) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = `action-button ${className}`;
  button.setAttribute("aria-label", accessibleName);
  button.title = accessibleName;
  const iconSpan = document.createElement("span");
  iconSpan.setAttribute("aria-hidden", "true");
  iconSpan.textContent = icon;
  const labelSpan = document.createElement("span");
  labelSpan.className = "action-label";
  labelSpan.textContent = label;
  button.append(iconSpan, labelSpan);
  return button;
}

// ---------------------------------------------------------------------------------------------
// Scrolling: follow new text unless the reader scrolled up

export class Scroller {
  constructor(container, toBottomButton) {
    this.container = container;
    this.button = toBottomButton;
    this.stick = true;
    container.addEventListener(
      "scroll",
      () => {
        const distance = container.scrollHeight - container.scrollTop - container.clientHeight;
        this.stick = distance < STICK_DISTANCE_PX;
        this.button.hidden = this.stick;
      },
      { passive: true },
    );
    toBottomButton.addEventListener("click", () => this.toBottom());
  }

  follow() {
    if (this.stick) this.container.scrollTop = this.container.scrollHeight;
  }

  toBottom() {
    this.stick = true;
    this.button.hidden = true;
    this.container.scrollTop = this.container.scrollHeight;
  }
}

// ---------------------------------------------------------------------------------------------
// Messages

const timeFormat = new Intl.DateTimeFormat(document.documentElement.lang || undefined, {
  dateStyle: "medium",
  timeStyle: "short",
});

/** A message's list item; hovering its bubble shows when it was written. */
function messageItem(message) {
  const item = document.createElement("li");
  item.className = `message message-${message.role}`;
  const bubble = document.createElement("div");
  bubble.className = "bubble";
  const written = new Date(message.createdAt);
  if (!Number.isNaN(written.getTime())) {
    bubble.title = timeFormat.format(written);
    item.dataset.createdAt = message.createdAt;
  }
  item.append(bubble);
  return item;
}

function questionItem(question) {
  const item = messageItem(question);
  const body = document.createElement("div");
  body.className = "bubble-body";
  body.textContent = question.text; // the user's own text is shown as typed, never parsed as HTML
  const actions = document.createElement("div");
  actions.className = "question-actions";
  actions.append(actionButton("edit-question", "✎", gettext("Edit"), gettext("Edit and send again")));
  item.querySelector(".bubble").append(body);
  item.append(actions);
  return item;
}

/** One assistant answer. While it is written, its text is re-rendered at most once per frame. */
class AnswerView {
  constructor(answer, scroller) {
    this.answer = answer;
    this.scroller = scroller;
    this.frame = 0;

    this.item = messageItem(answer);
    const bubble = this.item.querySelector(".bubble");
    this.body = document.createElement("div");
    this.body.className = "bubble-body markdown";
    this.loading = document.createElement("div");
    this.loading.className = "loading";
    this.footer = document.createElement("div");
    this.footer.className = "message-footer";
    bubble.append(this.body, this.loading, this.footer);
    this.markdown = new MarkdownBlocks(this.body);

    if (answer.running) {
      this.item.classList.add("running");
      this.loading.textContent = loadingText(answer.streamed);
      this.render();
      answer.on("text", () => this.scheduleRender());
      answer.on("finish", () => this.finish());
    } else {
      this.finish();
    }
  }

  scheduleRender() {
    if (this.frame) return;
    this.frame = requestAnimationFrame(() => {
      this.frame = 0;
      this.render();
    });
  }

  render({ final = false } = {}) {
    if (this.frame) cancelAnimationFrame(this.frame);
    this.frame = 0;
    this.markdown.update(this.answer.text, { final });
    this.scroller.follow();
  }

  /** The answer ended: final render, status badge, error text or note, actions. */
  finish() {
    const { status, errorCode, retryAfter, limit, finishReason } = this.answer.outcome;
    this.render({ final: true });
    this.loading.remove();
    this.item.classList.remove("running");
    this.item.dataset.status = status;
    this.renderFooter(status);
    if (errorCode) this.showNote("message-error", errorText(errorCode, { retryAfter, limit }));
    else if (finishReason === "length") this.showNote("message-note", gettext("The answer was cut at the length limit."));
    this.scroller.follow();
  }

  showNote(className, text) {
    const note = document.createElement("p");
    note.className = className;
    note.textContent = text;
    this.footer.before(note);
  }

  renderFooter(status) {
    const { answer } = this;
    const details = document.createElement("span");
    details.className = "message-details";
    if (answer.streamed) {
      const mark = document.createElement("span");
      mark.className = "streamed-mark";
      mark.title = gettext("Streamed");
      mark.setAttribute("aria-label", gettext("Streamed"));
      mark.textContent = "🔄";
      details.append(mark);
    }
    if (BADGE_STATUSES.has(status)) {
      const badge = document.createElement("span");
      badge.className = `badge badge-${status}`;
      badge.textContent = statusLabel(status);
      details.append(badge);
    }
    const facts = [answer.model, answer.completionTokens ? tokenCount(answer.completionTokens) : ""];
    const factsText = facts.filter(Boolean).join(" · ");
    if (factsText) {
      const span = document.createElement("span");
      span.className = "message-facts";
      span.textContent = factsText;
      details.append(span);
    }
    const actions = document.createElement("span");
    actions.className = "message-actions";
    if (answer.text) actions.append(actionButton("copy-answer", "📋", gettext("Copy"), gettext("Copy answer")));
    if (answer.id && answer.text && isCut(answer)) {
      actions.append(actionButton("continue-answer", "»", gettext("Continue"), gettext("Continue the answer")));
    }
    if (answer.id) {
      actions.append(actionButton("regenerate", "↻", gettext("Regenerate"), gettext("Regenerate the answer")));
    }
    this.footer.replaceChildren(details, actions);
  }
}

/** The open conversation's messages: one list item per Question or Answer, kept while it lives. */
export class MessageListView {
  constructor({ list, emptyState, scroller }) {
    this.list = list;
    this.emptyState = emptyState;
    this.scroller = scroller;
    this.items = new WeakMap(); // message -> list item
    this.messages = new WeakMap(); // list item -> message, for the copy/regenerate buttons
  }

  /** Make the list show `messages`, touching only the items that changed (selections stay). */
  render(messages) {
    messages.forEach((message, index) => {
      const item = this.itemFor(message);
      const current = this.list.children[index];
      if (current !== item) this.list.insertBefore(item, current ?? null);
    });
    while (this.list.children.length > messages.length) this.list.lastElementChild.remove();
    this.emptyState.hidden = messages.length > 0;
  }

  itemFor(message) {
    let item = this.items.get(message);
    if (!item) {
      item = message.role === "user" ? questionItem(message) : new AnswerView(message, this.scroller).item;
      this.items.set(message, item);
      this.messages.set(item, message);
    }
    return item;
  }

  /** Edit a question in place; resolves with the new text, or null when the edit was cancelled. */
  editQuestion(question) {
    const item = this.items.get(question);
    const bubble = item.querySelector(".bubble");
    const shown = [...bubble.childNodes];
    const form = document.createElement("form");
    form.className = "edit-form";
    const input = document.createElement("textarea");
    input.value = question.text;
    input.rows = Math.min(8, question.text.split("\n").length + 1);
    input.setAttribute("aria-label", gettext("Edited question"));
    const note = document.createElement("p");
    note.className = "edit-note";
    note.textContent = gettext("The answers after this question will be replaced.");
    const cancel = actionButton("edit-cancel", "✕", gettext("Cancel"));
    const send = document.createElement("button");
    send.type = "submit";
    send.className = "button button-primary";
    send.textContent = gettext("Send");
    const bar = document.createElement("div");
    bar.className = "edit-bar";
    bar.append(note, cancel, send);
    form.append(input, bar);
    bubble.replaceChildren(form);
    item.classList.add("editing");
    input.focus();
    return editInPlace(form, input, { cancel, enterSubmits: true }).then((text) => {
      bubble.replaceChildren(...shown);
      item.classList.remove("editing");
      return text?.trim() && text !== question.text ? text : null; // unchanged: nothing to send
    });
  }

  /** The message a click inside the list belongs to. */
  messageAt(element) {
    const item = element.closest(".message");
    return item ? this.messages.get(item) : undefined;
  }

  /** The answer's text as shown (no Markdown marks), for screen readers. */
  shownText(answer) {
    return this.items.get(answer)?.querySelector(".bubble-body")?.textContent ?? answer.text;
  }
}

// ---------------------------------------------------------------------------------------------
// Conversation list

export class ConversationListView {
  constructor({ list, emptyNote }) {
    this.list = list;
    this.emptyNote = emptyNote;
    this.conversations = [];
    this.searching = false;
    this.activeId = null;
    this.renaming = false; // a title is being edited: list updates wait until it is done
  }

  /** The list under date headings (today, yesterday, ...); `searching` words the empty note. */
  render(conversations = this.conversations, { searching = this.searching } = {}) {
    this.conversations = conversations;
    this.searching = searching;
    if (this.renaming) return;
    const focused = document.activeElement?.closest?.(".conversation");
    const focusedClass = focused && [...document.activeElement.classList].find((c) => c.startsWith("conversation-"));
    const items = [];
    let group = null;
    for (const conversation of conversations) {
      const heading = dateGroup(conversation.updated_at);
      if (heading !== group) items.push(groupHeading((group = heading)));
      items.push(conversationItem(conversation));
    }
    this.list.replaceChildren(...items);
    this.emptyNote.textContent = noConversationsText(searching);
    this.emptyNote.hidden = conversations.length > 0;
    this.markActive(this.activeId);
    if (focused && focusedClass) this.focus(focused.dataset.sessionId, `.${focusedClass}`);
  }

  markActive(sessionId) {
    this.activeId = sessionId;
    for (const item of this.list.children) {
      const active = item.dataset.sessionId === sessionId;
      item.classList.toggle("active", active);
      const open = item.querySelector(".conversation-open");
      if (active) open?.setAttribute("aria-current", "page");
      else open?.removeAttribute("aria-current");
    }
  }

  focus(sessionId, selector = ".conversation-open") {
    this.list.querySelector(`[data-session-id="${sessionId}"]`)?.querySelector(selector)?.focus();
  }

  /** Edit a title in place; resolves with the new title, or null when the edit was cancelled. */
  editTitle(item) {
    const conversation = this.conversations.find((c) => c.session_id === item.dataset.sessionId);
    if (!conversation) return Promise.resolve(null);
    const form = document.createElement("form");
    form.className = "rename-form";
    const input = document.createElement("input");
    input.type = "text";
    input.maxLength = 200;
    input.value = conversation.title;
    input.setAttribute("aria-label", gettext("Conversation title"));
    form.append(input);
    item.replaceChildren(form);
    this.renaming = true;
    input.focus();
    input.select();
    // Leaving the field saves, as in other apps' rename boxes.
    return editInPlace(form, input, { saveOnBlur: true }).then((saved) => {
      this.renaming = false;
      return saved === null ? null : saved.trim();
    });
  }
}

/**
 * Until the user is done with an in-place editor: resolves with the input's value when the
 * form is submitted (Enter, the submit button, leaving the field with `saveOnBlur`), with
 * null on Escape or a click on `cancel`. Escape does not reach the page (it would stop an answer).
 */
function editInPlace(form, input, { saveOnBlur = false, cancel = null, enterSubmits = false } = {}) {
  return new Promise((resolve) => {
    let done = false;
    const finish = (value) => {
      if (done) return;
      done = true;
      resolve(value);
    };
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      finish(input.value);
    });
    input.addEventListener("keydown", (event) => {
      if (event.key === "Escape") {
        event.preventDefault();
        event.stopPropagation();
        finish(null);
      } else if (enterSubmits && event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        form.requestSubmit();
      }
    });
    cancel?.addEventListener("click", () => finish(null));
    if (saveOnBlur) input.addEventListener("blur", () => finish(input.value));
  });
}

function groupHeading(text) {
  const item = document.createElement("li");
  item.className = "conversation-group";
  const heading = document.createElement("h2");
  heading.textContent = text;
  item.append(heading);
  return item;
}

function conversationItem(conversation) {
  const title = conversationTitle(conversation);
  const item = document.createElement("li");
  item.className = "conversation";
  item.dataset.sessionId = conversation.session_id;
  const open = document.createElement("button");
  open.type = "button";
  open.className = "conversation-open";
  open.textContent = title;
  open.title = title;
  item.append(
    open,
    actionButton("conversation-rename", "✎", gettext("Rename"), interpolate(gettext("Rename “%s”"), [title])),
    actionButton("conversation-delete", "🗑", gettext("Delete"), interpolate(gettext("Delete “%s”"), [title])),
  );
  return item;
}

// ---------------------------------------------------------------------------------------------
// The connection banner

export function renderConnectionBanner(banner, { online, reconnecting }) {
  let text = "";
  if (!online) {
    text = reconnecting
      ? gettext("You are offline. The answer will continue when the connection is back.")
      : gettext("You are offline.");
  } else if (reconnecting) {
    text = gettext("Connection lost. Reconnecting…");
  }
  banner.textContent = text;
  banner.hidden = !text;
  banner.dataset.state = online ? "reconnecting" : "offline";
}
