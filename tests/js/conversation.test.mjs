// The page's conversation state without a browser: a fake API and fake transports stand in
// for the server, and the assertions read the state and the changes it announced.
import assert from "node:assert/strict";
import { test } from "node:test";

import { ApiError, ConnectionLost } from "chatbot/api";
import { Answer, Chat, Question, wasStreamed } from "chatbot/conversation";

const meta = (id = "m1", session = "s1") => ({ type: "meta", seq: 1, message_id: id, session_id: session, model: "fake" });
const delta = (seq, text) => ({ type: "delta", seq, text });
const done = (seq) => ({ type: "done", seq, status: "complete", finish_reason: "stop" });

function memoryStorage(initial = {}) {
  const values = new Map(Object.entries(initial));
  return { values, get: (key) => values.get(key) ?? null, set: (key, value) => values.set(key, value) };
}

/** A fake API: each method answers from `responses` (a value, a function, or an Error to throw). */
function fakeApi(responses = {}) {
  const calls = [];
  const api = { calls };
  const defaults = { listConversations: [], getConversation: { messages: [] }, usage: null };
  for (const name of [
    "listConversations", "getConversation", "renameConversation", "deleteConversation", "getMessage",
    "stopMessage", "sendJson", "regenerateJson", "usage",
  ]) {
    api[name] = async (...args) => {
      calls.push([name, ...args]);
      const response = name in responses ? responses[name] : defaults[name];
      const value = typeof response === "function" ? await response(...args) : response;
      if (value instanceof Error) throw value;
      return value;
    };
  }
  return api;
}

/** A streaming transport whose streams are scripted: each call plays the next script. */
function scriptedTransport(scripts) {
  const calls = [];
  const play = (name) => async (options) => {
    calls.push([name, options]);
    const script = scripts[name].shift();
    await null; // the network answers later, never within the call
    for (const step of script) {
      if (step instanceof Error) throw step;
      if (typeof step === "function") await step(options);
      else options.onEvent(step);
    }
  };
  return {
    calls,
    streamChat: play("streamChat"),
    streamRegenerate: play("streamRegenerate"),
    followEvents: play("followEvents"),
    stop: async (messageId) => calls.push(["stop", messageId]),
  };
}

function makeChat({ api = fakeApi(), transport = scriptedTransport({}), streaming = true, storage = memoryStorage() } = {}) {
  const chat = new Chat({
    api,
    transport: () => transport,
    streaming: () => streaming,
    storage,
    wait: async () => {},
    savedPoll: { attempts: 5, delayMs: 1 },
  });
  const changes = [];
  for (const type of ["session", "messages", "runs", "finished", "refused", "error", "conversations"]) {
    chat.on(type, (detail) => changes.push([type, detail]));
  }
  return { chat, api, transport, storage, changes };
}

function until(condition, what = "the condition") {
  return new Promise((resolve, reject) => {
    const started = Date.now();
    const check = () => {
      if (condition()) resolve();
      else if (Date.now() - started > 2000) reject(new Error(`timed out waiting for ${what}`));
      else setTimeout(check, 1);
    };
    check();
  });
}

test("a streamed answer grows, names its conversation, and finishes once", async () => {
  const transport = scriptedTransport({ streamChat: [[meta(), delta(2, "Hel"), delta(3, "lo"), done(4)]] });
  const { chat, storage, changes } = makeChat({ transport });

  assert.equal(chat.send("Hi"), true);
  const [question, answer] = chat.messages;
  assert.ok(question instanceof Question && answer instanceof Answer);
  assert.equal(answer.streamed, true);
  const texts = [];
  answer.on("text", () => texts.push(answer.text));
  assert.equal(chat.send("again"), false, "one answer at a time");
  await until(() => !chat.running, "the run to end");

  assert.deepEqual(texts, ["Hel", "Hello"]);
  assert.equal(answer.id, "m1");
  assert.deepEqual(answer.outcome, { status: "complete", errorCode: "", finishReason: "stop", retryAfter: null, limit: null });
  assert.equal(chat.sessionId, "s1");
  assert.equal(storage.get("chatbot.sessionId"), "s1");
  assert.equal(changes.filter(([type]) => type === "finished").length, 1);
  assert.equal(transport.calls[0][1].message, "Hi");
  assert.equal(transport.calls[0][1].sessionId, null);
});

test("a cut stream resumes after the last event seen: no text lost, none repeated", async () => {
  const transport = scriptedTransport({
    streamChat: [[meta(), delta(2, "Hel"), new ConnectionLost()]],
    followEvents: [[delta(2, "Hel"), delta(3, "lo"), done(4)]],
  });
  const api = fakeApi({ getMessage: { content: "Hello" } });
  const { chat } = makeChat({ transport, api });
  const reconnecting = [];
  chat.on("runs", () => reconnecting.push(chat.reconnecting));

  chat.send("Hi");
  await until(() => !chat.running);

  const answer = chat.messages[1];
  assert.equal(answer.text, "Hello");
  assert.equal(transport.calls[1][0], "followEvents");
  assert.equal(transport.calls[1][1].after, 2);
  assert.equal(transport.calls[1][1].messageId, "m1");
  assert.ok(reconnecting.includes(true) && reconnecting.at(-1) === false);
});

test("after a resume the stored text wins when the stream rebuilt less of it", async () => {
  const transport = scriptedTransport({
    streamChat: [[meta(), delta(2, "Hel"), new ConnectionLost()]],
    followEvents: [[done(9)]], // the server's log expired: only the ending is left
  });
  const api = fakeApi({ getMessage: { content: "Hello, world" } });
  const { chat } = makeChat({ transport, api });

  chat.send("Hi");
  await until(() => !chat.running);
  assert.equal(chat.messages[1].text, "Hello, world");
});

test("a refused question leaves nothing behind and comes back to the composer", async () => {
  const refusal = new ApiError({ code: "rate_limited", status: 429, retryAfter: 3 });
  const transport = scriptedTransport({ streamChat: [[refusal]] });
  const { chat, changes } = makeChat({ transport });

  chat.send("Hi");
  await until(() => !chat.running);

  assert.deepEqual(chat.messages, []);
  const [, refused] = changes.find(([type]) => type === "refused");
  assert.equal(refused.error, refusal);
  assert.equal(refused.question.text, "Hi");
  assert.equal(changes.filter(([type]) => type === "finished").length, 0);
});

test("a connection lost before the answer started fails it with the network code", async () => {
  const transport = scriptedTransport({ streamChat: [[new ConnectionLost()]] });
  const { chat } = makeChat({ transport });

  chat.send("Hi");
  await until(() => !chat.running);
  assert.equal(chat.messages[1].outcome.status, "failed");
  assert.equal(chat.messages[1].outcome.errorCode, "network");
});

test("regenerate replaces the last answer, and a refusal puts the old one back", async () => {
  const api = fakeApi({
    getConversation: { messages: [
      { role: "user", content: "Q" },
      { role: "assistant", id: "old", content: "A", status: "complete", model: "fake" },
    ] },
  });
  const transport = scriptedTransport({
    streamRegenerate: [[new ApiError({ code: "upstream_unavailable", status: 503 })], [meta("new"), delta(2, "B"), done(3)]],
  });
  const { chat } = makeChat({ api, transport });
  await chat.open("s1");
  const old = chat.regenerable;
  assert.equal(old.id, "old");

  chat.regenerate();
  await until(() => !chat.running);
  assert.equal(chat.messages.at(-1), old, "the refused regenerate put the old answer back");

  chat.regenerate();
  await until(() => !chat.running);
  assert.equal(chat.messages.length, 2);
  assert.equal(chat.messages.at(-1).text, "B");
  assert.equal(transport.calls.at(-1)[1].messageId, "old");
});

test("Stop before the answer is named is sent as soon as it is", async () => {
  let release;
  const named = new Promise((resolve) => (release = resolve));
  const transport = scriptedTransport({
    streamChat: [[() => named, meta("m7"), { type: "done", seq: 2, status: "stopped", finish_reason: "stop" }]],
  });
  const { chat } = makeChat({ transport });

  chat.send("Hi");
  chat.stopAll();
  assert.deepEqual(transport.calls.filter(([name]) => name === "stop"), []);
  release();
  await until(() => !chat.running);
  assert.deepEqual(transport.calls.filter(([name]) => name === "stop"), [["stop", "m7"]]);
  assert.equal(chat.messages[1].outcome.status, "stopped");
});

test("JSON mode: Stop reaches the answer by the id the page gave it, once the server saved it", async () => {
  let finishJson;
  const jsonBody = new Promise((resolve) => (finishJson = resolve));
  let stopTries = 0;
  const api = fakeApi({
    sendJson: () => jsonBody,
    getMessage: (id) => ({ id, conversation: "s9", content: "" }),
    stopMessage: () => (++stopTries < 3 ? new ApiError({ code: "message_not_found", status: 404 }) : { status: "stopping" }),
  });
  const { chat } = makeChat({ api, streaming: false });

  chat.send("Hi");
  const answer = chat.messages[1];
  assert.equal(answer.streamed, false);
  chat.stopAll();
  await until(() => stopTries === 3, "the stop to be retried until saved");
  const sent = api.calls.find(([name]) => name === "sendJson")[1];
  const stopped = api.calls.filter(([name]) => name === "stopMessage").map(([, id]) => id);
  assert.ok(sent.answerId);
  assert.deepEqual(new Set(stopped), new Set([sent.answerId]));
  await until(() => chat.sessionId === "s9", "the new conversation to be listed while it is written");

  finishJson({ success: true, message_id: sent.answerId, session_id: "s9", status: "stopped", response: "Hal", model: "fake" });
  await until(() => !chat.running);
  assert.equal(answer.text, "Hal");
  assert.equal(answer.outcome.status, "stopped");
});

test("opening a conversation follows its live answer from the first event", async () => {
  const api = fakeApi({
    getConversation: { messages: [
      { role: "user", content: "Q" },
      { role: "assistant", id: "live", content: "so", status: "streaming", model: "fake", transport: "json" },
    ] },
  });
  const transport = scriptedTransport({ followEvents: [[meta("live"), delta(2, "so far"), done(3)]] });
  const { chat } = makeChat({ api, transport });

  await chat.open("s1");
  const answer = chat.messages[1];
  assert.equal(answer.streamed, false, "shown as it was asked for");
  assert.ok(chat.running);
  await until(() => !chat.running);
  assert.equal(transport.calls[0][1].after, 0);
  assert.equal(answer.text, "so far", "the replay rebuilds the text: the stored part is not shown twice");
});

test("a slow load that finishes after a newer one is ignored", async () => {
  let slow;
  const api = fakeApi({
    getConversation: (id) =>
      id === "old" ? new Promise((resolve) => (slow = resolve)) : { messages: [{ role: "user", content: "new" }] },
  });
  const { chat } = makeChat({ api });

  const first = chat.open("old");
  await chat.open("new");
  slow({ messages: [{ role: "user", content: "old" }] });
  await first;
  assert.equal(chat.sessionId, "new");
  assert.deepEqual(chat.messages.map((m) => m.text), ["new"]);
});

test("a conversation deleted elsewhere is forgotten when opened", async () => {
  const api = fakeApi({ getConversation: new ApiError({ code: "conversation_not_found", status: 404 }) });
  const storage = memoryStorage({ "chatbot.sessionId": "gone" });
  const { chat } = makeChat({ api, storage });

  chat.restore();
  await until(() => chat.sessionId === null);
  assert.equal(storage.get("chatbot.sessionId"), null);
});

test("switching conversation stops reading, not the answer", async () => {
  const transport = scriptedTransport({ streamChat: [[meta(), () => new Promise(() => {})]] });
  const { chat } = makeChat({ transport });

  chat.send("Hi");
  await until(() => chat.messages[1].id === "m1");
  const { signal } = transport.calls[0][1];
  chat.newChat();
  assert.ok(signal.aborted);
  assert.equal(chat.running, false);
  assert.deepEqual(chat.messages, []);
  assert.deepEqual(transport.calls.filter(([name]) => name === "stop"), []);
});

test("deleting the open conversation starts a new one; a 404 counts as deleted", async () => {
  const api = fakeApi({
    listConversations: [{ session_id: "s1", title: "A" }, { session_id: "s2", title: "B" }],
    deleteConversation: new ApiError({ code: "conversation_not_found", status: 404 }),
  });
  const { chat } = makeChat({ api });
  await chat.refreshConversations();
  await chat.open("s1");

  await chat.remove("s1");
  assert.equal(chat.sessionId, null);
  assert.deepEqual(chat.conversations.map((c) => c.session_id), ["s2"]);
});

test("an answer shows as streamed when it was asked for as a stream, whatever the API", () => {
  assert.equal(wasStreamed({ transport: "sse", streaming: false }), true);
  assert.equal(wasStreamed({ transport: "websocket", streaming: false }), true);
  assert.equal(wasStreamed({ transport: "json", streaming: true }), true); // the seed's flag
  assert.equal(wasStreamed({ transport: "openai", streaming: false }), false);
  assert.equal(wasStreamed({ transport: "openai", streaming: true }), true);
  assert.equal(wasStreamed({ transport: "", streaming: false }), false);
});

test("a search lists what the server found, and a slower earlier search does not overwrite it", async () => {
  const answers = { cat: [{ session_id: "c", title: "Cats" }], catnip: [], "": [] };
  const slow = {};
  const api = fakeApi({
    listConversations: (query) => (query === "cat" ? new Promise((resolve) => (slow.release = resolve)) : answers[query]),
  });
  const { chat, changes } = makeChat({ api });

  const first = chat.search(" cat ");
  await chat.search("catnip");
  slow.release(answers.cat);
  await first;

  assert.equal(chat.query, "catnip");
  assert.deepEqual(chat.conversations, []);
  assert.deepEqual(api.calls.filter(([name]) => name === "listConversations").map(([, q]) => q), ["cat", "catnip"]);
  assert.equal(changes.filter(([type]) => type === "conversations").length, 1);
});

test("an edited question replaces it and the later turns; a refusal puts them all back", async () => {
  const api = fakeApi({
    getConversation: { messages: [
      { role: "user", id: "q1", content: "First" },
      { role: "assistant", id: "a1", content: "One", status: "complete", model: "fake" },
      { role: "user", id: "q2", content: "Second" },
      { role: "assistant", id: "a2", content: "Two", status: "complete", model: "fake" },
    ] },
  });
  const edits = [];
  api.streamEdit = async (options) => {
    edits.push(options);
    await null;
    if (edits.length === 1) throw new ApiError({ code: "conflict", status: 409 });
    options.onEvent({ ...meta("a3"), question_id: "q3" });
    options.onEvent(delta(2, "Edited."));
    options.onEvent(done(3));
  };
  const { chat } = makeChat({ api });
  await chat.open("s1");
  const [first] = chat.messages;
  const before = chat.messages;

  assert.equal(chat.edit(first, "First, again"), true);
  await until(() => !chat.running);
  assert.equal(chat.messages, before, "refused: the conversation is as it was");

  chat.edit(first, "First, again");
  const edited = chat.messages[0];
  assert.deepEqual(chat.messages.map((m) => m.text), ["First, again", ""]);
  await until(() => !chat.running);
  assert.deepEqual(chat.messages.map((m) => m.text), ["First, again", "Edited."]);
  assert.equal(edited.id, "q3", "the stream named the new question: it can be edited in turn");
  assert.deepEqual([edits[1].questionId, edits[1].message], ["q1", "First, again"]);
  assert.equal(chat.edit(before[2], "gone"), false, "a replaced question cannot be edited");
});

test("a cut answer continues in place: the same answer grows, a refusal puts it back as it was", async () => {
  const api = fakeApi({
    getConversation: { messages: [
      { role: "user", id: "q1", content: "Story" },
      { role: "assistant", id: "a1", content: "Once upon", status: "complete", finish_reason: "length", model: "fake" },
    ] },
  });
  const continues = [];
  api.streamContinue = async (options) => {
    continues.push(options);
    await null;
    if (continues.length === 1) throw new ApiError({ code: "conflict", status: 409 });
    options.onEvent({ ...meta("a1"), seq: 3 }); // the continued log numbers on from the old end
    options.onEvent({ type: "snapshot", seq: 4, text: "Once upon" });
    options.onEvent({ type: "delta", seq: 5, text: " a time." });
    options.onEvent({ ...done(6) });
  };
  const { chat } = makeChat({ api });
  await chat.open("s1");
  const cut = chat.messages.at(-1);
  assert.equal(chat.continuable(cut), true);
  assert.equal(chat.continuable(chat.messages[0]), false, "a question is not an answer");

  assert.equal(chat.continueAnswer(cut), true);
  await until(() => !chat.running);
  assert.equal(chat.messages.at(-1), cut, "refused: the cut answer is back as it was");

  chat.continueAnswer(cut);
  assert.equal(chat.messages.at(-1).text, "Once upon", "the text so far stays on screen");
  await until(() => !chat.running);
  const answer = chat.messages.at(-1);
  assert.deepEqual([answer.id, answer.text, answer.outcome.finishReason], ["a1", "Once upon a time.", "stop"]);
  assert.equal(chat.messages.length, 2, "one answer, grown");
  assert.equal(continues[1].messageId, "a1");
  assert.equal(chat.continuable(answer), false, "finished now: nothing to continue");
});
