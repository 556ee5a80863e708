"""Whether abandoned model calls hold every inference thread of an async worker: PURE.

A model call cannot be interrupted (``inference_threads``): past its
InvocationTimeoutSeconds its try fails, but its thread runs on and the worker
takes one entry fewer. When such calls hold every thread the worker could use,
it takes no work at all, and a call that never returns (a deadlock in a custom
handler, a model stuck for good) would keep it so forever while it looked
healthy. This module says what the probes answer then: not ready at once (it
takes nothing: nothing may count it as a worker), and not live once that has
lasted ``live_bound_s`` (the kubelet, or local mode's supervisor, restarts it).
No clock is read here: callers pass times in (monotonic seconds).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

#: The liveness bound's floor, seconds: a short invocation timeout must not turn a
#: model call that is merely slow into a restart loop.
MIN_LIVE_BOUND_S = 60.0
#: The env setting that overrides the bound (``AsyncWorkerSettings.held_threads_liveness_s``).
LIVE_BOUND_ENV = "KUBEINFER_HELD_THREADS_LIVENESS_S"


@dataclass(frozen=True)
class AbandonedCall:
    """A model call whose caller gave up while its thread runs on."""

    #: When its thread began the call.
    started: float
    #: When its caller gave up (its timeout passed, or it was cancelled).
    abandoned: float


@dataclass(frozen=True)
class HeldThreads:
    """Every usable inference thread is held by an abandoned call: the worker takes nothing."""

    held: int
    #: The threads the worker can use at once: fewer held ones leave it taking work.
    usable: int
    #: How long the oldest held call has run, seconds.
    oldest_s: float
    #: How long every usable thread has been held, at least, seconds.
    for_s: float
    live_bound_s: float

    @property
    def live(self) -> bool:
        return self.for_s <= self.live_bound_s

    def describe(self) -> str:
        return (f"all {self.usable} inference thread(s) are held by {self.held} model call(s) "
                f"that outlived their InvocationTimeoutSeconds (the oldest has run "
                f"{self.oldest_s:.0f}s)")

    def not_ready(self) -> str:
        """Readiness's answer: why this worker takes no requests, and what happens next."""
        return (f"Async worker takes no requests: {self.describe()}; a model call cannot be "
                f"interrupted, so it waits for them to return, and its liveness fails "
                f"if they still hold every thread after {self.live_bound_s:g}s "
                f"({LIVE_BOUND_ENV})")

    def not_live(self) -> str:
        """Liveness's answer: why this worker must be restarted."""
        return (f"Async worker is stuck: {self.describe()}, every thread held for "
                f"{self.for_s:.0f}s, over {self.live_bound_s:g}s ({LIVE_BOUND_ENV}): restart "
                "it; a call that never returns is a hang in the model or its handler "
                "(a deadlock, a wait with no timeout)")


def live_bound_s(setting: float | None, invocation_timeout_s: float) -> float:
    """How long every thread may be held before liveness fails: ``setting`` when given,
    else twice the endpoint's invocation timeout (a call held that long past its own
    timeout is not coming back), at least ``MIN_LIVE_BOUND_S``."""
    if setting is not None:
        return setting
    return max(MIN_LIVE_BOUND_S, 2 * invocation_timeout_s)


def assess(calls: Iterable[AbandonedCall], usable: int, now: float,
           bound_s: float) -> HeldThreads | None:
    """``HeldThreads`` when ``calls`` hold at least ``usable`` threads at ``now``, else None.

    Since when is known from the calls still held: the ``usable`` earliest abandoned
    ones have all been held since the last of them was given up on, so the state has
    lasted at least that long (it may have begun earlier, with calls that have since
    returned: counting from here never restarts a worker early).
    """
    held = sorted(calls, key=lambda c: c.abandoned)
    if usable < 1 or len(held) < usable:
        return None
    since = held[usable - 1].abandoned
    oldest = min(c.started for c in held)
    return HeldThreads(held=len(held), usable=usable, oldest_s=max(0.0, now - oldest),
                       for_s=max(0.0, now - since), live_bound_s=bound_s)
