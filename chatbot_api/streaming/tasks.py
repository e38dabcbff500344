"""Tasks that outlive the request that started them."""

from __future__ import annotations

import asyncio
import contextvars


def detached_task(coroutine, *, name: str) -> asyncio.Task:
    """A task that outlives the request that started it.

    It runs in an empty context: a request's context carries asgiref's per-request
    thread executor, which shuts down when the response ends, and database calls
    made from it afterwards would fail.
    """
    return asyncio.get_running_loop().create_task(coroutine, name=name, context=contextvars.Context())
