"""The OpenAI chat-completions API on top of the same streaming core.

Any OpenAI client (the official SDKs, LangChain, the `llm` tool, editors, other chat
front-ends) gets what the product's own API gives: answers that survive a dropped
connection (`Last-Event-ID` on the completion's URL), rate limits and quotas, usage
records, metrics, and conversations saved and shown on the page. `wire.py` is the format
(request validation, chunks, errors), `views.py` the endpoints (docs/api.md, "OpenAI API").
"""
