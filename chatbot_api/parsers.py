"""Request body parsing that answers every malformed body with a 400, never a 500."""

from __future__ import annotations

import json

from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser

# Deeper than any real chat request: `[[[[...` is refused before the parser recurses.
MAX_JSON_DEPTH = 32


class SafeJSONParser(JSONParser):
    """DRF's JSON parser, with deep nesting refused (json's recursion would raise a 500)."""

    def parse(self, stream, media_type=None, parser_context=None):
        try:
            return super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise ParseError("JSON parse error - the body is nested too deeply.") from None


def loads_frame(text: str):
    """Decode a WebSocket text frame; ValueError for anything that is not plain JSON."""
    if _too_deep(text):
        raise ValueError("nested too deeply")
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _too_deep(text: str) -> bool:
    """A cheap upper bound on nesting (brackets inside strings count too, which only errs safe)."""
    depth = 0
    for char in text:
        if char in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH * 4:
                return True
        elif char in "]}":
            depth -= 1
    return False
