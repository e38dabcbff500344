// The chat page's wiring: the state (conversation.js), the views (chat-views.js) and the
// user's input meet here. Nothing in this file decides what an answer is; it routes.
import { ApiError, ChatApi, ChatSocket, ConnectionLost, isAbort } from "chatbot/api";
import { retryDelay } from "chatbot/answer-progress";
import { Chat } from "chatbot/conversation";
import {
  ConversationListView,
  MessageListView,
  renderConnectionBanner,
  Scroller,
} from "chatbot/views";
import { conversationTitle, errorText, gettext, interpolate, tooLongText, usageText } from "chatbot/texts";

const STORAGE_KEYS = {
  session: "chatbot.sessionId",
  transport: "chatbot.transport",
  streaming: "chatbot.streaming",
};
const OFFLINE_RETRY_MS = 30_000; // offline, the `online` event ends the wait; this covers a wrong navigator.onLine
const COPIED_FEEDBACK_MS = 1500;
const ANNOUNCE_DELAY_MS = 100;
const DRAWER_MAX_WIDTH_PX = 760; // chat.css's breakpoint: below it the sidebar is a drawer
const SEARCH_DELAY_MS = 250; // typing pauses this long before the list is searched

const app = document.getElementById("app");
const ui = Object.fromEntries(
  [
    "sidebar", "sidebarToggle", "sidebarBackdrop", "newChatButton", "newChatCompactButton",
    "conversationList", "conversationEmpty", "usageToday", "streamingCheckbox", "transportSelect",
    "connectionBanner", "messages", "emptyState", "messageList", "scrollToBottom", "composer",
    "messageInput", "charCounter", "stopButton", "sendButton", "composerError", "announcer", "main",
    "settings", "exportMenu", "exportMarkdown", "exportJson", "conversationSearch", "languageForm",
    "languageSelect", "themeSelect", "codeLight", "codeDark", "modelPicker", "modelSelect",
  ].map((id) => [id, document.getElementById(id)]),
);

const maxLength = Number(app.dataset.maxLength) || 1000;
const api = new ChatApi(app.dataset.apiRoot);
const wsUrl = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}${app.dataset.wsPath}`;

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
// Transports: SSE over fetch (default) or one WebSocket; both deliver the same events.

let chatSocket = null; // opened on first use

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

/** Resolves when it is time to reconnect: after the backoff, or as soon as the browser is back online. */
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
    const timer = setTimeout(() => finish(resolve), navigator.onLine ? delay : OFFLINE_RETRY_MS);
    window.addEventListener("online", onOnline);
    signal.addEventListener("abort", onAbort);
  });
}

const chat = new Chat({
  api,
  model: () => (ui.modelPicker.hidden ? null : ui.modelSelect.value),
  transport: () => transports[ui.transportSelect.value] ?? transports.sse,
  streaming: () => ui.streamingCheckbox.checked,
  storage: stored,
  sessionKey: STORAGE_KEYS.session,
  wait: waitBeforeRetry,
});

const scroller = new Scroller(ui.messages, ui.scrollToBottom);
const messageList = new MessageListView({ list: ui.messageList, emptyState: ui.emptyState, scroller });
const conversationList = new ConversationListView({ list: ui.conversationList, emptyNote: ui.conversationEmpty });

// ---------------------------------------------------------------------------------------------
// The address bar: each conversation has its link (`c/<session_id>`); back and forward move
// between the conversations opened, and a reload shows the same one.

const address = {
  root: app.dataset.pageRoot || "/",
  push: false, // the next change is the user's own navigation: a new history entry
  applying: false, // showing what back/forward chose: the address is already right

  pathOf(sessionId) {
    return sessionId ? `${this.root}c/${encodeURIComponent(sessionId)}` : this.root;
  },

  sessionOf(path) {
    const prefix = `${this.root}c/`;
    return path.startsWith(prefix) ? decodeURIComponent(path.slice(prefix.length)) || null : null;
  },

  navigating() {
    this.push = true;
  },

  /** The open conversation changed: a new entry for the user's navigation, else the same one updated. */
  show(sessionId) {
    const push = this.push;
    this.push = false;
    const path = this.pathOf(sessionId);
    if (this.applying || location.pathname === path) return;
    if (push) history.pushState({ sessionId }, "", path);
    else history.replaceState({ sessionId }, "", path);
  },

  /** Back or forward: open what the address names. */
  follow() {
    const sessionId = this.sessionOf(location.pathname);
    this.applying = true;
    try {
      if (sessionId) chat.open(sessionId);
      else chat.newChat();
    } finally {
      this.applying = false;
    }
  },
};

// ---------------------------------------------------------------------------------------------
// State changes -> views

chat.on("messages", ({ messages, reason }) => {
  messageList.render(messages);
  if (reason === "send" || reason === "load") scroller.toBottom();
  else scroller.follow();
});
chat.on("session", (sessionId) => {
  conversationList.markActive(sessionId);
  address.show(sessionId);
  showExport(sessionId);
  models.showFor(sessionId);
});
chat.on("conversations", () => models.showFor(chat.sessionId));

/** The model picker: shown when the server can answer with several; each conversation keeps its pick. */
const models = {
  default: "",
  // What the user chose in the open chat: a later refresh of the conversation list (the page's
  // first load may end after the pick) must not put the default back. Forgotten when another
  // chat is shown (`chat.loadToken` counts those); a new chat that gets its id keeps it.
  picked: "",
  pickedIn: null,

  async load() {
    const listed = await api.models();
    if (!listed || listed.models.length < 2) return;
    this.default = listed.default;
    ui.modelSelect.replaceChildren(
      ...listed.models.map((name) => Object.assign(document.createElement("option"), { value: name, textContent: name })),
    );
    ui.modelPicker.hidden = false;
    this.showFor(chat.sessionId);
  },

  showFor(sessionId) {
    if (ui.modelPicker.hidden) return;
    if (this.pickedIn !== chat.loadToken) this.picked = "";
    const conversation = chat.conversations.find((c) => c.session_id === sessionId);
    const model = this.picked || conversation?.model || this.default;
    if ([...ui.modelSelect.options].some((option) => option.value === model)) ui.modelSelect.value = model;
  },
};

ui.modelSelect.addEventListener("change", () => {
  models.picked = ui.modelSelect.value;
  models.pickedIn = chat.loadToken;
});

/** The export menu offers the open conversation's files (none for a new chat). */
function showExport(sessionId) {
  ui.exportMenu.hidden = !sessionId;
  ui.exportMenu.open = false;
  if (!sessionId) return;
  const base = `${app.dataset.apiRoot}conversations/${encodeURIComponent(sessionId)}/export`;
  ui.exportMarkdown.href = `${base}?as=markdown`;
  ui.exportJson.href = `${base}?as=json`;
}
chat.on("conversations", (conversations) => conversationList.render(conversations, { searching: Boolean(chat.query) }));
chat.on("loading", (loading) => {
  if (loading) ui.messages.setAttribute("aria-busy", "true");
  else ui.messages.removeAttribute("aria-busy");
});
chat.on("runs", () => {
  updateControls();
  updateConnection();
});
chat.on("finished", (answer) => {
  const { errorCode } = answer.outcome;
  announce(errorCode ? errorText(errorCode) : messageList.shownText(answer));
  refreshUsage();
});
chat.on("refused", ({ error, question }) => {
  showRequestError(error);
  if (question && !ui.messageInput.value) {
    ui.messageInput.value = question.text; // a refused question goes back where it was typed
    updateCounter();
  }
});
chat.on("error", (error) => showRequestError(error));

function announce(text) {
  // Clearing first makes a repeated identical text be announced again.
  ui.announcer.textContent = "";
  setTimeout(() => {
    ui.announcer.textContent = text;
  }, ANNOUNCE_DELAY_MS);
}

function updateConnection() {
  renderConnectionBanner(ui.connectionBanner, { online: navigator.onLine, reconnecting: chat.reconnecting });
}

async function refreshUsage() {
  const format = (n) => new Intl.NumberFormat(document.documentElement.lang || undefined).format(n);
  const text = usageText(await api.usage(), format);
  if (text === null) return; // the server has no usage endpoint
  ui.usageToday.textContent = text;
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
  const { running } = chat;
  ui.stopButton.hidden = !running;
  ui.stopButton.disabled = false;
  ui.sendButton.disabled = running;
  ui.transportSelect.disabled = !ui.streamingCheckbox.checked;
  app.classList.toggle("answer-running", running);
}

function submitMessage() {
  const text = ui.messageInput.value;
  if (!text.trim() || chat.running) return;
  const count = characterCount(text);
  if (count > maxLength) {
    showComposerError(tooLongText(count, maxLength), "too-long");
    return;
  }
  hideComposerError();
  ui.messageInput.value = "";
  updateCounter();
  chat.send(text);
}

// Both replace the answer's list item, and the button with it: keyboard focus goes to the
// message box (where Escape stops the answer), not to the page body.
function regenerate() {
  if (!chat.regenerable) return;
  hideComposerError();
  chat.regenerate();
  ui.messageInput.focus();
}

function continueAnswer(answer) {
  if (!answer || !chat.continuable(answer)) return;
  hideComposerError();
  chat.continueAnswer(answer);
  ui.messageInput.focus();
}

/** Edit a sent question and send it again; the later turns go, which the editor says. */
async function editQuestion(question) {
  if (!question || !chat.editable(question)) return;
  const text = await messageList.editQuestion(question);
  if (text === null) return;
  const count = characterCount(text);
  if (count > maxLength) {
    showComposerError(tooLongText(count, maxLength), "too-long");
    return;
  }
  hideComposerError();
  scroller.toBottom();
  chat.edit(question, text);
}

function stopAnswers() {
  ui.stopButton.disabled = true;
  chat.stopAll();
  ui.messageInput.focus(); // the disabled Stop button must not drop the focus to the page body
}

function startNewChat() {
  address.navigating();
  chat.newChat();
  hideComposerError();
  setSidebarOpen(false);
  ui.messageInput.focus();
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
// Conversation list actions

async function renameConversation(item) {
  const { sessionId } = item.dataset;
  const title = await conversationList.editTitle(item);
  if (title) await chat.rename(sessionId, title);
  conversationList.render();
  conversationList.focus(sessionId);
}

async function deleteConversation(sessionId) {
  const conversation = chat.conversations.find((c) => c.session_id === sessionId);
  const question = interpolate(gettext("Delete the conversation “%s”? This cannot be undone."), [
    conversation ? conversationTitle(conversation) : "",
  ]);
  if (!window.confirm(question)) return;
  const wasOpen = sessionId === chat.sessionId;
  await chat.remove(sessionId);
  if (wasOpen && chat.sessionId === null) hideComposerError();
  ui.newChatButton.focus();
}

function onConversationListClick(event) {
  const button = event.target.closest("button");
  const item = button?.closest(".conversation");
  if (!item) return;
  if (button.classList.contains("conversation-open")) {
    if (item.dataset.sessionId !== chat.sessionId || !chat.messages.length) {
      address.navigating();
      chat.open(item.dataset.sessionId);
    }
    setSidebarOpen(false);
  } else if (button.classList.contains("conversation-rename")) {
    renameConversation(item);
  } else if (button.classList.contains("conversation-delete")) {
    deleteConversation(item.dataset.sessionId);
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
  }, COPIED_FEEDBACK_MS);
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

let searchTimer = 0;

function onSearchInput() {
  clearTimeout(searchTimer);
  searchTimer = setTimeout(() => chat.search(ui.conversationSearch.value), SEARCH_DELAY_MS);
}

/** An empty chat's suggestion: sent as if typed. */
function onSuggestionClick(event) {
  const suggestion = event.target.closest(".suggestion");
  if (!suggestion || chat.running) return;
  ui.messageInput.value = suggestion.dataset.prompt;
  updateCounter();
  submitMessage();
}

function onMessageListClick(event) {
  const button = event.target.closest("button");
  if (!button) return;
  if (button.classList.contains("copy-code")) {
    copyText(button.closest(".code-block").querySelector("code").textContent, button);
  } else if (button.classList.contains("copy-answer")) {
    copyText(messageList.messageAt(button)?.text ?? "", button);
  } else if (button.classList.contains("regenerate")) {
    regenerate();
  } else if (button.classList.contains("continue-answer")) {
    continueAnswer(messageList.messageAt(button));
  } else if (button.classList.contains("edit-question")) {
    editQuestion(messageList.messageAt(button));
  }
}

// ---------------------------------------------------------------------------------------------
// Theme: the system's, or light or dark as chosen; remembered in a cookie so the server
// renders the next page in it at once (views.page_context).

const THEME_COOKIE = "chatbot_theme";
const THEME_COOKIE_MAX_AGE = 60 * 60 * 24 * 365;
const CODE_STYLES = {
  system: ["not all and (prefers-color-scheme: dark)", "(prefers-color-scheme: dark)"],
  light: ["all", "not all"],
  dark: ["not all", "all"],
};

function setTheme(theme) {
  const chosen = theme in CODE_STYLES ? theme : "system";
  if (chosen === "system") delete document.documentElement.dataset.theme;
  else document.documentElement.dataset.theme = chosen;
  [ui.codeLight.media, ui.codeDark.media] = CODE_STYLES[chosen];
  const value = chosen === "system" ? "; max-age=0" : `; max-age=${THEME_COOKIE_MAX_AGE}`;
  document.cookie = `${THEME_COOKIE}=${chosen}; path=/; SameSite=Lax${value}`;
}

// ---------------------------------------------------------------------------------------------
// Layout: the sidebar is a drawer on small screens

const drawerLayout = window.matchMedia(`(max-width: ${DRAWER_MAX_WIDTH_PX}px)`); // as chat.css

/** On a phone the sidebar is a modal drawer: while it is open, the page behind it is inert. */
function setSidebarOpen(open) {
  app.classList.toggle("sidebar-open", open);
  ui.sidebarToggle.setAttribute("aria-expanded", String(open));
  ui.sidebarBackdrop.hidden = !open;
  ui.main.inert = open && drawerLayout.matches;
  if (open) ui.newChatButton.focus();
}

// ---------------------------------------------------------------------------------------------
// Start

function restoreChoices() {
  ui.streamingCheckbox.checked = stored.get(STORAGE_KEYS.streaming) !== "0"; // streaming unless switched off
  const transport = stored.get(STORAGE_KEYS.transport);
  if (transport in transports) ui.transportSelect.value = transport;
}

function bindEvents() {
  ui.streamingCheckbox.addEventListener("change", () => {
    stored.set(STORAGE_KEYS.streaming, ui.streamingCheckbox.checked ? "1" : "0");
    updateControls();
  });
  ui.languageSelect.addEventListener("change", () => ui.languageForm.submit()); // the page comes back translated
  ui.themeSelect.addEventListener("change", () => setTheme(ui.themeSelect.value));
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
  ui.emptyState.addEventListener("click", onSuggestionClick);
  ui.conversationSearch.addEventListener("input", onSearchInput);
  ui.sidebarToggle.addEventListener("click", () => setSidebarOpen(!app.classList.contains("sidebar-open")));
  ui.sidebarBackdrop.addEventListener("click", () => setSidebarOpen(false));
  document.addEventListener("keydown", (event) => {
    if (event.key !== "Escape" || event.defaultPrevented) return;
    const menu = [ui.settings, ui.exportMenu].find((details) => details.open);
    if (menu) {
      menu.open = false;
      menu.querySelector("summary").focus();
    } else if (app.classList.contains("sidebar-open")) {
      setSidebarOpen(false);
      ui.sidebarToggle.focus();
    } else if (chat.running) {
      stopAnswers(); // Escape stops the running answer, as in other chat apps
    }
  });
  drawerLayout.addEventListener("change", () => setSidebarOpen(false)); // rotated or resized: no drawer left open
  window.addEventListener("popstate", () => address.follow());
  window.addEventListener("online", updateConnection);
  window.addEventListener("offline", updateConnection);
}

restoreChoices();
bindEvents();
updateCounter();
updateControls();
updateConnection();
chat.refreshConversations();
models.load();
refreshUsage();
if (app.dataset.sessionId) chat.open(app.dataset.sessionId); // a conversation's link
else chat.restore(); // the page's address: the conversation open last time, if any
app.dataset.ready = "true"; // lets the browser tests know the page is wired up
