"""`Deadline`: the time limit a generation and a reader move on every event (one timer each)."""

from __future__ import annotations

import asyncio

import pytest

from chatbot_api.streaming.deadline import Deadline


def later(seconds: float) -> float:
    return asyncio.get_running_loop().time() + seconds


async def value_after(seconds: float, value="chunk"):
    await asyncio.sleep(seconds)
    return value


async def test_a_wait_within_the_deadline_returns_its_value():
    with Deadline(later(1.0)) as deadline:
        assert await deadline.wait(value_after(0.01)) == "chunk"


async def test_a_wait_past_the_deadline_raises_timeout_error():
    loop = asyncio.get_running_loop()
    with Deadline(later(0.05)) as deadline:
        began = loop.time()
        with pytest.raises(TimeoutError):
            await deadline.wait(value_after(5))
        assert loop.time() - began < 2, "cut at the deadline, not when the wait would have ended"


async def test_moving_the_deadline_later_keeps_a_wait_going_past_the_old_one():
    with Deadline(later(0.05)) as deadline:
        deadline.move(later(2.0))
        assert await deadline.wait(value_after(0.3)) == "chunk"


async def test_moving_the_deadline_earlier_cuts_sooner():
    loop = asyncio.get_running_loop()
    with Deadline(later(10.0)) as deadline:
        deadline.move(later(0.05))
        began = loop.time()
        with pytest.raises(TimeoutError):
            await deadline.wait(value_after(5))
        assert loop.time() - began < 2


async def test_a_deadline_that_passed_between_waits_fails_the_next_one_at_once():
    with Deadline(later(0.02)) as deadline:
        await asyncio.sleep(0.1)  # not waiting: nothing to cut, the timer fired for nothing
        waited = value_after(0)
        with pytest.raises(TimeoutError):
            await deadline.wait(waited)
        assert waited.cr_frame is None, "the coroutine it was given is closed, not left pending"


async def test_only_the_wait_is_cut_not_the_code_between_waits():
    with Deadline(later(0.05)) as deadline:
        assert await deadline.wait(value_after(0)) == "chunk"
        await asyncio.sleep(0.2)  # past the deadline, outside a wait: no cancellation here
        deadline.move(later(1.0))
        assert await deadline.wait(value_after(0.01)) == "chunk"


async def test_no_limit_waits_as_long_as_it_takes():
    with Deadline(None) as deadline:
        assert await deadline.wait(value_after(0.05)) == "chunk"
        deadline.move(later(0.05))
        with pytest.raises(TimeoutError):
            await deadline.wait(value_after(5))


async def test_a_cancellation_from_outside_stays_a_cancellation():
    async def reader(deadline: Deadline):
        return await deadline.wait(value_after(5))

    with Deadline(later(5.0)) as deadline:
        task = asyncio.create_task(reader(deadline))
        await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_closing_cancels_its_timer():
    deadline = Deadline(later(60))
    timer = deadline._timer
    deadline.close()
    assert timer is not None and timer.cancelled()


async def test_a_wait_that_ends_as_the_deadline_fires_leaves_no_cancellation_behind():
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    when = later(0.05)
    loop.call_at(when, done.set_result, "chunk")  # runs first, in the timer's own loop iteration
    with Deadline(when) as deadline:
        try:
            assert await deadline.wait(done) == "chunk"
        except TimeoutError:
            pass  # also right: the limit was reached as the value came (asyncio.timeout does the same)
        await asyncio.sleep(0.01)  # the task is not left with a cancellation of ours pending
        assert asyncio.current_task().cancelling() == 0


async def test_an_outside_cancellation_during_an_expiring_wait_stays_a_cancellation():
    async def reader(deadline: Deadline):
        return await deadline.wait(value_after(5))

    loop = asyncio.get_running_loop()
    when = later(0.05)
    with Deadline(when) as deadline:  # its timer goes first at `when`...
        task = asyncio.create_task(reader(deadline))
        loop.call_at(when, task.cancel)  # ...then someone else's cancellation, before the reader runs
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_a_wait_that_fails_otherwise_after_expiry_keeps_its_error_and_no_cancellation():
    async def fails_on_cancel():
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            raise ValueError("cleanup failed") from None

    with Deadline(later(0.05)) as deadline:
        with pytest.raises(ValueError, match="cleanup failed"):
            await deadline.wait(fails_on_cancel())
        assert asyncio.current_task().cancelling() == 0
        await asyncio.sleep(0.01)  # no cancellation of ours left pending on the task
