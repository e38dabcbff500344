// The page's DOM-free logic, with Node's built-in test runner: `node --test tests/js/`.
import assert from "node:assert/strict";
import { test } from "node:test";

import {
  AnswerProgress,
  endStatus,
  RESUMABLE_STATUSES,
  retryDelay,
} from "../../chatbot_web/static/chatbot_web/answer-progress.js";

const meta = { type: "meta", seq: 1, message_id: "m", session_id: "s", model: "x" };

function applyAll(progress, events) {
  return events.map((event) => progress.apply(event)).filter(Boolean);
}

test("each seq is applied once, in order, across a resume that repeats events", () => {
  const progress = new AnswerProgress();
  const first = applyAll(progress, [meta, { type: "delta", seq: 2, text: "Hel" }]);
  const resumed = applyAll(progress, [
    { type: "delta", seq: 2, text: "Hel" }, // the replay repeats what we had
    { type: "delta", seq: 3, text: "lo" },
    { type: "usage", seq: 4, completion_tokens: 2 },
    { type: "done", seq: 5, status: "complete", finish_reason: "stop" },
  ]);

  assert.deepEqual(
    [...first, ...resumed].map((action) => action.type),
    ["meta", "append", "append", "usage", "end"],
  );
  assert.equal(resumed[0].text, "lo");
  assert.equal(progress.lastSeq, 5);
  assert.ok(progress.finished);
});

test("a snapshot replaces the text", () => {
  const progress = new AnswerProgress();
  progress.apply(meta);
  progress.apply({ type: "delta", seq: 2, text: "partial" });

  assert.deepEqual(progress.apply({ type: "snapshot", seq: 7, text: "the whole answer" }), {
    type: "replace",
    text: "the whole answer",
  });
  assert.equal(progress.lastSeq, 7);
});

test("a reader's own retryable end (no seq) asks for a resume, not an end", () => {
  const progress = new AnswerProgress();
  progress.apply(meta);
  const action = progress.apply({ type: "error", code: "server_shutdown", retryable: true, message_id: "m" });

  assert.deepEqual(action, { type: "resume", code: "server_shutdown" });
  assert.equal(progress.finished, false);
  assert.equal(progress.lastSeq, 1, "resume after the last real event");
});

test("a reader's end that is not retryable, and the answer's own error, end it", () => {
  const gone = new AnswerProgress();
  assert.equal(gone.apply({ type: "error", code: "message_not_found", retryable: false }).type, "end");
  assert.ok(gone.finished);

  const failed = new AnswerProgress();
  const error = { type: "error", seq: 3, status: "interrupted", code: "interrupted", retryable: true };
  assert.equal(failed.apply(error).type, "end", "with a seq it is the answer's end, even if retryable");
  assert.equal(endStatus(failed.terminal), "interrupted");
});

test("how an ended answer is shown comes from its terminal event", () => {
  assert.equal(endStatus({ type: "done", status: "stopped" }), "stopped");
  assert.equal(endStatus({ type: "error", status: "failed", code: "upstream_error" }), "failed");
  assert.equal(endStatus({ type: "error", code: "upstream_error" }), "failed", "an older server");
});

test("unknown event types are skipped", () => {
  assert.equal(new AnswerProgress().apply({ type: "future-thing", seq: 1 }), null);
});

test("resume delays grow, are capped, jittered, and respect Retry-After", () => {
  const noJitter = () => 0.5;
  assert.deepEqual([0, 1, 2, 3].map((n) => retryDelay(n, null, noJitter)), [500, 1000, 2000, 4000]);
  assert.equal(retryDelay(20, null, noJitter), 10_000);
  assert.equal(retryDelay(0, 30, noJitter), 30_000);
  assert.equal(retryDelay(0, null, () => 0), 375);
  assert.equal(retryDelay(0, null, () => 1), 625);
  assert.ok(RESUMABLE_STATUSES.has(503) && !RESUMABLE_STATUSES.has(400));
});

test("answer ids are version-4 UUIDs, also where crypto.randomUUID is missing (plain http pages)", async () => {
  const { newUuid } = await import("../../chatbot_web/static/chatbot_web/answer-progress.js");
  const shape = /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/;
  const randomUUID = crypto.randomUUID;
  try {
    crypto.randomUUID = undefined;
    const ids = new Set(Array.from({ length: 100 }, newUuid));
    assert.equal(ids.size, 100);
    for (const id of ids) assert.match(id, shape);
  } finally {
    crypto.randomUUID = randomUUID;
  }
  assert.match(newUuid(), shape);
});

// --- readToEnd: the resume loop ------------------------------------------------------------

async function readWith({
  streams,
  canResume = (error) => error.resumable === true,
  canRestart = undefined,
  named = true,
}) {
  const { readToEnd } = await import("../../chatbot_web/static/chatbot_web/answer-progress.js");
  const progress = new AnswerProgress();
  const calls = [];
  const waits = [];
  let text = "";
  const play = async (events) => {
    for (const event of events) {
      if (event instanceof Error) throw event;
      const action = progress.apply(event);
      if (action?.type === "append") text += action.text;
      if (action?.type === "replace") text = action.text;
    }
  };
  const outcome = await readToEnd({
    progress,
    start: () => {
      calls.push("start");
      return play(streams.shift());
    },
    resume: (after) => {
      calls.push(`resume after ${after}`);
      return play(streams.shift());
    },
    canResume,
    canRestart,
    wait: async (attempt, retryAfter) => waits.push([attempt, retryAfter]),
    hasAnswer: () => named,
    neverStarted: () => new Error("never started"),
  });
  return { outcome, progress, calls, waits, text };
}

function cut(extra = {}) {
  return Object.assign(new Error("connection lost"), { resumable: true, ...extra });
}

test("a cut stream is resumed after the last event, and the text is whole and not repeated", async () => {
  const { outcome, progress, calls, text } = await readWith({
    streams: [
      [meta, { type: "delta", seq: 2, text: "Hel" }, cut()],
      [{ type: "delta", seq: 2, text: "Hel" }, { type: "delta", seq: 3, text: "lo" }, { type: "done", seq: 4, status: "complete" }],
    ],
  });

  assert.deepEqual(calls, ["start", "resume after 2"]);
  assert.equal(text, "Hello");
  assert.equal(progress.terminal.status, "complete");
  assert.deepEqual(outcome, { resumed: true });
});

test("a reader's own end (server restarting) and a stream that ends without its terminal event are resumed", async () => {
  const { calls, progress } = await readWith({
    streams: [
      [meta, { type: "error", code: "server_shutdown", retryable: true }],
      [], // the stream ended quietly: no terminal event means resume
      [{ type: "done", seq: 2, status: "complete" }],
    ],
  });
  assert.deepEqual(calls, ["start", "resume after 1", "resume after 1"]);
  assert.ok(progress.finished);
});

test("back-off grows while nothing arrives, starts over once the answer progresses, honours Retry-After", async () => {
  const { waits } = await readWith({
    streams: [
      [meta, cut()],
      [cut({ retryAfter: 5 })],
      [cut()],
      [{ type: "delta", seq: 2, text: "x" }, cut()],
      [{ type: "done", seq: 3, status: "complete" }],
    ],
  });
  assert.deepEqual(waits, [[0, null], [1, 5], [2, null], [0, null]]);
});

test("an error that resuming cannot help ends the reading with it", async () => {
  const refused = Object.assign(new Error("bad request"), { resumable: false });
  await assert.rejects(readWith({ streams: [[meta, refused]] }), /bad request/);
});

test("an answer the server never named cannot be resumed", async () => {
  await assert.rejects(readWith({ streams: [[cut()]], named: false }), /never started/);
});

test("a replay rebuilt from the database (snapshot) replaces the partial text", async () => {
  const { text } = await readWith({
    streams: [
      [meta, { type: "delta", seq: 2, text: "part" }, cut()],
      [{ type: "snapshot", seq: 6, text: "the whole answer" }, { type: "done", seq: 8, status: "complete" }],
    ],
  });
  assert.equal(text, "the whole answer");
});

// A busy server refused the start before reading it (admission's `retry_safe`): send it again.
const busy = () => Object.assign(new Error("server busy"), { retrySafe: true, retryAfter: 1 });
const restartable = (error) => error.retrySafe === true;

test("a start a busy server refused unread is sent again after its Retry-After, then read", async () => {
  const { calls, waits, text, progress } = await readWith({
    streams: [[busy()], [busy()], [{ ...meta }, { type: "delta", seq: 2, text: "ok" }, { type: "done", seq: 3, status: "complete" }]],
    canRestart: restartable,
    named: false, // the first two starts never got that far; the third finished before it mattered
  });
  assert.deepEqual(calls, ["start", "start", "start"]);
  assert.deepEqual(waits, [[0, 1], [1, 1]]);
  assert.equal(text, "ok");
  assert.equal(progress.terminal.status, "complete");
});

test("a start refused more than MAX_RESTARTS times ends with the refusal", async () => {
  const { MAX_RESTARTS } = await import("../../chatbot_web/static/chatbot_web/answer-progress.js");
  const streams = Array.from({ length: MAX_RESTARTS + 1 }, () => [busy()]);
  await assert.rejects(readWith({ streams, canRestart: restartable, named: false }), /server busy/);
  assert.equal(streams.length, 0); // every refusal was one start: the first and MAX_RESTARTS more
});

test("a refusal that is not retry-safe, or one after the answer was named, is not sent again", async () => {
  const refused = Object.assign(new Error("rate limited"), { retryAfter: 30 });
  const streams = [[refused], [meta]];
  await assert.rejects(readWith({ streams, canRestart: restartable, named: false }), /rate limited/);
  assert.equal(streams.length, 1);
  // Named: the answer exists, so a busy error is for resuming (canResume), never a new start.
  const named = await readWith({
    streams: [[meta, busy()], [{ type: "done", seq: 2, status: "complete" }]],
    canRestart: restartable,
    canResume: (error) => error.retrySafe === true,
  });
  assert.deepEqual(named.calls, ["start", "resume after 1"]);
});
