"""A strict Content-Security-Policy for the chat's pages.

Scripts only from this site (the vendored libraries and the page's own modules) plus the
one inline import map, by nonce; styles from this site; connections to this site,
WebSocket included; nothing framed, no plugins, no base-URL or form-target tricks. An
answer's Markdown is sanitised anyway (DOMPurify); this is the second line should that
ever fail. A site whose BASE_TEMPLATE carries inline scripts of its own sets
CHATBOT["CONTENT_SECURITY_POLICY"] to False and sends its own policy.
"""

from __future__ import annotations

import secrets
from functools import wraps

from chatbot_api.conf import chatbot_setting

NONCE_BYTES = 16


def policy(request) -> str:
    host = request.get_host()
    sockets = f"wss://{host}" if request.is_secure() else f"ws://{host} wss://{host}"
    return "; ".join(
        [
            "default-src 'none'",
            f"script-src 'self' 'nonce-{request.csp_nonce}'",
            "style-src 'self'",
            "img-src 'self' data:",
            "font-src 'self'",
            f"connect-src 'self' {sockets}",
            "base-uri 'none'",
            "form-action 'self'",
            "frame-ancestors 'none'",
        ]
    )


def content_security_policy(view):
    """Give the request a nonce for its template (`request.csp_nonce`) and the response the policy."""

    @wraps(view)
    def with_policy(request, *args, **kwargs):
        request.csp_nonce = secrets.token_urlsafe(NONCE_BYTES)
        response = view(request, *args, **kwargs)
        if chatbot_setting("CONTENT_SECURITY_POLICY") and "Content-Security-Policy" not in response:
            response["Content-Security-Policy"] = policy(request)
        return response

    return with_policy
