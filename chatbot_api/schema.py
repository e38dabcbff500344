"""OpenAPI: our authentication classes, and the statuses every operation can answer."""

from drf_spectacular.authentication import SessionScheme
from drf_spectacular.extensions import OpenApiAuthenticationExtension


class CsrfSessionScheme(SessionScheme):
    target_class = "chatbot_api.authentication.CsrfSessionAuthentication"


def only_chatbot_endpoints(endpoints):
    """drf-spectacular preprocessing hook: the chat API's endpoints, none of the site's others."""
    from .views import ApiPolicy

    return [endpoint for endpoint in endpoints if issubclass(getattr(endpoint[3], "cls", object), ApiPolicy)]


class BearerTokenScheme(OpenApiAuthenticationExtension):
    target_class = "chatbot_api.authentication.BearerTokenAuthentication"
    name = "bearerAuth"
    priority = 1  # before drf-spectacular's own TokenScheme, which matches subclasses too

    def get_security_definition(self, auto_schema):
        return {"type": "http", "scheme": "bearer", "description": "An API token as an OpenAI-style key."}


ERROR_SCHEMA = {
    "type": "object",
    "properties": {
        "success": {"type": "boolean", "enum": [False]},
        "error": {"type": "string", "description": "A readable sentence."},
        "code": {"type": "string", "description": "What went wrong, for programs (docs/api.md, Errors)."},
        "retryable": {"type": "boolean"},
        "details": {"type": "object", "description": "Per field, for validation errors."},
    },
    "required": ["success", "error", "code"],
}
OPENAI_ERROR_SCHEMA = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": "string", "nullable": True},
                "code": {"type": "string", "nullable": True},
            },
            "required": ["message", "type", "code"],
        }
    },
    "required": ["error"],
}
ERROR_DESCRIPTIONS = {
    "400": "Invalid input (`invalid`, with `details` per field) or a bad parameter.",
    "401": "Bad credentials, or none where anonymous use is off.",
    "403": "Not allowed, or a session cookie without its CSRF token.",
    "404": "Unknown, or someone else's.",
    "406": "No representation matches the Accept header.",
    "409": "A conflict: the answer is still being written, or `answer_id` is taken.",
    "413": "The body is larger than CHATBOT_MAX_BODY_BYTES.",
    "415": "The body is not JSON.",
    "429": "A rate limit or quota (`Retry-After`).",
    "502": "The model server failed.",
    "503": "Busy (database or Redis slow), shutting down, or the model unavailable: retry.",
    "504": "A generation time limit was hit.",
}
# Operations that start an answer: the limits, the model server and its time limits apply.
ANSWER_OPERATIONS = {
    "api_chat_create",
    "api_messages_regenerate_create",
    "api_messages_edit_create",
    "openai_chat_completions",
}
STREAM_TYPES = ("text/event-stream", "application/x-ndjson")


def document_errors(result, generator, request, public):
    """drf-spectacular postprocessing hook: every status an operation can answer, with its body.

    The error responses follow from what an operation takes (a body, path parameters, a
    negotiated response, an answer to start) rather than being listed by hand on each view;
    streamed responses are described as text whose frames follow `x-frame-schema`.
    """
    from .conf import chatbot_setting

    schemas = result.setdefault("components", {}).setdefault("schemas", {})
    schemas["Error"], schemas["OpenAIError"] = ERROR_SCHEMA, OPENAI_ERROR_SCHEMA
    anonymous = chatbot_setting("ALLOW_ANONYMOUS")
    for operations in result["paths"].values():
        for operation in operations.values():
            _document_operation(operation, anonymous)
    return result


def _document_operation(operation: dict, anonymous: bool) -> None:
    # The API negotiates by Accept only (AcceptOnlyNegotiation): there is no `format` parameter.
    operation["parameters"] = [p for p in operation.get("parameters", []) if p["name"] != "format"]
    operation["security"] = _security(operation.get("security", []), anonymous)
    error = "OpenAIError" if operation["operationId"].startswith("openai_") else "Error"
    error_content = {"application/json": {"schema": {"$ref": f"#/components/schemas/{error}"}}}
    responses = operation["responses"]
    for code in sorted(_error_codes(operation)):
        response = responses.setdefault(code, {"description": ERROR_DESCRIPTIONS[code]})
        response.setdefault("content", error_content)
    for response in responses.values():
        _describe_streams(response.get("content", {}))


def _security(requirements: list, anonymous: bool) -> list:
    security = []
    for requirement in requirements:
        if requirement not in security:
            security.append(requirement)
    if anonymous and {} not in security:
        security.append({})  # anonymous callers are welcome where CHATBOT ALLOW_ANONYMOUS is on
    return security


def _error_codes(operation: dict) -> set[str]:
    """The error statuses an operation can answer, from what it takes and does."""
    parameters = operation["parameters"]
    codes = {"401", "403", "503"}
    if any(p["in"] == "path" for p in parameters):
        codes.add("404")
    if parameters or "requestBody" in operation:
        codes.add("400")
    if "requestBody" in operation:
        codes |= {"413", "415"}
    content_types = {
        media for response in operation["responses"].values() for media in response.get("content", {})
    }
    if content_types & set(STREAM_TYPES):
        codes.add("406")
    if operation["operationId"] in ANSWER_OPERATIONS:
        codes |= {"404", "409", "429", "502", "504"}
    if operation["operationId"] == "api_token_create":
        codes.add("429")
    return codes


def _describe_streams(content: dict) -> None:
    """An SSE response's schema is one event, `{event, id, data}`, as Open API 3.2 reads
    streams; its `data` is JSON text with the schema the view gave for the frames."""
    described = content.get("text/event-stream")
    if described is None or described.get("schema", {}).get("x-sse-event"):
        return
    frame = described.get("schema")
    data = {"type": "string", "contentMediaType": "application/json"}
    if frame:
        data["contentSchema"] = frame
    described["schema"] = {
        "type": "object",
        "x-sse-event": True,
        "properties": {
            "event": {"type": "string", "description": "The event's type (default `message`)."},
            "id": {
                "type": "string",
                "pattern": "^[0-9]+$",
                "description": "The answer's seq: resume after it.",
            },
            "data": data,
            "retry": {"type": "integer"},
        },
        "required": ["data"],
    }
