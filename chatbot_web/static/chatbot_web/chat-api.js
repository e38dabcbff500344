// The chatbot's HTTP and WebSocket API, as the page uses it. No DOM code here.
//
// Every transport delivers the same event objects ({type, seq, message_id, ...}):
// meta, delta, usage, then exactly one terminal `done` or `error`.

export const TERMINAL_TYPES = new Set(["done", "error"]);

/** A request the server refused or could not answer; `code` keys the translated text. */
export class ApiError extends Error {
  constructor({ code = "error", message = "", status = 0, retryAfter = null, limit = null, body = null }) {
    super(message || code);
    this.name = "ApiError";
    this.code = code;
    this.status = status;
    this.retryAfter = retryAfter; // seconds, for rate limits
    this.limit = limit; // which rate limit was hit
    this.body = body;
  }
}

/** The connection went away (offline, server restart, proxy cut): the answer can be resumed. */
export class ConnectionLost extends Error {
  constructor(message = "connection lost") {
    super(message);
    this.name = "ConnectionLost";
  }
}

export function isAbort(error) {
  return error?.name === "AbortError";
}

function csrfToken() {
  const match = document.cookie.match(/(?:^|;\s*)csrftoken=([^;]+)/);
  return match ? decodeURIComponent(match[1]) : "";
}

function retryAfterSeconds(response) {
  const raw = response.headers.get("Retry-After");
  if (!raw) return null;
  const seconds = Number(raw);
  if (Number.isFinite(seconds)) return Math.max(0, Math.ceil(seconds));
  const date = Date.parse(raw); // Retry-After may also be an HTTP date
  return Number.isNaN(date) ? null : Math.max(0, Math.ceil((date - Date.now()) / 1000));
}

function numberOrNull(value) {
  return typeof value === "number" && Number.isFinite(value) ? value : null;
}

async function errorFromResponse(response) {
  let body = {};
  try {
    body = await response.json();
  } catch {
    // Not JSON (a proxy's HTML error page, say): the status alone decides the message.
  }
  let fallbackCode = response.status >= 500 ? "server_error" : "error";
  if (response.status === 429) fallbackCode = "rate_limited";
  return new ApiError({
    code: typeof body.code === "string" ? body.code : fallbackCode,
    message: typeof body.error === "string" ? body.error : "",
    status: response.status,
    retryAfter: retryAfterSeconds(response) ?? numberOrNull(body.retry_after),
    limit: typeof body.limit === "string" ? body.limit : null,
    body,
  });
}

/**
 * Incremental Server-Sent Events parser: feed it text, get back the complete frames.
 * Handles frames split across chunks, CRLF line ends, comments and multi-line data.
 */
export class SseParser {
  constructor() {
    this.buffer = "";
  }

  push(text) {
    this.buffer += text.replace(/\r\n?/g, "\n");
    const frames = [];
    let end;
    while ((end = this.buffer.indexOf("\n\n")) !== -1) {
      const block = this.buffer.slice(0, end);
      this.buffer = this.buffer.slice(end + 2);
      const frame = parseSseBlock(block);
      if (frame) frames.push(frame);
    }
    return frames;
  }
}

function parseSseBlock(block) {
  const frame = { event: "message", id: null, data: [] };
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue; // comments are keep-alives
    const colon = line.indexOf(":");
    const field = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") frame.data.push(value);
    else if (field === "event") frame.event = value;
    else if (field === "id") frame.id = value;
  }
  return frame.data.length ? { ...frame, data: frame.data.join("\n") } : null;
}

/**
 * Read an SSE response body, calling onEvent for each event. Resolves when the body ends;
 * rejects with ConnectionLost if the connection breaks, or the AbortError if aborted.
 */
async function readEventStream(response, onEvent) {
  if (response.status === 204 || response.body === null) return; // nothing after the offset: it ended
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  const parser = new SseParser();
  try {
    for (;;) {
      const chunk = await readChunk(reader);
      if (chunk.done) return;
      for (const frame of parser.push(chunk.value)) onEvent(JSON.parse(frame.data));
    }
  } finally {
    reader.releaseLock();
  }
}

async function readChunk(reader) {
  try {
    return await reader.read();
  } catch (error) {
    if (isAbort(error)) throw error;
    throw new ConnectionLost(error.message);
  }
}

/** The HTTP API. Every method throws ApiError for refusals and ConnectionLost for network failures. */
export class ChatApi {
  constructor(root) {
    this.root = root.endsWith("/") ? root : `${root}/`;
  }

  async request(method, path, { body, accept = "application/json", signal } = {}) {
    const headers = { Accept: accept };
    if (method !== "GET") headers["X-CSRFToken"] = csrfToken();
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let response;
    try {
      response = await fetch(this.root + path, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        credentials: "same-origin",
        signal,
      });
    } catch (error) {
      if (isAbort(error)) throw error;
      throw new ConnectionLost(error.message);
    }
    if (!response.ok) throw await errorFromResponse(response);
    return response;
  }

  async json(method, path, options) {
    const response = await this.request(method, path, options);
    return response.status === 204 ? null : response.json();
  }

  listConversations(query = "") {
    return this.json("GET", query ? `conversations/?q=${encodeURIComponent(query)}` : "conversations/");
  }

  getConversation(sessionId) {
    return this.json("GET", `conversations/${encodeURIComponent(sessionId)}`);
  }

  renameConversation(sessionId, title) {
    return this.json("PATCH", `conversations/${encodeURIComponent(sessionId)}`, { body: { title } });
  }

  deleteConversation(sessionId) {
    return this.json("DELETE", `conversations/${encodeURIComponent(sessionId)}`);
  }

  getMessage(messageId) {
    return this.json("GET", `messages/${encodeURIComponent(messageId)}`);
  }

  stopMessage(messageId) {
    return this.json("POST", `messages/${encodeURIComponent(messageId)}/stop`);
  }

  /** Today's usage, or null when the server has no usage endpoint (or refuses it). */
  async usage() {
    try {
      return await this.json("GET", "usage/");
    } catch {
      return null;
    }
  }

  /**
   * The seed's JSON mode: one request, the whole answer. Answers that failed while being
   * written still come back as a body (with message_id, status, code), not as an exception.
   */
  /** The models answers can be asked of ({default, models}), or null when the server has no list. */
  async models() {
    try {
      return await this.json("GET", "models/");
    } catch {
      return null;
    }
  }

  sendJson({ message, sessionId, model, answerId, signal }) {
    const body = chatBody(message, sessionId, false, model);
    if (answerId) body.answer_id = answerId;
    return this.answerJson("chat/", { body, signal });
  }

  /** Send a message and stream its answer as SSE on the same response. */
  streamChat({ message, sessionId, model, signal, onEvent }) {
    return this.streamAnswer("chat/", { body: chatBody(message, sessionId, true, model), signal }, onEvent);
  }

  /** Replace the last answer with a new one to the same question, as sendJson answers. */
  regenerateJson({ messageId, answerId, signal }) {
    return this.answerJson(regeneratePath(messageId), { body: answerId ? { answer_id: answerId } : undefined, signal });
  }

  /** Replace the last answer with a new one to the same question, streamed like streamChat. */
  streamRegenerate({ messageId, signal, onEvent }) {
    return this.streamAnswer(regeneratePath(messageId), { signal }, onEvent);
  }

  /** Go on writing a cut answer; streams the whole answer (its text so far first, as a snapshot). */
  streamContinue({ messageId, signal, onEvent }) {
    return this.streamAnswer(`messages/${encodeURIComponent(messageId)}/continue`, { signal }, onEvent);
  }

  /** Send an edited question in place of a sent one (later turns are replaced), streamed. */
  streamEdit({ questionId, message, signal, onEvent }) {
    return this.streamAnswer(editPath(questionId), { body: { message }, signal }, onEvent);
  }

  /** The same, as the seed's JSON. */
  editJson({ questionId, message, answerId, signal }) {
    const body = { message, ...(answerId ? { answer_id: answerId } : {}) };
    return this.answerJson(editPath(questionId), { body, signal });
  }

  async answerJson(path, options) {
    try {
      return await this.json("POST", path, options);
    } catch (error) {
      if (error instanceof ApiError && error.body?.message_id) return error.body;
      throw error;
    }
  }

  async streamAnswer(path, options, onEvent) {
    const response = await this.request("POST", path, { ...options, accept: "text/event-stream" });
    await readEventStream(response, onEvent);
  }

  /** Replay an answer's events after `after`, then follow it live to its end. */
  async followEvents({ messageId, after, signal, onEvent }) {
    const path = `messages/${encodeURIComponent(messageId)}/events?after=${after}`;
    const response = await this.request("GET", path, { accept: "text/event-stream", signal });
    await readEventStream(response, onEvent);
  }
}

function editPath(questionId) {
  return `messages/${encodeURIComponent(questionId)}/edit`;
}

function regeneratePath(messageId) {
  return `messages/${encodeURIComponent(messageId)}/regenerate`;
}

function chatBody(message, sessionId, streaming, model) {
  const body = { message, streaming };
  if (sessionId) body.session_id = sessionId;
  if (model) body.model = model;
  return body;
}

// The HTTP status a WebSocket error frame stands for, where the page treats them alike.
const STATUS_OF_FRAME_CODE = { rate_limited: 429, server_busy: 503 };

/**
 * The WebSocket transport: one socket for the page, opened on first use. Its methods mirror
 * ChatApi.streamChat / streamRegenerate / followEvents: they resolve at the answer's terminal
 * event and reject with ConnectionLost when the socket closes first.
 */
export class ChatSocket {
  constructor(url) {
    this.url = url;
    this.socket = null;
    this.opening = null;
    this.readers = new Map(); // message_id -> reader
    this.pendingChats = []; // requests whose answer's id is not known yet, oldest first
    this.nextRequestId = 1;
  }

  /** Send a message and follow its answer. */
  streamChat({ message, sessionId, model, signal, onEvent }) {
    const frame = { type: "chat", message };
    if (sessionId) frame.session_id = sessionId;
    if (model) frame.model = model;
    return this.startAnswer(frame, signal, onEvent);
  }

  /** Replace the last answer with a new one to the same question, and follow it. */
  streamRegenerate({ messageId, signal, onEvent }) {
    return this.startAnswer({ type: "regenerate", message_id: messageId }, signal, onEvent);
  }

  /** Send a request that starts an answer; the server's `accepted` frame names it. */
  startAnswer(frame, signal, onEvent) {
    const requestId = `r${this.nextRequestId++}`;
    return this.run(signal, onEvent, (reader) => {
      reader.requestId = requestId;
      this.pendingChats.push(reader);
      return { ...frame, request_id: requestId };
    });
  }

  /** Replay an answer's events after `after`, then follow it live to its end. */
  followEvents({ messageId, after, signal, onEvent }) {
    const requestId = `r${this.nextRequestId++}`;
    return this.run(signal, onEvent, (reader) => {
      reader.requestId = requestId;
      this.readers.set(messageId, reader);
      return { type: "resume", message_id: messageId, after, request_id: requestId };
    });
  }

  async stop(messageId) {
    const socket = await this.open();
    socket.send(JSON.stringify({ type: "stop", message_id: messageId }));
  }

  async run(signal, onEvent, register) {
    const socket = await this.open();
    return new Promise((resolve, reject) => {
      const reader = { onEvent, resolve, reject, requestId: null };
      const frame = register(reader);
      const abort = () => {
        this.forget(reader);
        reject(new DOMException("aborted", "AbortError"));
      };
      if (signal?.aborted) return abort();
      signal?.addEventListener("abort", abort, { once: true });
      socket.send(JSON.stringify(frame));
    });
  }

  open() {
    if (this.socket?.readyState === WebSocket.OPEN) return Promise.resolve(this.socket);
    if (this.opening) return this.opening;
    this.opening = new Promise((resolve, reject) => {
      const socket = new WebSocket(this.url);
      socket.addEventListener("open", () => {
        this.socket = socket;
        this.opening = null;
        resolve(socket);
      });
      socket.addEventListener("message", (message) => this.receive(message.data));
      socket.addEventListener("close", () => {
        if (this.opening) {
          this.opening = null;
          reject(new ConnectionLost("the WebSocket could not be opened"));
        }
        this.closed(socket);
      });
    });
    return this.opening;
  }

  receive(data) {
    let event;
    try {
      event = JSON.parse(data);
    } catch {
      return;
    }
    if (event.type === "error" && event.seq === undefined && event.message_id && !("request_id" in event)) {
      // A reader's own end (the server restarts, its event log is unreachable), not the
      // answer's: hand it to the run, which resumes if it is retryable.
      const reader = this.readers.get(event.message_id);
      if (reader) {
        this.readers.delete(event.message_id);
        reader.onEvent(event);
        reader.resolve();
      }
      return;
    }
    if (event.type === "error" && event.seq === undefined) {
      this.requestFailed(event);
      return;
    }
    if (event.type === "accepted") {
      // The server names the answer it started for our request before its first event.
      const pending = this.pendingChats.find((r) => r.requestId === event.request_id);
      if (pending) {
        this.pendingChats = this.pendingChats.filter((r) => r !== pending);
        this.readers.set(event.message_id, pending);
      }
      return;
    }
    const reader = this.readers.get(event.message_id);
    if (!reader) return; // an answer this page no longer follows
    reader.onEvent(event);
    if (TERMINAL_TYPES.has(event.type)) {
      this.readers.delete(event.message_id);
      reader.resolve();
    }
  }

  requestFailed(frame) {
    const reader = [...this.pendingChats, ...this.readers.values()].find((r) => r.requestId === frame.request_id);
    if (!reader) return;
    this.forget(reader);
    reader.reject(
      new ApiError({
        code: frame.code,
        message: frame.message,
        status: STATUS_OF_FRAME_CODE[frame.code] ?? 0,
        retryAfter: numberOrNull(frame.retry_after),
        limit: typeof frame.limit === "string" ? frame.limit : null,
        body: frame, // as an HTTP refusal's JSON body: `retry_safe` lets the page send the start again
      }),
    );
  }

  forget(reader) {
    this.pendingChats = this.pendingChats.filter((r) => r !== reader);
    for (const [id, r] of this.readers) if (r === reader) this.readers.delete(id);
  }

  closed(socket) {
    if (this.socket === socket) this.socket = null;
    const readers = [...this.pendingChats, ...this.readers.values()];
    this.pendingChats = [];
    this.readers.clear();
    for (const reader of readers) reader.reject(new ConnectionLost("the WebSocket closed"));
  }
}
