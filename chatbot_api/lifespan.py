"""ASGI lifespan: sweep orphaned answers at start-up, let running ones finish at shutdown."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import threading

from .providers import get_provider
from .streaming.manager import get_manager, sweep_orphans

logger = logging.getLogger("chatbot.lifespan")


def _freeze_startup_objects() -> None:
    """Build the provider (importing its SDK), then move everything alive to the GC's permanent set.

    The hundreds of thousands of objects that imports create never die; left tracked,
    every full collection walks them all, a pause of ~100 ms for every stream
    (docs/benchmarks.md).
    """
    get_provider()
    gc.collect()
    gc.freeze()


def _drain_on_signal(begin_shutdown) -> None:
    """Start draining as soon as the server is told to stop, not when it sends `lifespan.shutdown`.

    The ASGI server (uvicorn, daphne) sends that only after every open response ended, so
    a stream would hold the process until its answer finished. The server's own handler
    of SIGTERM/SIGINT still runs first; ours only adds the drain.
    """
    if threading.current_thread() is not threading.main_thread():
        return  # signals reach the main thread only (a server in a thread: tests)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(signum)
        if not callable(previous):
            continue  # no server handler to add to: leave the default behaviour alone

        def handler(number, frame, previous=previous):
            previous(number, frame)
            loop.call_soon_threadsafe(begin_shutdown)

        signal.signal(signum, handler)


async def _close_provider() -> None:
    """Close the provider's connections once the answers are drained (aiohttp logs an
    unclosed session otherwise, and the model server sees clean closes)."""
    try:
        await get_provider().aclose()
    except Exception:
        logger.warning("closing the provider failed", exc_info=True)


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
                    _drain_on_signal(get_manager().begin_shutdown)
                    _freeze_startup_objects()
                except Exception as exc:  # a start-up failure must be visible, not a hang
                    logger.exception("start-up failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await get_manager().shutdown()
                await _close_provider()
                await send({"type": "lifespan.shutdown.complete"})
                return
