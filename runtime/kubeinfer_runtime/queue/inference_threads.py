"""The async worker's inference threads, counted until the thread is free, not the request.

A model call cannot be interrupted: when a request's InvocationTimeoutSeconds
passes, its try gives up but its thread runs on until the model returns. Waited
on through a plain executor, the next try (or any other request) then queued
behind that thread inside the executor, its own timeout running while it
waited, so one caller sending inputs that outlast a short timeout could make
every other request time out too. Here a call first waits for a thread that is
really free (that wait is not the request's time: its timeout starts when its
thread does), and the threads still busy with calls nobody waits for any more
are counted (``orphans``), so the worker takes no new entries for them and
leaves them to replicas that can run them. When they hold every thread for good
(a model call that never returns), the worker's probes fail (``held_threads``),
so each abandoned call is kept with when it started and was given up on.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import itertools
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from kubeinfer_runtime.queue.held_threads import AbandonedCall

T = TypeVar("T")


class InferenceThreads:
    """``threads`` model calls at a time on ``pool``, each bounded by its own timeout."""

    def __init__(self, pool: ThreadPoolExecutor, threads: int) -> None:
        self.pool = pool
        self._free = asyncio.Semaphore(threads)
        #: Calls whose caller gave up (timed out or was cancelled) still on a thread.
        self._abandoned: dict[int, AbandonedCall] = {}
        self._calls = itertools.count()

    @property
    def orphans(self) -> int:
        """Threads still busy with calls nobody waits for any more."""
        return len(self._abandoned)

    def abandoned(self) -> list[AbandonedCall]:
        """The calls behind ``orphans``, with when each started and was given up on."""
        return list(self._abandoned.values())

    async def run(self, limit_s: float, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` on a free thread; TimeoutError once it ran ``limit_s`` seconds
        (the thread is counted busy until ``fn`` returns)."""
        await self._free.acquire()
        loop = asyncio.get_running_loop()
        call = functools.partial(contextvars.copy_context().run, fn, *args)
        try:
            future: Future[T] = self.pool.submit(call)
        except BaseException:
            self._free.release()
            raise
        # A thread was free (the semaphore): the call starts now.
        started = time.monotonic()
        key = next(self._calls)

        def done(_: Future[T]) -> None:
            # On the pool's thread: back to the loop, which owns the counts.
            loop.call_soon_threadsafe(self._thread_done, key)

        future.add_done_callback(done)
        result = asyncio.wrap_future(future)
        # Read by nobody once its caller gave up: retrieved here, so it is not logged as
        # an exception never retrieved (the try already failed for its timeout).
        result.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            return await asyncio.wait_for(asyncio.shield(result), limit_s)
        except BaseException:
            # ``_thread_done`` runs on this loop, so after this: it forgets the call.
            if not future.done():
                self._abandoned[key] = AbandonedCall(started, time.monotonic())
            raise

    def _thread_done(self, key: int) -> None:
        self._abandoned.pop(key, None)
        self._free.release()
