import assert from "node:assert/strict";
import { test } from "node:test";

import { dateGroup, duration, errorText, tooLongText, usageText } from "chatbot/texts";

test("an anonymous visitor sees their own usage and their address's allowance apart", () => {
  const usage = {
    today: { prompt_tokens: 10, completion_tokens: 5 },
    limits: { tokens_per_day: 1000, tokens_used_today: 400, counted_per: "address" },
  };
  assert.equal(usageText(usage), "Usage today: 15 tokens (this address: 400 of 1000)");
});

test("a signed-in user sees used of allowance; no allowance, just the count; no endpoint, nothing", () => {
  const today = { prompt_tokens: 7, completion_tokens: 3 };
  assert.equal(
    usageText({ today, limits: { tokens_per_day: 50, tokens_used_today: 10, counted_per: "user" } }),
    "Usage today: 10 of 50 tokens",
  );
  assert.equal(usageText({ today, limits: {} }), "Usage today: 10 tokens");
  assert.equal(usageText(null), null);
});

test("rate limits say which limit and when it renews", () => {
  assert.equal(errorText("rate_limited", { retryAfter: 4 }), "Too many requests, retry in 4 s.");
  assert.equal(errorText("rate_limited", { limit: "tokens_per_day", retryAfter: 3600 }), "Today's token allowance is used up. It renews in 60 min.");
  assert.match(errorText("rate_limited", { limit: "concurrent_streams" }), /Too many answers/);
  assert.equal(duration(7200), "2 h");
});

test("unknown codes get a generic sentence, never the raw code", () => {
  assert.equal(errorText("something_new"), "Something went wrong. Try again.");
  assert.equal(errorText("timeout_total"), "The model took too long to answer. Try again.");
  assert.equal(tooLongText(12, 10), "The message is too long: 12 characters, the limit is 10.");
});

test("conversations are grouped by when they last changed, by local calendar day", () => {
  const now = new Date(2026, 11, 2, 9, 30); // 2 December, 9:30 local time
  assert.equal(dateGroup(new Date(2026, 11, 2, 0, 5), now), "Today");
  assert.equal(dateGroup(new Date(2026, 11, 1, 23, 59), now), "Yesterday");
  assert.equal(dateGroup(new Date(2026, 10, 26, 12, 0), now), "Previous 7 days");
  assert.equal(dateGroup(new Date(2026, 10, 10, 12, 0), now), "Previous 30 days");
  assert.equal(dateGroup(new Date(2025, 0, 1), now), "Older");
  assert.equal(dateGroup(new Date(2026, 11, 2, 9, 0).toISOString(), now), "Today"); // the API's ISO strings
});
