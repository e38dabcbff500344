"""A time limit on waits that moves on every event, at the cost of a float per move.

`asyncio.timeout()` around each wait arms and cancels a timer per token, for every
generation (its idle limit) and every reader (its keep-alive): ~4% of a relayed
token's CPU, and its context manager another ~3%. A `Deadline` keeps one timer per
owner; moving the deadline only stores the new time, and the timer, when it fires
before that time, arms itself again for it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


class Deadline:
    """`await deadline.wait(x)`: `x`, or `TimeoutError` once the loop's time reaches `when`.

    `when` is in the running loop's clock (`loop.time()`); None means no limit. Only
    the wait in progress is cut: a deadline that passes between waits fails the next
    one at once. Used as a context manager (or `close()`d) so its timer goes with it.
    """

    __slots__ = ("_armed_at", "_expiring", "_loop", "_timer", "_waiter", "when")

    def __init__(self, when: float | None = None):
        self._loop = asyncio.get_running_loop()
        self._waiter: asyncio.Task | None = None  # the task whose wait is in progress
        self._expiring = False  # the timer cancelled that wait
        self._timer: asyncio.TimerHandle | None = None
        self._armed_at = 0.0
        self.when = None
        self.move(when)

    def move(self, when: float | None) -> None:
        """Set the limit; later than before costs nothing, earlier re-arms the timer."""
        self.when = when
        if when is None:
            return
        if self._timer is None:
            self._arm(when)
        elif when < self._armed_at:
            self._timer.cancel()
            self._arm(when)

    async def wait(self, awaitable: Awaitable[T]) -> T:
        if self.when is not None and self._loop.time() >= self.when:
            if asyncio.iscoroutine(awaitable):
                awaitable.close()  # never awaited: no "coroutine was never awaited" warning
            raise TimeoutError
        # What asyncio.timeout() does (3.11), without an object and a context per wait: the timer
        # cancels the waiting task, and a cancellation that was only ours becomes TimeoutError.
        task = asyncio.current_task()
        self._waiter = task
        try:
            return await awaitable
        except asyncio.CancelledError:
            if self._expiring:
                self._expiring = False
                if task.uncancel() == 0:
                    raise TimeoutError from None
            raise
        finally:
            self._waiter = None
            if self._expiring:  # the wait ended another way before our cancellation landed
                self._expiring = False
                task.uncancel()

    def __enter__(self) -> Deadline:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm(self, when: float) -> None:
        self._armed_at = when
        self._timer = self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._timer = None
        when = self.when
        if when is None:
            return
        if self._loop.time() < when:
            self._arm(when)  # moved on since it was armed
        elif self._waiter is not None and not self._expiring:
            self._expiring = True  # expire the wait in progress now
            self._waiter.cancel()
