// What one answer's events mean, without the page: which to apply, once each and in order,
// when the answer has ended, and when the reader must resume instead. DOM-free, so Node's
// test runner checks it (tests/js/); chat.js turns its actions into what the user sees.

/**
 * The progress of reading one answer. `apply(event)` returns the action the event calls for,
 * or null when it must be skipped (a repeat after a resume):
 *   {type: "meta", event} | {type: "append", text} | {type: "replace", text}
 *   {type: "usage", completionTokens} | {type: "end", event} | {type: "resume", code}
 */
export class AnswerProgress {
  constructor() {
    this.lastSeq = 0; // the last seq applied: a resume asks for the events after it
    this.terminal = null;
  }

  get finished() {
    return this.terminal !== null;
  }

  apply(event) {
    if (typeof event.seq === "number") {
      if (event.seq <= this.lastSeq) return null;
      this.lastSeq = event.seq;
    }
    switch (event.type) {
      case "meta":
        return { type: "meta", event };
      case "delta":
        return { type: "append", text: event.text };
      case "snapshot": // the whole text so far, rebuilt from the database: it replaces ours
        return { type: "replace", text: event.text };
      case "usage":
        return { type: "usage", completionTokens: event.completion_tokens };
      case "error":
        // No seq: this reader's stream ended (server restarting, event log unreachable), not
        // the answer. Retryable ones are resumed after lastSeq, on whichever worker answers.
        if (event.seq === undefined && event.retryable) return { type: "resume", code: event.code };
        this.terminal = event;
        return { type: "end", event };
      case "done":
        this.terminal = event;
        return { type: "end", event };
      default:
        return null; // a type this page does not know: newer servers may add some
    }
  }
}

/** How an ended answer is shown: the terminal event says it (error events carry `status`). */
export function endStatus(terminal) {
  if (terminal.type === "done") return terminal.status;
  return terminal.status ?? "failed";
}

/** Milliseconds before resume attempt `attempt` (0, 1, ...): exponential with jitter, capped,
 *  and never sooner than the server's Retry-After. */
export function retryDelay(attempt, retryAfterSeconds = null, random = Math.random) {
  const backoff = Math.min(10_000, 500 * 2 ** attempt) * (0.75 + random() / 2);
  return Math.max(backoff, (retryAfterSeconds ?? 0) * 1000);
}

/** Times a start refused by a busy server is sent again before the refusal is shown. */
export const MAX_RESTARTS = 3;

/** HTTP statuses after which a started answer is read again instead of given up. */
export const RESUMABLE_STATUSES = new Set([429, 502, 503, 504]);

/** A random (version 4) UUID; crypto.randomUUID exists only on https and localhost pages. */
export function newUuid() {
  if (typeof crypto.randomUUID === "function") return crypto.randomUUID();
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  bytes[6] = (bytes[6] & 0x0f) | 0x40;
  bytes[8] = (bytes[8] & 0x3f) | 0x80;
  const hex = [...bytes].map((byte) => byte.toString(16).padStart(2, "0")).join("");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

/**
 * Read an answer to its terminal event, resuming after the last event applied whenever a
 * stream ends without it (a cut connection, a reader's own end, a busy server), so the
 * text is never lost nor repeated. Everything that touches the network or the page comes
 * in as a function:
 *   start()                     read the stream that started the answer
 *   resume(after)               read its events after seq `after`
 *   canResume(error)            whether reading again may help
 *   wait(attempt, retryAfter)   resolves when it is time to try again (rejects when aborted)
 *   canRestart(error)           whether a start refused before the answer was named may be
 *                               sent again as is (a busy server that read none of it)
 *   hasAnswer()                 whether the server named the answer (else nothing to resume)
 *   neverStarted()              the error to fail with when it did not
 *   onRetry()                   called before each wait
 * `progress` is the AnswerProgress the streams' events are applied to. Resolves with
 * `{ resumed }` once `progress.finished`; rejects with the error that ended the reading.
 */
export async function readToEnd({
  progress,
  start,
  resume,
  canResume,
  canRestart = () => false,
  wait,
  hasAnswer,
  neverStarted,
  onRetry,
}) {
  let request = start;
  let resumed = false;
  let restarts = 0;
  for (let attempt = 0; ; attempt++) {
    const seqBefore = progress.lastSeq;
    let retryAfter = null;
    try {
      await request();
    } catch (error) {
      if (request === start && !hasAnswer() && restarts < MAX_RESTARTS && canRestart(error)) {
        restarts++;
        onRetry?.();
        await wait(attempt, error.retryAfter ?? null);
        continue; // the same start again
      }
      if (!canResume(error)) throw error;
      retryAfter = error.retryAfter ?? null;
    }
    if (progress.finished) return { resumed };
    if (!hasAnswer()) throw neverStarted();
    if (progress.lastSeq > seqBefore) attempt = 0; // it was progressing: retry quickly
    resumed = true;
    onRetry?.();
    await wait(attempt, retryAfter);
    request = () => resume(progress.lastSeq);
  }
}
