"""When abandoned model calls hold every usable inference thread, the async worker takes no
work: readiness fails at once, liveness once that outlasted its bound (``held_threads``)."""

from __future__ import annotations

import pytest

from kubeinfer_runtime.contract import AsyncWorkerSettings
from kubeinfer_runtime.queue.held_threads import AbandonedCall, assess, live_bound_s


def _call(started: float, abandoned: float) -> AbandonedCall:
    return AbandonedCall(started=started, abandoned=abandoned)


def test_fewer_held_calls_than_usable_threads_leave_the_worker_taking_work() -> None:
    assert assess([], 1, now=100.0, bound_s=60.0) is None
    assert assess([_call(0.0, 10.0)], 2, now=1000.0, bound_s=60.0) is None


def test_every_usable_thread_held_is_not_ready_then_not_live_past_the_bound() -> None:
    calls = [_call(5.0, 15.0), _call(0.0, 10.0)]
    held = assess(calls, 2, now=40.0, bound_s=60.0)
    assert held is not None
    # Held since the second abandonment; the oldest call started at 0.
    assert (held.held, held.usable, held.oldest_s, held.for_s) == (2, 2, 40.0, 25.0)
    assert held.live
    assert held.not_ready() == (
        "Async worker takes no requests: all 2 inference thread(s) are held by 2 model "
        "call(s) that outlived their InvocationTimeoutSeconds (the oldest has run 40s); a "
        "model call cannot be interrupted, so it waits for them to return, and its liveness "
        "fails if they still hold every thread after 60s (KUBEINFER_HELD_THREADS_LIVENESS_S)")
    assert assess(calls, 2, now=75.0, bound_s=60.0).live  # type: ignore[union-attr]
    stuck = assess(calls, 2, now=80.0, bound_s=60.0)
    assert stuck is not None and not stuck.live
    assert stuck.not_live().startswith(
        "Async worker is stuck: all 2 inference thread(s) are held by 2 model call(s) that "
        "outlived their InvocationTimeoutSeconds (the oldest has run 80s), every thread held "
        "for 65s, over 60s (KUBEINFER_HELD_THREADS_LIVENESS_S): restart it")


def test_the_state_counts_from_when_the_calls_still_held_all_were() -> None:
    """One usable thread: held since the earliest call still held was given up on; more
    held calls than usable threads (a lower concurrency) do not restart the clock."""
    calls = [_call(0.0, 10.0), _call(20.0, 30.0), _call(40.0, 50.0)]
    held = assess(calls, 1, now=100.0, bound_s=60.0)
    assert held is not None and (held.held, held.for_s, held.oldest_s) == (3, 90.0, 100.0)
    held = assess(calls, 2, now=100.0, bound_s=60.0)
    assert held is not None and held.for_s == 70.0 and not held.live


def test_no_usable_thread_never_counts_as_held() -> None:
    assert assess([_call(0.0, 1.0)], 0, now=10.0, bound_s=1.0) is None


@pytest.mark.parametrize(("setting", "timeout", "bound"), [
    (None, 900.0, 1800.0),  # twice the endpoint's invocation timeout
    (None, 10.0, 60.0),  # never under a minute
    (5.0, 900.0, 5.0),  # the setting wins
])
def test_the_liveness_bound(setting: float | None, timeout: float, bound: float) -> None:
    assert live_bound_s(setting, timeout) == bound


def test_the_bound_is_a_kubeinfer_env_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"KUBEINFER_MODEL_URI": "file:///m.onnx", "KUBEINFER_REDIS_URL": "redis://r:6379/0",
           "KUBEINFER_QUEUE": "q", "KUBEINFER_OUTPUT_PATH": "s3://b/out",
           "KUBEINFER_FAILURE_PATH": "s3://b/failed"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert AsyncWorkerSettings.from_env().held_threads_liveness_s is None
    monkeypatch.setenv("KUBEINFER_HELD_THREADS_LIVENESS_S", "2.5")
    assert AsyncWorkerSettings.from_env().held_threads_liveness_s == 2.5
    monkeypatch.setenv("KUBEINFER_HELD_THREADS_LIVENESS_S", "0")
    with pytest.raises(ValueError, match="held_threads_liveness_s"):
        AsyncWorkerSettings.from_env()
