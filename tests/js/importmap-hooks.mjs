// Node resolve hooks that give the page's bare module names ("chatbot/api", ...) the files
// the browser gets from the page's import map. The map is read from the template itself, so
// the tests and the page cannot disagree about it.
import { readFileSync } from "node:fs";
import { pathToFileURL } from "node:url";

const root = new URL("../../", import.meta.url);
const template = readFileSync(new URL("chatbot_web/templates/chatbot_web/chat.html", root), "utf8");
const map = new Map(
  [...template.matchAll(/"(chatbot\/[\w-]+)":\s*"\{% static '([^']+)' %\}"/g)].map(([, name, path]) => [
    name,
    pathToFileURL(new URL(`chatbot_web/static/${path}`, root).pathname).href,
  ]),
);

export async function resolve(specifier, context, nextResolve) {
  const url = map.get(specifier);
  return url ? { url, shortCircuit: true } : nextResolve(specifier, context);
}
