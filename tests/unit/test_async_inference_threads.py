"""The async worker's inference threads: a call that outlives its timeout keeps its thread
(a model call cannot be interrupted) and is counted as an orphan until it returns; the
next call waits for a free thread without its own timeout running meanwhile."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from kubeinfer_runtime.queue.inference_threads import InferenceThreads


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=1) as executor:
        yield executor


async def test_a_call_that_outlives_its_timeout_holds_its_thread_not_the_next_call(
        pool: ThreadPoolExecutor) -> None:
    threads = InferenceThreads(pool, 1)
    release = threading.Event()

    def stuck() -> str:
        release.wait(10)
        return "late"

    before = time.monotonic()
    with pytest.raises(TimeoutError):
        await threads.run(0.05, stuck)
    assert threads.orphans == 1  # its thread still runs the model
    # Kept with its times, for the probes (``held_threads``): given up on after its 0.05 s.
    [call] = threads.abandoned()
    assert before <= call.started and call.abandoned - call.started >= 0.04

    # The next call waits for the thread, and only then its 0.5 s start: an executor
    # would have run its timeout while it queued behind the stuck call.
    next_call = asyncio.create_task(threads.run(0.5, lambda: "on time"))
    await asyncio.sleep(0.8)  # longer than its timeout, spent waiting for a thread
    assert not next_call.done()
    release.set()
    assert await next_call == "on time"
    assert threads.orphans == 0 and threads.abandoned() == []


async def test_a_failing_call_is_raised_and_an_abandoned_one_is_not_logged(
        pool: ThreadPoolExecutor, caplog: pytest.LogCaptureFixture) -> None:
    threads = InferenceThreads(pool, 1)

    def boom() -> None:
        raise ValueError("bad input")

    with pytest.raises(ValueError, match="bad input"):
        await threads.run(5, boom)

    def slow_boom() -> None:
        time.sleep(0.2)
        raise ValueError("late failure")

    with pytest.raises(TimeoutError):
        await threads.run(0.01, slow_boom)
    assert await threads.run(5, lambda: 1) == 1  # waited for the abandoned call's thread
    assert threads.orphans == 0
    assert "never retrieved" not in caplog.text
