// The page's conversations and answers, without the DOM: actions in, state changes out.
//
// `Chat` owns which conversation is open, its messages, the conversation list and the
// answers being read. The views subscribe (`chat.on(type, listener)`) and render what
// changed; the page wiring (chat.js) calls the actions. Everything that touches the
// network or the browser comes in through the constructor, so Node's test runner drives
// this module with a fake API (tests/js/conversation.test.mjs).
import { ApiError, ConnectionLost, isAbort } from "chatbot/api";
import { AnswerProgress, endStatus, newUuid, RESUMABLE_STATUSES, readToEnd } from "chatbot/answer-progress";

export const LIVE_STATUSES = new Set(["pending", "streaming"]);

/** How often, and how far apart, the page asks for an answer it named before the server saved it. */
const SAVED_POLL = { attempts: 10, delayMs: 300 };

/** A minimal publish/subscribe: listeners per event type, called in order. */
class Emitter {
  #listeners = new Map();

  on(type, listener) {
    if (!this.#listeners.has(type)) this.#listeners.set(type, []);
    this.#listeners.get(type).push(listener);
    return () => {
      const listeners = this.#listeners.get(type);
      listeners.splice(listeners.indexOf(listener), 1);
    };
  }

  emit(type, detail) {
    for (const listener of [...(this.#listeners.get(type) ?? [])]) listener(detail);
  }
}

const STREAMING_TRANSPORTS = new Set(["sse", "ndjson", "websocket"]);

/** Whether an answer was asked for as a stream (a streaming transport, or the flag: the seed's, OpenAI's). */
export function wasStreamed(message) {
  return Boolean(message.streaming) || STREAMING_TRANSPORTS.has(message.transport);
}

/** A question in the open conversation, as typed. */
export class Question {
  constructor(text, createdAt = new Date().toISOString(), id = null) {
    this.role = "user";
    this.text = text;
    this.createdAt = createdAt;
    this.id = id; // known once the server saved it (the answer's meta names it): then it can be edited
  }
}

/**
 * One assistant answer as the page knows it. `outcome` is null while it is being written,
 * then {status, errorCode, finishReason, retryAfter, limit}. Emits "text" as it grows and
 * "finish" once when it ends.
 */
export class Answer extends Emitter {
  constructor({
    id = null,
    text = "",
    model = "",
    streamed = false,
    completionTokens = null,
    createdAt = new Date().toISOString(),
  } = {}) {
    super();
    this.role = "assistant";
    this.createdAt = createdAt;
    this.id = id; // known once the server names the answer
    this.text = text;
    this.model = model;
    this.streamed = streamed;
    this.completionTokens = completionTokens;
    this.outcome = null;
  }

  /** An answer from the conversation's stored messages. A live one starts empty: following
   *  it replays its events from the first, so its text appears exactly once. */
  static fromMessage(message) {
    const live = LIVE_STATUSES.has(message.status);
    const answer = new Answer({
      id: message.id,
      text: live ? "" : message.content,
      model: message.model,
      streamed: wasStreamed(message),
      completionTokens: message.completion_tokens,
      createdAt: message.created_at,
    });
    if (!live) {
      answer.outcome = outcome({
        status: message.status,
        errorCode: message.error_code,
        finishReason: message.finish_reason,
      });
    }
    return answer;
  }

  get running() {
    return this.outcome === null;
  }

  append(delta) {
    this.text += delta;
    this.emit("text", this);
  }

  replaceText(text) {
    this.text = text;
    this.emit("text", this);
  }

  finish(ending) {
    if (!this.running) return;
    this.outcome = outcome(ending);
    this.emit("finish", this);
  }
}

function outcome({ status, errorCode = "", finishReason = "", retryAfter = null, limit = null }) {
  return { status, errorCode: errorCode || "", finishReason: finishReason || "", retryAfter, limit };
}

/** The outcome a terminal event describes. */
function outcomeOf(terminal) {
  if (terminal.type === "done") return { status: terminal.status, finishReason: terminal.finish_reason };
  return { status: endStatus(terminal), errorCode: terminal.code };
}

/**
 * The reading of one answer: its events applied once each, reconnection, stop. `transport`
 * is null in the seed's JSON mode. Emits "meta" when the server names the answer and
 * "reconnecting" when that state changes.
 */
export class AnswerRun extends Emitter {
  constructor(answer, { transport = null, question = null, replaces = null, restore = null } = {}) {
    super();
    this.answer = answer;
    this.transport = transport;
    this.question = question; // the question this run answers, taken back if refused
    this.replaces = replaces; // the answer being regenerated, put back if refused
    this.restore = restore; // the messages before an edit, put back if refused
    this.answerId = null; // the id this page gave the answer (JSON mode)
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
    return this.answer.id;
  }

  handle(event) {
    const action = this.progress.apply(event);
    if (action === null) return; // a replay after a reconnect repeats events: each seq once
    this.setReconnecting(false);
    if (action.type === "meta") {
      this.answer.id = action.event.message_id;
      this.answer.model = action.event.model;
      this.emit("meta", action.event);
    } else if (action.type === "append") {
      this.answer.append(action.text);
    } else if (action.type === "replace") {
      this.answer.replaceText(action.text);
    } else if (action.type === "usage") {
      this.answer.completionTokens = action.completionTokens;
    }
    // "resume" and "end": the reading loop looks at `progress.finished` when a stream is over.
  }

  setReconnecting(reconnecting) {
    if (this.reconnecting === reconnecting) return;
    this.reconnecting = reconnecting;
    this.emit("reconnecting", reconnecting);
  }
}

/**
 * The open conversation and the conversation list. Dependencies:
 *   api          ChatApi (or a fake): the HTTP API
 *   transport()  the streaming transport chosen now ({streamChat, streamRegenerate, followEvents, stop})
 *   streaming()  whether answers are streamed (the seed's checkbox)
 *   storage      {get(key), set(key, value)} to remember the open conversation
 *   wait(attempt, signal, retryAfter)  resolves when it is time to reconnect
 *   model()      the model picked for the next question, or null
 * Events: "session" (id), "conversations" (list), "messages" ({messages, reason}),
 * "loading" (bool), "runs" (), "finished" (answer), "refused" ({error, question}), "error" (error).
 */
export class Chat extends Emitter {
  constructor({
    api,
    transport,
    streaming,
    storage,
    wait,
    model = () => null,
    sessionKey = "chatbot.sessionId",
    savedPoll = SAVED_POLL,
  }) {
    super();
    Object.assign(this, { api, transport, streaming, storage, wait, model, sessionKey, savedPoll });
    this.sessionId = null;
    this.conversations = [];
    this.query = ""; // the conversation list's search, "" for all
    this.messages = []; // Question and Answer objects of the open conversation, in order
    this.runs = new Set(); // answers this page is reading right now
    this.loadToken = 0; // guards against a slow conversation load finishing after a newer one
  }

  get running() {
    return this.runs.size > 0;
  }

  get reconnecting() {
    return [...this.runs].some((run) => run.reconnecting);
  }

  /** The conversation the page had open last time, if any. */
  restore() {
    const sessionId = this.storage.get(this.sessionKey);
    if (sessionId) this.open(sessionId);
  }

  setSession(sessionId) {
    if (sessionId === this.sessionId) return;
    this.sessionId = sessionId;
    this.storage.set(this.sessionKey, sessionId);
    this.emit("session", sessionId);
  }

  setMessages(messages, reason) {
    this.messages = messages;
    this.emit("messages", { messages, reason });
  }

  // -- Conversations ------------------------------------------------------------------------

  newChat() {
    this.loadToken++;
    this.detachRuns();
    this.setSession(null);
    this.setMessages([], "clear");
  }

  /** Show a conversation: finished answers from its history, live ones followed from their start. */
  async open(sessionId) {
    const token = ++this.loadToken;
    this.detachRuns();
    this.setSession(sessionId);
    this.setMessages([], "clear");
    this.emit("loading", true);
    let conversation;
    try {
      conversation = await this.api.getConversation(sessionId);
    } catch (error) {
      if (token !== this.loadToken) return;
      this.emit("loading", false);
      if (error instanceof ApiError && error.status === 404) {
        this.setSession(null);
        this.refreshConversations();
      } else {
        this.emit("error", error);
      }
      return;
    }
    if (token !== this.loadToken) return;
    this.emit("loading", false);
    const messages = conversation.messages.map((message) =>
      message.role === "user"
        ? new Question(message.content, message.created_at, message.id)
        : Answer.fromMessage(message),
    );
    this.setMessages(messages, "load");
    for (const answer of messages) {
      if (answer.role === "assistant" && answer.running) this.followLive(answer);
    }
  }

  async refreshConversations() {
    const query = this.query;
    let conversations;
    try {
      conversations = await this.api.listConversations(query);
    } catch {
      return; // the list stays as it was; the next refresh will try again
    }
    if (query !== this.query) return; // a newer search is on its way
    this.conversations = conversations;
    this.emit("conversations", this.conversations);
  }

  /** List only the conversations matching `query` (the server searches titles and text). */
  search(query) {
    this.query = query.trim();
    return this.refreshConversations();
  }

  async rename(sessionId, title) {
    const conversation = this.conversations.find((c) => c.session_id === sessionId);
    if (!conversation || !title || title === conversation.title) return;
    try {
      Object.assign(conversation, await this.api.renameConversation(sessionId, title));
    } catch (error) {
      this.emit("error", error);
    }
    this.emit("conversations", this.conversations);
  }

  async remove(sessionId) {
    try {
      await this.api.deleteConversation(sessionId);
    } catch (error) {
      if (!(error instanceof ApiError && error.status === 404)) {
        this.emit("error", error);
        return;
      }
    }
    if (sessionId === this.sessionId) this.newChat();
    this.conversations = this.conversations.filter((c) => c.session_id !== sessionId);
    this.emit("conversations", this.conversations);
  }

  // -- Answers --------------------------------------------------------------------------------

  /** Send a question; false when it cannot be sent now (empty, or an answer is running). */
  send(text) {
    if (!text.trim() || this.running) return false;
    const question = new Question(text);
    const answer = new Answer({ streamed: this.streaming() });
    this.setMessages([...this.messages, question, answer], "send");
    const sessionId = this.sessionId;
    const model = this.model() || undefined; // none: the conversation's, else the server's default
    this.requestAnswer(answer, { question }, {
      stream: (transport, options) => transport.streamChat({ message: text, sessionId, model, ...options }),
      json: (options) => this.api.sendJson({ message: text, sessionId, model, ...options }),
    });
    return true;
  }

  /** The last answer, when it can be regenerated now. */
  get regenerable() {
    const last = this.messages.at(-1);
    return !this.running && last?.role === "assistant" && !last.running && last.id ? last : null;
  }

  /** Answer the last question again: the new answer takes the old one's place. */
  regenerate() {
    const old = this.regenerable;
    if (!old) return false;
    const answer = new Answer({ streamed: this.streaming() });
    this.setMessages([...this.messages.slice(0, -1), answer], "regenerate");
    const messageId = old.id;
    this.requestAnswer(answer, { replaces: old }, {
      stream: (transport, options) => transport.streamRegenerate({ messageId, ...options }),
      json: (options) => this.api.regenerateJson({ messageId, ...options }),
    });
    return true;
  }

  /** Whether `answer` can be continued now: the last one, cut by the token limit or a restart. */
  continuable(answer) {
    return (
      !this.running &&
      answer === this.messages.at(-1) &&
      answer?.role === "assistant" &&
      isCut(answer) &&
      Boolean(answer.id && answer.text)
    );
  }

  /**
   * Ask the model to go on with a cut answer: the same answer grows (its stream restates the
   * text so far, then writes on). Over HTTP whatever the transport, as edits; refused, the
   * answer is put back as it was.
   */
  continueAnswer(old) {
    if (!this.continuable(old)) return false;
    const answer = new Answer({ text: old.text, model: old.model, streamed: old.streamed, createdAt: old.createdAt });
    this.setMessages([...this.messages.slice(0, -1), answer], "continue");
    const messageId = old.id;
    const run = this.startRun(answer, { replaces: old, transport: this.httpTransport() });
    this.drive(run, () => this.api.streamContinue({ messageId, signal: run.signal, onEvent: run.onEvent }));
    return true;
  }

  httpTransport() {
    return {
      followEvents: (options) => this.api.followEvents(options),
      stop: (messageId) => this.api.stopMessage(messageId),
    };
  }

  /** Whether `question` can be edited and sent again now. */
  editable(question) {
    return !this.running && Boolean(question.id) && this.messages.includes(question);
  }

  /**
   * Send `text` in place of `question`: it and every later turn are replaced (the server
   * does the same). Edits go over HTTP whatever the transport: the WebSocket has no edit.
   */
  edit(question, text) {
    if (!this.editable(question) || !text.trim()) return false;
    const before = this.messages;
    const edited = new Question(text);
    const answer = new Answer({ streamed: this.streaming() });
    this.setMessages([...before.slice(0, before.indexOf(question)), edited, answer], "send");
    const questionId = question.id;
    this.requestAnswer(
      answer,
      { question: edited, restore: before },
      {
        stream: (_transport, options) => this.api.streamEdit({ questionId, message: text, ...options }),
        json: (options) => this.api.editJson({ questionId, message: text, ...options }),
      },
      this.httpTransport(),
    );
    return true;
  }

  /** Stop the answers being read (each once the server has named it). */
  stopAll() {
    for (const run of this.runs) this.stopRun(run).catch((error) => this.emit("error", error));
  }

  stopRun(run) {
    if (!run.transport) return this.onceSaved(run, () => this.api.stopMessage(run.answerId));
    if (!run.messageId) {
      run.stopRequested = true; // sent as soon as the answer's id is known
      return Promise.resolve();
    }
    return run.transport.stop(run.messageId);
  }

  /** Read a new answer as it was asked for: `request.stream(transport, options)` or `request.json(options)`. */
  requestAnswer(answer, runOptions, request, transport = this.transport()) {
    if (answer.streamed) {
      const run = this.startRun(answer, { ...runOptions, transport });
      this.drive(run, () => request.stream(transport, { signal: run.signal, onEvent: run.onEvent }));
    } else {
      this.readJson(this.startRun(answer, runOptions), request.json);
    }
  }

  /** An answer still being written (after a reload or a switch): follow it from its first event. */
  followLive(answer) {
    const transport = this.transport();
    const run = this.startRun(answer, { transport });
    this.drive(run, () =>
      transport.followEvents({ messageId: answer.id, after: 0, signal: run.signal, onEvent: run.onEvent }),
    );
  }

  startRun(answer, options) {
    const run = new AnswerRun(answer, options);
    run.on("meta", (event) => {
      if (run.question && event.question_id) run.question.id = event.question_id;
      if (event.session_id && event.session_id !== this.sessionId) {
        this.setSession(event.session_id);
        this.refreshConversations();
      }
      if (run.stopRequested) this.stopRun(run).catch((error) => this.emit("error", error));
    });
    run.on("reconnecting", () => this.emit("runs"));
    this.runs.add(run);
    this.emit("runs");
    return run;
  }

  endRun(run) {
    if (this.runs.delete(run)) this.emit("runs");
  }

  /** Stop reading the answers on screen (switching conversation); they go on on the server. */
  detachRuns() {
    for (const run of this.runs) run.controller.abort();
    this.runs.clear();
    this.emit("runs");
  }

  /**
   * Read a streamed answer to its terminal event. A cut connection is resumed from the last
   * event seen (`after=lastSeq`), with backoff, so the text is never lost nor repeated.
   */
  async drive(run, firstRequest) {
    try {
      const { resumed } = await readToEnd({
        progress: run.progress,
        start: firstRequest,
        resume: (after) =>
          run.transport.followEvents({ messageId: run.messageId, after, signal: run.signal, onEvent: run.onEvent }),
        canResume: (error) => canResumeAfter(error, run),
        canRestart: (error) => error instanceof ApiError && error.body?.retry_safe === true,
        wait: (attempt, retryAfter) => this.wait(attempt, run.signal, retryAfter),
        hasAnswer: () => Boolean(run.messageId),
        neverStarted: () => new ConnectionLost(),
        onRetry: () => run.setReconnecting(true),
      });
      if (resumed) await this.catchUpWithStoredText(run);
      this.finishRun(run, outcomeOf(run.progress.terminal));
    } catch (error) {
      if (!isAbort(error)) this.failRun(run, error);
    } finally {
      this.endRun(run);
    }
  }

  /**
   * After a resume, the server may have rebuilt the events from the database (its event log
   * expired or it restarted) and sent only the ending: take the saved text if it is longer.
   */
  async catchUpWithStoredText(run) {
    try {
      const message = await this.api.getMessage(run.messageId);
      if (message.content.length > run.answer.text.length) run.answer.replaceText(message.content);
    } catch {
      // Keep what was streamed: it is the best text this page has.
    }
  }

  /** The seed's mode: wait for the whole answer, then show it. */
  async readJson(run, request) {
    // The page names the answer itself, so Stop can reach it before the JSON comes back.
    run.answerId = newUuid();
    if (!this.sessionId) this.showNewConversationSoon(run);
    try {
      const body = await request({ signal: run.signal, answerId: run.answerId });
      const { answer } = run;
      answer.id = body.message_id;
      if (run.question && body.question_id) run.question.id = body.question_id;
      if (body.session_id !== this.sessionId) this.setSession(body.session_id);
      answer.model = body.model;
      answer.completionTokens = body.usage?.completion_tokens ?? null;
      answer.streamed = Boolean(body.is_streaming);
      answer.replaceText(body.response ?? "");
      this.finishRun(
        run,
        body.success
          ? { status: body.status, finishReason: body.finish_reason }
          : { status: body.status ?? "failed", errorCode: body.code ?? "error" },
      );
    } catch (error) {
      if (isAbort(error)) return;
      if (error instanceof ConnectionLost && this.sessionId) {
        await this.resumeConversationLater(run);
        return;
      }
      this.failRun(run, error);
    } finally {
      this.endRun(run);
    }
  }

  /**
   * A JSON-mode first message learns its conversation only with the answer: ask for the
   * answer the page named as soon as the server has saved it, and list its conversation.
   */
  async showNewConversationSoon(run) {
    const message = await this.onceSaved(run, () => this.api.getMessage(run.answerId)).catch(() => null);
    if (message && !this.sessionId && this.runs.has(run)) {
      this.setSession(message.conversation);
      this.refreshConversations();
    }
  }

  /** The JSON request broke, but the answer goes on on the server: once back, reload and follow it. */
  async resumeConversationLater(run) {
    run.setReconnecting(true);
    try {
      await this.wait(0, run.signal);
    } catch {
      return; // the page moved on meanwhile
    }
    this.open(this.sessionId);
  }

  /**
   * `request()` for an answer the page named, retried while the server has not saved it
   * yet (404), for as long as the run lasts; resolves with its result, or null.
   */
  async onceSaved(run, request) {
    const { attempts, delayMs } = this.savedPoll;
    for (let attempt = 0; attempt < attempts && this.runs.has(run); attempt++) {
      try {
        return await request();
      } catch (error) {
        if (!(error instanceof ApiError && error.status === 404)) throw error;
        await new Promise((resolve) => setTimeout(resolve, delayMs));
      }
    }
    return null;
  }

  finishRun(run, ending) {
    run.answer.finish(ending);
    this.emit("finished", run.answer);
    this.refreshConversations();
  }

  /** The answer could not be read. A refused request leaves nothing behind: undo the bubbles. */
  failRun(run, error) {
    if (error instanceof ApiError && !run.messageId) {
      this.undo(run);
      this.emit("refused", { error, question: run.question });
      if (error.code === "conversation_not_found") this.newChat(); // deleted elsewhere: start afresh
      this.refreshConversations();
      return;
    }
    if (!(error instanceof ApiError) && !(error instanceof ConnectionLost)) console.error(error);
    const code = error instanceof ApiError ? error.code : error instanceof ConnectionLost ? "network" : "error";
    run.answer.finish({ status: "failed", errorCode: code, retryAfter: error.retryAfter ?? null, limit: error.limit });
    this.emit("finished", run.answer);
  }

  undo(run) {
    if (run.restore) {
      this.setMessages(run.restore, "undo");
      return;
    }
    const gone = new Set([run.answer, run.question]);
    const messages = this.messages.filter((message) => !gone.has(message));
    if (run.replaces) messages.push(run.replaces);
    this.setMessages(messages, "undo");
  }
}

/** Whether an answer ended before its end: cut by the token limit, or by a server restart. */
export function isCut(answer) {
  const ending = answer.outcome;
  return Boolean(ending) && (ending.finishReason === "length" || ending.status === "interrupted");
}

/** A broken connection, or a busy server while following a started answer: try again. */
function canResumeAfter(error, run) {
  if (error instanceof ConnectionLost) return true;
  return error instanceof ApiError && run.messageId !== null && RESUMABLE_STATUSES.has(error.status);
}
