// What the page says, translated: error sentences, labels, usage. DOM-free, so Node's test
// runner checks it. The translations come from Django's JavaScript catalogue (gettext and
// friends on window), looked up when a text is made so the catalogue may load first.

const gettext = (text) => (globalThis.gettext ?? ((t) => t))(text);
const ngettext = (singular, plural, count) =>
  (globalThis.ngettext ?? ((s, p, n) => (n === 1 ? s : p)))(singular, plural, count);

/** Django's interpolate: `%s` from a list, or `%(name)s` from an object. */
export function interpolate(format, values, named = false) {
  if (globalThis.interpolate) return globalThis.interpolate(format, values, named);
  if (named) return format.replace(/%\((\w+)\)s/g, (_, name) => String(values[name]));
  let index = 0;
  return format.replace(/%s/g, () => String(values[index++]));
}

export { gettext, ngettext };

export function loadingText(streaming) {
  return streaming ? gettext("📡 Streaming...") : gettext("The assistant is thinking...");
}

export function statusLabel(status) {
  const labels = { stopped: gettext("Stopped"), failed: gettext("Failed"), interrupted: gettext("Interrupted") };
  return labels[status] ?? status;
}

export function conversationTitle(conversation) {
  return conversation.title || gettext("New conversation");
}

export function tokenCount(count) {
  return interpolate(ngettext("%s token", "%s tokens", count), [count]);
}

export function tooLongText(count, max) {
  return interpolate(gettext("The message is too long: %(count)s characters, the limit is %(max)s."), { count, max }, true);
}

/** A readable, translated sentence for an error code: never the server's raw text. */
export function errorText(code, { retryAfter = null, limit = null } = {}) {
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

export function duration(seconds) {
  if (seconds < 120) return interpolate(gettext("%s s"), [seconds]);
  if (seconds < 7200) return interpolate(gettext("%s min"), [Math.ceil(seconds / 60)]);
  return interpolate(gettext("%s h"), [Math.ceil(seconds / 3600)]);
}

/** The "Usage today" line from GET /api/usage/, or null when the server reports none. */
export function usageText(usage, format = (n) => String(n)) {
  if (!usage?.today) return null;
  const { prompt_tokens: prompt = 0, completion_tokens: completion = 0 } = usage.today;
  const allowance = usage.limits?.tokens_per_day;
  if (!allowance) return interpolate(gettext("Usage today: %s tokens"), [format(prompt + completion)]);
  const counted = { used: format(usage.limits.tokens_used_today ?? prompt + completion), allowance: format(allowance) };
  if (usage.limits.counted_per === "address") {
    // An anonymous visitor: their own usage, and the allowance they share with their address.
    return interpolate(
      gettext("Usage today: %(own)s tokens (this address: %(used)s of %(allowance)s)"),
      { own: format(prompt + completion), ...counted },
      true,
    );
  }
  return interpolate(gettext("Usage today: %(used)s of %(allowance)s tokens"), counted, true);
}

const DAY_MS = 24 * 60 * 60 * 1000;

/** Which heading of the conversation list a conversation last changed at `when` goes under. */
export function dateGroup(when, now = new Date()) {
  const startOfToday = new Date(now.getFullYear(), now.getMonth(), now.getDate()).getTime();
  const time = new Date(when).getTime();
  if (time >= startOfToday) return gettext("Today");
  if (time >= startOfToday - DAY_MS) return gettext("Yesterday");
  if (time >= startOfToday - 7 * DAY_MS) return gettext("Previous 7 days");
  if (time >= startOfToday - 30 * DAY_MS) return gettext("Previous 30 days");
  return gettext("Older");
}

export function noConversationsText(searching) {
  return searching ? gettext("No conversation matches your search.") : gettext("No conversations yet.");
}
