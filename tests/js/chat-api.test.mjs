// chat-api.js under Node's test runner: the SSE parser, the HTTP client and the WebSocket
// client, with the browser's fetch/WebSocket/document replaced by small stand-ins.
import assert from "node:assert/strict";
import { beforeEach, test } from "node:test";

import { ApiError, ChatApi, ChatSocket, ConnectionLost, SseParser } from "../../chatbot_web/static/chatbot_web/chat-api.js";

globalThis.document = { cookie: "sessionid=s; csrftoken=the-token" };

function sseResponse(chunks, { status = 200, headers = {} } = {}) {
  const encoder = new TextEncoder();
  const body = new ReadableStream({
    start(controller) {
      for (const chunk of chunks) controller.enqueue(encoder.encode(chunk));
      controller.close();
    },
  });
  return new Response(status === 204 ? null : body, {
    status,
    headers: { "Content-Type": "text/event-stream", ...headers },
  });
}

function jsonResponse(status, body, headers = {}) {
  return new Response(JSON.stringify(body), { status, headers: { "Content-Type": "application/json", ...headers } });
}

test("the SSE parser handles split frames, comments, CRLF and multi-line data", () => {
  const parser = new SseParser();
  const frames = [
    "retry: 1000\n\n",
    ': keep-alive\n\nid: 1\nevent: meta\ndata: {"seq":1}\n',
    "\nid: 2\nevent: delta\nda",
    'ta: {"seq":2}\n\n',
    "id: 3\r\nevent: delta\r\ndata: {\r\ndata: }\r\n\r\n",
    'event: error\ndata: {"code":"server_shutdown"}\n\n', // a reader's own end: no id
    'id: 5\nevent: delta\ndata: {"incomplete": ',
  ].flatMap((chunk) => parser.push(chunk));

  assert.deepEqual(
    frames.map((frame) => [frame.id, frame.event, frame.data]),
    [
      ["1", "meta", '{"seq":1}'],
      ["2", "delta", '{"seq":2}'],
      ["3", "delta", "{\n}"],
      [null, "error", '{"code":"server_shutdown"}'],
    ],
  );
});

let requests;
beforeEach(() => {
  requests = [];
});

function serve(respond) {
  globalThis.fetch = async (url, options) => {
    requests.push({ url, ...options });
    return respond(url, options);
  };
}

test("followEvents reads every event of a stream cut into odd pieces, with the offset it was given", async () => {
  serve(() =>
    sseResponse(["id: 4\nevent: delta\ndata: {\"type\":\"delta\",\"seq\":4,", '"text":"é"}\n\nid: 5\nev', 'ent: done\ndata: {"type":"done","seq":5}\n\n']),
  );
  const events = [];

  await new ChatApi("/api").followEvents({ messageId: "m 1", after: 3, onEvent: (event) => events.push(event) });

  assert.deepEqual(events.map((event) => [event.type, event.seq]), [["delta", 4], ["done", 5]]);
  assert.equal(events[0].text, "é");
  assert.equal(requests[0].url, "/api/messages/m%201/events?after=3");
  assert.equal(requests[0].headers.Accept, "text/event-stream");
});

test("a 204 from the events endpoint is an answer already read to its end: no events, no error", async () => {
  serve(() => sseResponse([], { status: 204 }));
  const events = [];
  await new ChatApi("/api/").followEvents({ messageId: "m", after: 9, onEvent: (event) => events.push(event) });
  assert.deepEqual(events, []);
});

test("refusals become ApiError with the error shape's fields and Retry-After", async () => {
  serve(() => jsonResponse(503, { success: false, error: "busy", code: "server_busy", retryable: true }, { "Retry-After": "5" }));

  await assert.rejects(
    new ChatApi("/api").followEvents({ messageId: "m", after: 0, onEvent() {} }),
    (error) => error instanceof ApiError && error.status === 503 && error.code === "server_busy" && error.retryAfter === 5,
  );
});

test("POSTs carry the CSRF token; a network failure is ConnectionLost", async () => {
  serve(() => jsonResponse(200, { success: true, response: "hi", message_id: "m" }));
  const body = await new ChatApi("/api").sendJson({ message: "Hi" });
  assert.equal(body.response, "hi");
  assert.equal(requests[0].headers["X-CSRFToken"], "the-token");
  assert.deepEqual(JSON.parse(requests[0].body), { message: "Hi", streaming: false });

  globalThis.fetch = async () => {
    throw new TypeError("Failed to fetch");
  };
  await assert.rejects(new ChatApi("/api").sendJson({ message: "Hi" }), ConnectionLost);
});

class FakeSocket extends EventTarget {
  static OPEN = 1;
  static last = null;

  constructor(url) {
    super();
    this.url = url;
    this.readyState = 0;
    this.sent = [];
    FakeSocket.last = this;
    queueMicrotask(() => {
      this.readyState = FakeSocket.OPEN;
      this.dispatchEvent(new Event("open"));
    });
  }

  send(data) {
    this.sent.push(JSON.parse(data));
  }

  receive(frame) {
    const message = new Event("message");
    message.data = JSON.stringify(frame);
    this.dispatchEvent(message);
  }

  close() {
    this.readyState = 3;
    this.dispatchEvent(new Event("close"));
  }
}
globalThis.WebSocket = FakeSocket;

async function sent(socket, count) {
  while (socket === null || socket.sent.length < count) await new Promise((resolve) => setTimeout(resolve, 1));
  return socket.sent[count - 1];
}

test("a chat over the socket: accepted names the answer, its events reach the run, the terminal resolves", async () => {
  const client = new ChatSocket("ws://x/ws/chat/");
  const events = [];
  const done = client.streamChat({ message: "Hi", onEvent: (event) => events.push(event) });
  const request = await sent(FakeSocket.last, 1);
  const socket = FakeSocket.last;

  socket.receive({ type: "accepted", request_id: request.request_id, message_id: "m1", session_id: "s" });
  socket.receive({ type: "meta", seq: 1, message_id: "m1" });
  socket.receive({ type: "delta", seq: 2, message_id: "other" }); // an answer nobody follows here
  socket.receive({ type: "done", seq: 2, message_id: "m1", status: "complete" });
  await done;

  assert.equal(request.type, "chat");
  assert.deepEqual(events.map((event) => event.type), ["meta", "done"]);
});

test("a reader's own end on the socket is handed to its run, which resolves (and then resumes)", async () => {
  const client = new ChatSocket("ws://x/ws/chat/");
  const events = [];
  const following = client.followEvents({ messageId: "m2", after: 4, onEvent: (event) => events.push(event) });
  const request = await sent(FakeSocket.last, 1);

  FakeSocket.last.receive({ type: "error", message_id: "m2", code: "server_shutdown", retryable: true, message: "x" });
  await following;

  assert.deepEqual(request, { type: "resume", message_id: "m2", after: 4, request_id: request.request_id });
  assert.equal(events[0].code, "server_shutdown");
});

test("a refused request rejects with ApiError; a closed socket rejects its readers with ConnectionLost", async () => {
  const client = new ChatSocket("ws://x/ws/chat/");
  const refused = client.streamChat({ message: "Hi", onEvent() {} });
  const request = await sent(FakeSocket.last, 1);
  FakeSocket.last.receive({ type: "error", code: "rate_limited", message: "slow down", retry_after: 7, request_id: request.request_id });
  await assert.rejects(refused, (error) => error instanceof ApiError && error.status === 429 && error.retryAfter === 7);

  // Load shedding refuses a start as HTTP's 503 does, retry_safe in the body: the page may send it again.
  const shed = client.streamChat({ message: "Hi", onEvent() {} });
  const second = await sent(FakeSocket.last, 2);
  const busy = { type: "error", code: "server_busy", message: "busy", retryable: true, retry_safe: true, retry_after: 1 };
  FakeSocket.last.receive({ ...busy, request_id: second.request_id });
  await assert.rejects(
    shed,
    (error) => error.status === 503 && error.retryAfter === 1 && error.body?.retry_safe === true,
  );

  const cut = client.followEvents({ messageId: "m3", after: 0, onEvent() {} });
  await sent(FakeSocket.last, 3);
  FakeSocket.last.close();
  await assert.rejects(cut, ConnectionLost);
});
