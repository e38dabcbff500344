"""ASGI lifespan: sweep orphaned answers at start-up, let running ones finish at shutdown."""

from __future__ import annotations

import logging

from .generation import get_manager, sweep_orphans

logger = logging.getLogger("chatbot.lifespan")


class LifespanMiddleware:
    """Handles `lifespan` scopes (Django does not) and passes everything else through."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "lifespan":
            return await self.app(scope, receive, send)
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await sweep_orphans()
                    get_manager().ensure_housekeeping()
                except Exception as exc:  # a start-up failure must be visible, not a hang
                    logger.exception("start-up failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await get_manager().shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return
