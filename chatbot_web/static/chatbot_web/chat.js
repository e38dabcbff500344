// The chat page: conversations in the sidebar, messages, answers streamed as they are written.
//
// Libraries (vendored, loaded as classic scripts before this module): marked, DOMPurify,
// highlight.js, and Django's JavaScript catalogue for gettext().
import { ApiError, ChatApi, ChatSocket, ConnectionLost, isAbort } from "chatbot/api";
import {
  AnswerProgress,
  endStatus,
  newUuid,
  RESUMABLE_STATUSES,
  readToEnd,
  retryDelay,
} from "chatbot/answer-progress";

const gettext = window.gettext ?? ((text) => text);
const interpolate = window.interpolate ?? ((text) => text);
const ngettext = window.ngettext ?? ((singular, plural, count) => (count === 1 ? singular : plural));

const LIVE_STATUSES = new Set(["pending", "streaming"]);
const BADGE_STATUSES = new Set(["stopped", "failed", "interrupted"]);
const STORAGE_KEYS = {
  session: "chatbot.sessionId",
  transport: "chatbot.transport",
  streaming: "chatbot.streaming",
};

const app = document.getElementById("app");
const ui = Object.fromEntries(
  [
    "sidebar", "sidebarToggle", "sidebarBackdrop", "newChatButton", "newChatCompactButton",
    "conversationList", "conversationEmpty", "usageToday", "streamingCheckbox", "transportSelect",
    "connectionBanner", "messages", "emptyState", "messageList", "scrollToBottom", "composer",
    "messageInput", "charCounter", "stopButton", "sendButton", "composerError", "announcer",
  ].map((id) => [id, document.getElementById(id)]),
);

const maxLength = Number(app.dataset.maxLength) || 1000;
const api = new ChatApi(app.dataset.apiRoot);
const wsUrl = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}${app.dataset.wsPath}`;

const state = {
  sessionId: null,
  conversations: [],
  runs: new Set(), // answers this page is reading right now
  renaming: false, // a title is being edited: list refreshes wait
  loadToken: 0, // guards against a slow conversation load finishing after a newer one
};

// ---------------------------------------------------------------------------------------------
// Browser storage (may be disabled: then choices just don't persist)

const stored = {
  get(key) {
    try {
      return localStorage.getItem(key);
    } catch {
      return null;
    }
  },
  set(key, value) {
    try {
      if (value === null || value === undefined) localStorage.removeItem(key);
      else localStorage.setItem(key, value);
    } catch {
      // Private mode or storage disabled.
    }
  },
};

// ---------------------------------------------------------------------------------------------
// Texts

function loadingText(streaming) {
  return streaming ? gettext("📡 Streaming...") : gettext("The assistant is thinking...");
}

function statusLabel(status) {
  const labels = { stopped: gettext("Stopped"), failed: gettext("Failed"), interrupted: gettext("Interrupted") };
  return labels[status] ?? status;
}

/** A readable, translated sentence for an error code: never the server's raw text. */
function errorText(code, { retryAfter = null, limit = null } = {}) {
  if (code === "rate_limited" || code === "throttled") return rateLimitText(limit, retryAfter);
  if (code?.startsWith("timeout_")) return gettext("The model took too long to answer. Try again.");
  const texts = {
    invalid: gettext("The message could not be sent: it is empty or too long."),
    payload_too_large: gettext("The message could not be sent: it is too long."),
    conversation_not_found: gettext("This conversation no longer exists."),
    message_not_found: gettext("This answer no longer exists."),
    not_found: gettext("Not found."),
    upstream_error: gettext("The model server had a problem and could not answer. Try again."),
    upstream_unavailable: gettext("The model server cannot be reached right now. Try again later."),
    upstream_protocol: gettext("The model server sent an answer that could not be read. Try again."),
    upstream_rate_limited: gettext("The model server is busy. Try again in a moment."),
    upstream_auth: gettext("The model server refused the chatbot's credentials. Please tell the administrator."),
    model_unavailable: gettext("The model is not available right now. Try again later."),
    interrupted: gettext("The server stopped while writing this answer; the partial answer was kept."),
    not_authenticated: gettext("Please sign in to chat."),
    authentication_failed: gettext("Please sign in to chat."),
    permission_denied: gettext("This action is not allowed. Reload the page and try again."),
    network: gettext("The connection was lost before the answer started. Check your connection and try again."),
  };
  return texts[code] ?? gettext("Something went wrong. Try again.");
}

function rateLimitText(limit, retryAfter) {
  if (limit === "tokens_per_day") {
    return retryAfter === null
      ? gettext("Today's token allowance is used up.")
      : interpolate(gettext("Today's token allowance is used up. It renews in %s."), [duration(retryAfter)]);
  }
  if (limit === "concurrent_streams") {
    return gettext("Too many answers are being written at once. Wait for one to finish, then try again.");
  }
  return retryAfter === null
    ? gettext("Too many requests, retry in a moment.")
    : interpolate(gettext("Too many requests, retry in %s s."), [retryAfter]);
}

function duration(seconds) {
  if (seconds < 120) return interpolate(gettext("%s s"), [seconds]);
  if (seconds < 7200) return interpolate(gettext("%s min"), [Math.ceil(seconds / 60)]);
  return interpolate(gettext("%s h"), [Math.ceil(seconds / 3600)]);
}

// ---------------------------------------------------------------------------------------------
// Markdown: marked -> DOMPurify. Raw HTML in answers is shown as text, never run.

const SANITIZE_OPTIONS = {
  USE_PROFILES: { html: true },
  FORBID_TAGS: ["style", "img", "form", "input", "button", "textarea", "select", "iframe", "video", "audio"],
  FORBID_ATTR: ["style"],
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

let highlightCache = new Map(); // the current bubble's highlighted code blocks, reused while it streams

function highlightCode(code, language) {
  const key = `${language}\u0000${code}`;
  let html = highlightCache.get(key);
  if (html === undefined) {
    html = language
      ? window.hljs.highlight(code, { language, ignoreIllegals: true }).value
      : escapeHtml(code);
    highlightCache.set(key, html);
  }
  return html;
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

function renderMarkdown(source, cache) {
  highlightCache = cache;
  if (cache.size > 64) cache.clear(); // a growing code block adds one entry per frame
  return window.DOMPurify.sanitize(markdownParser.parse(source), SANITIZE_OPTIONS);
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

function actionButton(className, icon, label, accessibleName = label) {
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

const scroller = {
  stick: true,

  init() {
    ui.messages.addEventListener(
      "scroll",
      () => {
        const distance = ui.messages.scrollHeight - ui.messages.scrollTop - ui.messages.clientHeight;
        this.stick = distance < 48;
        ui.scrollToBottom.hidden = this.stick;
      },
      { passive: true },
    );
    ui.scrollToBottom.addEventListener("click", () => this.toBottom());
  },

  follow() {
    if (this.stick) ui.messages.scrollTop = ui.messages.scrollHeight;
  },

  toBottom() {
    this.stick = true;
    ui.scrollToBottom.hidden = true;
    ui.messages.scrollTop = ui.messages.scrollHeight;
  },
};

// ---------------------------------------------------------------------------------------------
// Messages

const answerViews = new WeakMap(); // list item -> AnswerView, for the copy/regenerate buttons

function messageItem(role) {
  const item = document.createElement("li");
  item.className = `message message-${role}`;
  const bubble = document.createElement("div");
  bubble.className = "bubble";
  item.append(bubble);
  return item;
}

function appendMessageItem(item) {
  ui.messageList.append(item);
  ui.emptyState.hidden = true;
}

function appendUserMessage(text) {
  const item = messageItem("user");
  const body = document.createElement("div");
  body.className = "bubble-body";
  body.textContent = text; // the user's own text is shown as typed, never parsed as HTML
  item.querySelector(".bubble").append(body);
  appendMessageItem(item);
  return item;
}

function clearMessages() {
  ui.messageList.replaceChildren();
  ui.emptyState.hidden = false;
}

/** One assistant answer. While it streams, its text is re-rendered at most once per frame. */
class AnswerView {
  constructor() {
    this.text = "";
    this.frame = 0;
    this.codeCache = new Map();
    this.streamed = false;
    this.model = "";
    this.messageId = null; // known once the server names the answer
    this.completionTokens = null;

    this.item = messageItem("assistant");
    this.item.classList.add("running");
    const bubble = this.item.querySelector(".bubble");
    this.body = document.createElement("div");
    this.body.className = "bubble-body markdown";
    this.loading = document.createElement("div");
    this.loading.className = "loading";
    this.loading.hidden = true;
    this.footer = document.createElement("div");
    this.footer.className = "message-footer";
    bubble.append(this.body, this.loading, this.footer);
    answerViews.set(this.item, this);
  }

  setLoading(text) {
    this.loading.textContent = text;
    this.loading.hidden = false;
  }

  append(delta) {
    this.text += delta;
    this.scheduleRender();
  }

  replaceText(text) {
    this.text = text;
    this.scheduleRender();
  }

  scheduleRender() {
    if (this.frame) return;
    this.frame = requestAnimationFrame(() => {
      this.frame = 0;
      this.render();
    });
  }

  render() {
    if (this.frame) cancelAnimationFrame(this.frame);
    this.frame = 0;
    this.body.innerHTML = renderMarkdown(this.text, this.codeCache);
    decorateCodeBlocks(this.body);
    scroller.follow();
  }

  /** The answer ended: final render, status badge, error text, actions. */
  finish({ status, errorCode = "", retryAfter = null, limit = null, finishReason = "" }) {
    this.render();
    this.loading.remove();
    this.item.classList.remove("running");
    this.item.dataset.status = status;
    this.renderFooter(status);
    if (errorCode) this.showError(errorText(errorCode, { retryAfter, limit }));
    else if (finishReason === "length") this.showNote(gettext("The answer was cut at the length limit."));
    this.codeCache = new Map();
    scroller.follow();
  }

  showNote(text) {
    const note = document.createElement("p");
    note.className = "message-note";
    note.textContent = text;
    this.footer.before(note);
  }

  showError(text) {
    const error = document.createElement("p");
    error.className = "message-error";
    error.textContent = text;
    this.footer.before(error);
  }

  renderFooter(status) {
    const details = document.createElement("span");
    details.className = "message-details";
    if (this.streamed) {
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
    const facts = [this.model];
    if (this.completionTokens) {
      facts.push(interpolate(ngettext("%s token", "%s tokens", this.completionTokens), [this.completionTokens]));
    }
    const factsText = facts.filter(Boolean).join(" · ");
    if (factsText) {
      const span = document.createElement("span");
      span.className = "message-facts";
      span.textContent = factsText;
      details.append(span);
    }
    const actions = document.createElement("span");
    actions.className = "message-actions";
    if (this.text) actions.append(actionButton("copy-answer", "📋", gettext("Copy"), gettext("Copy answer")));
    if (this.messageId) {
      actions.append(actionButton("regenerate", "↻", gettext("Regenerate"), gettext("Regenerate the answer")));
    }
    this.footer.replaceChildren(details, actions);
  }
}

function appendAnswerView() {
  const view = new AnswerView();
  appendMessageItem(view.item);
  return view;
}

/** Whether an answer was asked for as a stream (any streaming transport, or the seed's flag). */
function wasStreamed(message) {
  return message.streaming || (Boolean(message.transport) && message.transport !== "json");
}

function appendFinishedAnswer(message) {
  const view = appendAnswerView();
  view.streamed = wasStreamed(message);
  view.messageId = message.id;
  view.text = message.content;
  view.model = message.model;
  view.completionTokens = message.completion_tokens;
  view.finish({ status: message.status, errorCode: message.error_code, finishReason: message.finish_reason });
}

function announce(text) {
  // Clearing first makes a repeated identical text be announced again.
  ui.announcer.textContent = "";
  setTimeout(() => {
    ui.announcer.textContent = text;
  }, 100);
}

// ---------------------------------------------------------------------------------------------
// Transports: SSE over fetch (default) or one WebSocket; both deliver the same events.

let chatSocket = null;

const transports = {
  sse: {
    streamChat: (options) => api.streamChat(options),
    streamRegenerate: (options) => api.streamRegenerate(options),
    followEvents: (options) => api.followEvents(options),
    stop: (messageId) => api.stopMessage(messageId),
  },
  ws: {
    socket: () => (chatSocket ??= new ChatSocket(wsUrl)),
    streamChat(options) {
      return this.socket().streamChat(options);
    },
    streamRegenerate(options) {
      return this.socket().streamRegenerate(options);
    },
    followEvents(options) {
      return this.socket().followEvents(options);
    },
    stop(messageId) {
      return this.socket().stop(messageId);
    },
  },
};

function selectedTransport() {
  return transports[ui.transportSelect.value] ?? transports.sse;
}

// ---------------------------------------------------------------------------------------------
// Answer runs: one answer being read, its events, reconnection and stop

class AnswerRun {
  constructor(view, { transport = null, text = "", replaces = null } = {}) {
    this.view = view;
    this.transport = transport; // null for the JSON mode
    this.text = text; // the user's message, to restore it if the request is refused
    this.replaces = replaces; // the answer being regenerated, put back if the request is refused
    this.sessionId = state.sessionId;
    this.progress = new AnswerProgress();
    this.stopRequested = false;
    this.reconnecting = false;
    this.controller = new AbortController();
    this.onEvent = (event) => this.handle(event);
  }

  get signal() {
    return this.controller.signal;
  }

  get messageId() {
    return this.view.messageId;
  }

  set messageId(id) {
    this.view.messageId = id;
  }

  get finished() {
    return this.progress.finished;
  }

  get lastSeq() {
    return this.progress.lastSeq;
  }

  get terminal() {
    return this.progress.terminal;
  }

  handle(event) {
    const action = this.progress.apply(event);
    if (action === null) return; // a replay after a reconnect repeats events: each seq once
    if (this.reconnecting) {
      this.reconnecting = false;
      connection.update();
    }
    if (action.type === "meta") this.handleMeta(action.event);
    else if (action.type === "append") this.view.append(action.text);
    else if (action.type === "replace") this.view.replaceText(action.text);
    else if (action.type === "usage") this.view.completionTokens = action.completionTokens;
    // "resume" and "end": driveRun reads `finished` when the stream is over.
  }

  handleMeta(event) {
    this.messageId = event.message_id;
    this.view.model = event.model;
    if (event.session_id && event.session_id !== state.sessionId) {
      setSession(event.session_id);
      refreshConversations();
    }
    if (this.stopRequested) this.stop().catch(showRequestError);
  }

  stop() {
    if (!this.transport) return stopJsonAnswer(this);
    if (!this.messageId) {
      this.stopRequested = true; // sent as soon as the answer's id is known
      return Promise.resolve();
    }
    return this.transport.stop(this.messageId);
  }
}

function startRun(view, options) {
  const run = new AnswerRun(view, options);
  state.runs.add(run);
  updateControls();
  return run;
}

function endRun(run) {
  state.runs.delete(run);
  connection.update();
  updateControls();
}

/** Stop reading the answers on screen (switching conversation); they go on on the server. */
function detachRuns() {
  for (const run of state.runs) run.controller.abort();
  state.runs.clear();
  connection.update();
  updateControls();
}

/**
 * Read an answer to its terminal event. A cut connection is resumed from the last event
 * seen (`after=lastSeq`), with backoff, so the text is never lost nor repeated.
 */
async function driveRun(run, firstRequest) {
  try {
    const { resumed } = await readToEnd({
      progress: run.progress,
      start: firstRequest,
      resume: (after) =>
        run.transport.followEvents({ messageId: run.messageId, after, signal: run.signal, onEvent: run.onEvent }),
      canResume: (error) => canResumeAfter(error, run),
      wait: (attempt, retryAfter) => waitBeforeRetry(attempt, run.signal, retryAfter),
      hasAnswer: () => Boolean(run.messageId),
      neverStarted: () => new ConnectionLost(),
      onRetry: () => {
        run.reconnecting = true;
        connection.update();
      },
    });
    if (resumed) await catchUpWithStoredText(run);
    finishRun(run);
  } catch (error) {
    if (!isAbort(error)) failRun(run, error);
  } finally {
    endRun(run);
  }
}

/**
 * After a resume, the server may have rebuilt the events from the database (its event log
 * expired or it restarted) and sent only the ending: take the saved text if it is longer.
 */
async function catchUpWithStoredText(run) {
  try {
    const message = await api.getMessage(run.messageId);
    if (message.content.length > run.view.text.length) run.view.replaceText(message.content);
  } catch {
    // Keep what was streamed: it is the best text this page has.
  }
}

/** A broken connection, or a busy server while following a started answer: try again. */
function canResumeAfter(error, run) {
  if (error instanceof ConnectionLost) return true;
  return error instanceof ApiError && run.messageId !== null && RESUMABLE_STATUSES.has(error.status);
}

function finishRun(run) {
  const event = run.terminal;
  if (event.type === "done") {
    run.view.finish({ status: event.status, finishReason: event.finish_reason });
    announce(run.view.body.textContent);
  } else {
    run.view.finish({ status: endStatus(event), errorCode: event.code });
    announce(errorText(event.code));
  }
  refreshConversations();
  refreshUsage();
}

/** The answer could not be read. A refused request leaves nothing behind: undo the bubbles. */
function failRun(run, error) {
  if (error instanceof ApiError && !run.messageId) {
    if (run.replaces) run.view.item.replaceWith(run.replaces.item);
    else undoSend(run, error);
    showRequestError(error);
    refreshConversations();
    return;
  }
  if (!(error instanceof ApiError) && !(error instanceof ConnectionLost)) console.error(error);
  const code = error instanceof ApiError ? error.code : error instanceof ConnectionLost ? "network" : "error";
  run.view.finish({ status: "failed", errorCode: code, retryAfter: error.retryAfter ?? null, limit: error.limit });
  announce(errorText(code));
}

function undoSend(run, error) {
  const userItem = run.view.item.previousElementSibling;
  run.view.item.remove();
  if (userItem?.classList.contains("message-user")) userItem.remove();
  if (!ui.messageList.children.length) ui.emptyState.hidden = false;
  if (error.code === "conversation_not_found") startNewChat(); // deleted elsewhere: start afresh
  if (!ui.messageInput.value) {
    ui.messageInput.value = run.text;
    updateCounter();
  }
}

function waitBeforeRetry(attempt, signal, retryAfterSeconds = null) {
  const delay = retryDelay(attempt, retryAfterSeconds);
  return new Promise((resolve, reject) => {
    const finish = (settle) => {
      clearTimeout(timer);
      window.removeEventListener("online", onOnline);
      signal.removeEventListener("abort", onAbort);
      settle();
    };
    const onOnline = () => finish(resolve);
    const onAbort = () => finish(() => reject(new DOMException("aborted", "AbortError")));
    // Offline: the `online` event ends the wait; the long timer covers a wrong navigator.onLine.
    const timer = setTimeout(() => finish(resolve), navigator.onLine ? delay : 30_000);
    window.addEventListener("online", onOnline);
    signal.addEventListener("abort", onAbort);
  });
}

const connection = {
  update() {
    const reconnecting = [...state.runs].some((run) => run.reconnecting);
    let text = "";
    if (!navigator.onLine) {
      text = reconnecting
        ? gettext("You are offline. The answer will continue when the connection is back.")
        : gettext("You are offline.");
    } else if (reconnecting) {
      text = gettext("Connection lost. Reconnecting…");
    }
    ui.connectionBanner.textContent = text;
    ui.connectionBanner.hidden = !text;
    ui.connectionBanner.dataset.state = navigator.onLine ? "reconnecting" : "offline";
  },
};

// ---------------------------------------------------------------------------------------------
// Sending

function sendMessage(text) {
  hideComposerError();
  appendUserMessage(text);
  scroller.toBottom();
  const sessionId = state.sessionId;
  requestAnswer(appendAnswerView(), { text }, {
    stream: (transport, options) => transport.streamChat({ message: text, sessionId, ...options }),
    json: (options) => api.sendJson({ message: text, sessionId, ...options }),
  });
}

/** Answer the last question again: the new answer takes the old one's place. */
function regenerateLastAnswer() {
  const old = answerViews.get(ui.messageList.lastElementChild);
  if (state.runs.size || !old?.messageId) return;
  hideComposerError();
  const { messageId } = old;
  const view = new AnswerView();
  old.item.replaceWith(view.item);
  requestAnswer(view, { replaces: old }, {
    stream: (transport, options) => transport.streamRegenerate({ messageId, ...options }),
    json: (options) => api.regenerateJson({ messageId, ...options }),
  });
}

/** Read a new answer in the chosen mode: `request.stream(transport, options)` or `request.json(options)`. */
function requestAnswer(view, runOptions, request) {
  if (ui.streamingCheckbox.checked) streamAnswer(view, runOptions, request.stream);
  else jsonAnswer(view, runOptions, request.json);
}

function streamAnswer(view, runOptions, request) {
  view.streamed = true;
  view.setLoading(loadingText(true));
  const transport = selectedTransport();
  const run = startRun(view, { ...runOptions, transport });
  driveRun(run, () => request(transport, { signal: run.signal, onEvent: run.onEvent }));
}

/** The seed's mode: wait for the whole answer, then show it. */
async function jsonAnswer(view, runOptions, request) {
  view.setLoading(loadingText(false));
  scroller.follow();
  const run = startRun(view, runOptions);
  // The page names the answer itself, so Stop can reach it before the JSON comes back.
  run.answerId = newUuid();
  if (!state.sessionId) showNewConversationSoon(run);
  try {
    const body = await request({ signal: run.signal, answerId: run.answerId });
    run.messageId = body.message_id;
    if (body.session_id !== state.sessionId) setSession(body.session_id);
    view.model = body.model;
    view.completionTokens = body.usage?.completion_tokens ?? null;
    view.streamed = Boolean(body.is_streaming);
    view.text = body.response ?? "";
    run.progress.apply(
      body.success
        ? { type: "done", status: body.status, finish_reason: body.finish_reason }
        : { type: "error", status: body.status, code: body.code ?? "error", retryable: false },
    );
    finishRun(run);
  } catch (error) {
    if (isAbort(error)) return;
    if (error instanceof ConnectionLost && state.sessionId) {
      await resumeConversationLater(run);
      return;
    }
    failRun(run, error);
  } finally {
    endRun(run);
  }
}

/**
 * A JSON-mode first message learns its conversation only with the answer: ask for the
 * answer the page named as soon as the server has saved it, and list its conversation.
 */
async function showNewConversationSoon(run) {
  const message = await onceSaved(run, () => api.getMessage(run.answerId)).catch(() => null);
  if (message && !state.sessionId && state.runs.has(run)) {
    setSession(message.conversation);
    refreshConversations();
  }
}

/** The JSON request broke, but the answer goes on on the server: once back, reload and follow it. */
async function resumeConversationLater(run) {
  run.reconnecting = true;
  connection.update();
  try {
    await waitBeforeRetry(0, run.signal);
  } catch {
    return; // the page moved on meanwhile
  }
  loadConversation(state.sessionId);
}

/** Stop for the JSON mode: the answer has the id this page gave it (it may not exist yet). */
function stopJsonAnswer(run) {
  return onceSaved(run, () => api.stopMessage(run.answerId));
}

/**
 * `request()` for an answer the page named, retried while the server has not saved it
 * yet (404), for as long as the run lasts; resolves with its result, or null.
 */
async function onceSaved(run, request, { attempts = 10, delay = 300 } = {}) {
  for (let attempt = 0; attempt < attempts && state.runs.has(run); attempt++) {
    try {
      return await request();
    } catch (error) {
      if (!(error instanceof ApiError && error.status === 404)) throw error;
      await new Promise((resolve) => setTimeout(resolve, delay));
    }
  }
  return null;
}

function stopAnswers() {
  ui.stopButton.disabled = true;
  for (const run of state.runs) run.stop().catch(showRequestError);
  ui.messageInput.focus(); // the disabled Stop button must not drop the focus to the page body
}

// ---------------------------------------------------------------------------------------------
// Conversations

function setSession(sessionId) {
  state.sessionId = sessionId;
  stored.set(STORAGE_KEYS.session, sessionId);
  markActiveConversation();
}

function startNewChat() {
  state.loadToken++;
  detachRuns();
  setSession(null);
  clearMessages();
  hideComposerError();
  setSidebarOpen(false);
  ui.messageInput.focus();
}

/** Show a conversation: finished answers from its history, live ones followed from their start. */
async function loadConversation(sessionId) {
  const token = ++state.loadToken;
  detachRuns();
  setSession(sessionId);
  clearMessages();
  ui.messages.setAttribute("aria-busy", "true");
  let conversation;
  try {
    conversation = await api.getConversation(sessionId);
  } catch (error) {
    if (token !== state.loadToken) return;
    ui.messages.removeAttribute("aria-busy");
    if (error instanceof ApiError && error.status === 404) {
      setSession(null);
      refreshConversations();
    } else {
      showRequestError(error);
    }
    return;
  }
  if (token !== state.loadToken) return;
  ui.messages.removeAttribute("aria-busy");
  for (const message of conversation.messages) {
    if (message.role === "user") appendUserMessage(message.content);
    else if (LIVE_STATUSES.has(message.status)) followLiveAnswer(message);
    else appendFinishedAnswer(message);
  }
  scroller.toBottom();
}

/**
 * An answer still being written (after a reload or a switch): replay its events from the
 * first one and render from scratch, so its text appears exactly once.
 */
function followLiveAnswer(message) {
  const view = appendAnswerView();
  view.streamed = wasStreamed(message); // shown as it was asked for, though it is followed live
  view.model = message.model;
  view.setLoading(loadingText(view.streamed));
  const transport = selectedTransport();
  const run = startRun(view, { transport });
  run.messageId = message.id;
  driveRun(run, () =>
    transport.followEvents({ messageId: message.id, after: 0, signal: run.signal, onEvent: run.onEvent }),
  );
}

async function refreshConversations() {
  try {
    state.conversations = await api.listConversations();
  } catch {
    return; // the list stays as it was; the next refresh will try again
  }
  renderConversationList();
}

function conversationTitle(conversation) {
  return conversation.title || gettext("New conversation");
}

function renderConversationList() {
  if (state.renaming) return;
  const focused = document.activeElement?.closest?.(".conversation");
  const focusedClass = focused && [...document.activeElement.classList].find((c) => c.startsWith("conversation-"));
  ui.conversationList.replaceChildren(...state.conversations.map(conversationItem));
  ui.conversationEmpty.hidden = state.conversations.length > 0;
  markActiveConversation();
  if (focused && focusedClass) {
    const item = ui.conversationList.querySelector(`[data-session-id="${focused.dataset.sessionId}"]`);
    item?.querySelector(`.${focusedClass}`)?.focus();
  }
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

function markActiveConversation() {
  for (const item of ui.conversationList.children) {
    const active = item.dataset.sessionId === state.sessionId;
    item.classList.toggle("active", active);
    const open = item.querySelector(".conversation-open");
    if (active) open?.setAttribute("aria-current", "page");
    else open?.removeAttribute("aria-current");
  }
}

function startRename(item) {
  const conversation = state.conversations.find((c) => c.session_id === item.dataset.sessionId);
  if (!conversation) return;
  const form = document.createElement("form");
  form.className = "rename-form";
  const input = document.createElement("input");
  input.type = "text";
  input.maxLength = 200;
  input.value = conversation.title;
  input.setAttribute("aria-label", gettext("Conversation title"));
  form.append(input);
  item.replaceChildren(form);
  state.renaming = true;
  input.focus();
  input.select();

  let done = false;
  const finish = async (save) => {
    if (done) return;
    done = true;
    state.renaming = false;
    const title = input.value.trim();
    if (save && title && title !== conversation.title) {
      try {
        Object.assign(conversation, await api.renameConversation(conversation.session_id, title));
      } catch (error) {
        showRequestError(error);
      }
    }
    renderConversationList();
    const item = ui.conversationList.querySelector(`[data-session-id="${conversation.session_id}"]`);
    item?.querySelector(".conversation-open")?.focus();
  };
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    finish(true);
  });
  input.addEventListener("keydown", (event) => {
    if (event.key === "Escape") {
      event.preventDefault();
      event.stopPropagation();
      finish(false);
    }
  });
  input.addEventListener("blur", () => finish(true));
}

async function deleteConversation(sessionId) {
  const conversation = state.conversations.find((c) => c.session_id === sessionId);
  const question = interpolate(gettext("Delete the conversation “%s”? This cannot be undone."), [
    conversation ? conversationTitle(conversation) : "",
  ]);
  if (!window.confirm(question)) return;
  try {
    await api.deleteConversation(sessionId);
  } catch (error) {
    if (!(error instanceof ApiError && error.status === 404)) {
      showRequestError(error);
      return;
    }
  }
  if (sessionId === state.sessionId) startNewChat();
  state.conversations = state.conversations.filter((c) => c.session_id !== sessionId);
  renderConversationList();
  ui.newChatButton.focus();
}

function onConversationListClick(event) {
  const button = event.target.closest("button");
  const item = button?.closest(".conversation");
  if (!item) return;
  if (button.classList.contains("conversation-open")) {
    if (item.dataset.sessionId !== state.sessionId || !ui.messageList.children.length) {
      loadConversation(item.dataset.sessionId);
    }
    setSidebarOpen(false);
  } else if (button.classList.contains("conversation-rename")) {
    startRename(item);
  } else if (button.classList.contains("conversation-delete")) {
    deleteConversation(item.dataset.sessionId);
  }
}

// ---------------------------------------------------------------------------------------------
// Usage today (shown only when the server has the usage endpoint)

async function refreshUsage() {
  const usage = await api.usage();
  if (!usage?.today) return;
  const { prompt_tokens: prompt = 0, completion_tokens: completion = 0 } = usage.today;
  const format = (n) => new Intl.NumberFormat(document.documentElement.lang || undefined).format(n);
  const allowance = usage.limits?.tokens_per_day;
  const counted = { used: format(usage.limits?.tokens_used_today ?? prompt + completion), allowance: format(allowance) };
  if (!allowance) {
    ui.usageToday.textContent = interpolate(gettext("Usage today: %s tokens"), [format(prompt + completion)]);
  } else if (usage.limits.counted_per === "address") {
    // An anonymous visitor: their own usage, and the allowance they share with their address.
    ui.usageToday.textContent = interpolate(
      gettext("Usage today: %(own)s tokens (this address: %(used)s of %(allowance)s)"),
      { own: format(prompt + completion), ...counted },
      true,
    );
  } else {
    ui.usageToday.textContent = interpolate(gettext("Usage today: %(used)s of %(allowance)s tokens"), counted, true);
  }
  ui.usageToday.hidden = false;
}

// ---------------------------------------------------------------------------------------------
// Composer

function characterCount(text) {
  return [...text].length; // code points, as the server counts them
}

function updateCounter() {
  const count = characterCount(ui.messageInput.value);
  ui.charCounter.textContent = `${count} / ${maxLength}`;
  ui.charCounter.classList.toggle("over", count > maxLength);
  // A "too long" error is over once the text fits again.
  if (count <= maxLength && ui.composerError.dataset.reason === "too-long") hideComposerError();
  // Grow with the text up to a limit (CSS max-height), then scroll.
  ui.messageInput.style.height = "auto";
  ui.messageInput.style.height = `${ui.messageInput.scrollHeight}px`;
}

function updateControls() {
  const running = state.runs.size > 0;
  ui.stopButton.hidden = !running;
  ui.stopButton.disabled = false;
  ui.sendButton.disabled = running;
  ui.transportSelect.disabled = !ui.streamingCheckbox.checked;
  app.classList.toggle("answer-running", running);
}

function submitMessage() {
  const text = ui.messageInput.value;
  if (!text.trim() || state.runs.size) return;
  const count = characterCount(text);
  if (count > maxLength) {
    showComposerError(
      interpolate(
        gettext("The message is too long: %(count)s characters, the limit is %(max)s."),
        { count, max: maxLength },
        true,
      ),
      "too-long",
    );
    return;
  }
  ui.messageInput.value = "";
  updateCounter();
  sendMessage(text);
}

let errorCountdown = 0;

function showComposerError(text, reason = "") {
  clearInterval(errorCountdown);
  ui.composerError.textContent = text;
  ui.composerError.dataset.reason = reason;
  ui.composerError.hidden = false;
}

function hideComposerError() {
  clearInterval(errorCountdown);
  ui.composerError.hidden = true;
  ui.composerError.textContent = "";
  ui.composerError.dataset.reason = "";
}

/** Show why a request was refused; a rate limit counts down its Retry-After. */
function showRequestError(error) {
  if (isAbort(error)) return;
  if (!(error instanceof ApiError)) {
    showComposerError(errorText(error instanceof ConnectionLost ? "network" : "error"));
    return;
  }
  const rateLimited = error.status === 429 || error.code === "rate_limited" || error.code === "throttled";
  const code = rateLimited ? "rate_limited" : error.code;
  const { limit } = error;
  showComposerError(errorText(code, { retryAfter: error.retryAfter, limit }));
  if (rateLimited && error.retryAfter) {
    let remaining = error.retryAfter;
    errorCountdown = setInterval(() => {
      remaining -= 1;
      if (remaining <= 0) hideComposerError();
      else ui.composerError.textContent = errorText(code, { retryAfter: remaining, limit });
    }, 1000);
  }
}

// ---------------------------------------------------------------------------------------------
// Clipboard

async function copyText(text, button) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    copyWithSelection(text); // no Clipboard API outside secure contexts (plain http)
  }
  const label = button.querySelector(".action-label");
  const previous = label.textContent;
  label.textContent = gettext("Copied");
  button.classList.add("copied");
  setTimeout(() => {
    label.textContent = previous;
    button.classList.remove("copied");
  }, 1500);
}

function copyWithSelection(text) {
  const area = document.createElement("textarea");
  area.value = text;
  area.setAttribute("readonly", "");
  area.className = "clipboard-helper";
  document.body.append(area);
  area.select();
  document.execCommand("copy");
  area.remove();
}

function onMessageListClick(event) {
  const button = event.target.closest("button");
  if (!button) return;
  if (button.classList.contains("copy-code")) {
    copyText(button.closest(".code-block").querySelector("code").textContent, button);
  } else if (button.classList.contains("copy-answer")) {
    copyText(answerViews.get(button.closest(".message"))?.text ?? "", button);
  } else if (button.classList.contains("regenerate")) {
    regenerateLastAnswer();
  }
}

// ---------------------------------------------------------------------------------------------
// Layout: the sidebar is a drawer on small screens

function setSidebarOpen(open) {
  app.classList.toggle("sidebar-open", open);
  ui.sidebarToggle.setAttribute("aria-expanded", String(open));
  ui.sidebarBackdrop.hidden = !open;
  if (open) ui.newChatButton.focus();
}

// ---------------------------------------------------------------------------------------------
// Start

function restoreChoices() {
  ui.streamingCheckbox.checked = stored.get(STORAGE_KEYS.streaming) === "1";
  const transport = stored.get(STORAGE_KEYS.transport);
  if (transport in transports) ui.transportSelect.value = transport;
}

function bindEvents() {
  ui.streamingCheckbox.addEventListener("change", () => {
    stored.set(STORAGE_KEYS.streaming, ui.streamingCheckbox.checked ? "1" : "0");
    updateControls();
  });
  ui.transportSelect.addEventListener("change", () => {
    stored.set(STORAGE_KEYS.transport, ui.transportSelect.value);
  });
  ui.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    submitMessage();
  });
  ui.messageInput.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      submitMessage();
    }
  });
  ui.messageInput.addEventListener("input", updateCounter);
  ui.stopButton.addEventListener("click", stopAnswers);
  ui.newChatButton.addEventListener("click", startNewChat);
  ui.newChatCompactButton.addEventListener("click", startNewChat);
  ui.conversationList.addEventListener("click", onConversationListClick);
  ui.messageList.addEventListener("click", onMessageListClick);
  ui.sidebarToggle.addEventListener("click", () => setSidebarOpen(!app.classList.contains("sidebar-open")));
  ui.sidebarBackdrop.addEventListener("click", () => setSidebarOpen(false));
  document.addEventListener("keydown", (event) => {
    if (event.key !== "Escape" || event.defaultPrevented) return;
    if (app.classList.contains("sidebar-open")) {
      setSidebarOpen(false);
      ui.sidebarToggle.focus();
    } else if (state.runs.size) {
      stopAnswers(); // Escape stops the running answer, as in other chat apps
    }
  });
  window.addEventListener("online", () => connection.update());
  window.addEventListener("offline", () => connection.update());
  scroller.init();
}

function start() {
  restoreChoices();
  bindEvents();
  updateCounter();
  updateControls();
  connection.update();
  refreshConversations();
  refreshUsage();
  const sessionId = stored.get(STORAGE_KEYS.session);
  if (sessionId) loadConversation(sessionId);
  app.dataset.ready = "true"; // lets the browser tests know the page is wired up
}

start();
