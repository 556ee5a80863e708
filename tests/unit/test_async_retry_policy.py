"""The async retry policy, step by step: classes of failures, backoff, budget, breaker;
and which class the object store's refusals fall in (a fake minio client, a real file
system)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import redis.exceptions
from minio.error import S3Error

from kubeinfer_runtime.contract import S3Settings
from kubeinfer_runtime.errors import (
    Internal,
    ModelError,
    NotReady,
    PayloadTooLarge,
    Throttled,
    ValidationError,
)
from kubeinfer_runtime.queue import objects
from kubeinfer_runtime.queue.objects import (
    InputNotFound,
    InputRefused,
    InputTooLarge,
    LocationRefused,
    ObjectStore,
    ObjectStoreError,
    StoreUnreachable,
)
from kubeinfer_runtime.queue.retry_policy import (
    Action,
    Breaker,
    Failure,
    InferenceTimedOut,
    NotificationUndelivered,
    RetryPolicy,
    classify,
    decide,
    next_delay,
    probed,
    succeeded,
    trip,
    trips_breaker,
)

POLICY = RetryPolicy(budget_s=600, first_s=1.0, max_s=30.0, max_retries=3)


def top(value: float = 1.0) -> float:
    """A 'random' source always at the top of its range (the cap itself)."""
    return value


@pytest.mark.parametrize(("error", "expected"), [
    # The store or a dependency is down: back off, no attempt used.
    (StoreUnreachable("connection refused"), Failure.TRANSIENT),
    (ObjectStoreError("AccessDenied"), Failure.TRANSIENT),
    (NotReady("model loading"), Failure.TRANSIENT),
    (Throttled("busy"), Failure.TRANSIENT),
    (redis.exceptions.ConnectionError("refused"), Failure.TRANSIENT),
    (redis.exceptions.BusyLoadingError("LOADING"), Failure.TRANSIENT),
    (redis.exceptions.TimeoutError("slow"), Failure.TRANSIENT),
    (ConnectionResetError(), Failure.TRANSIENT),
    (NotificationUndelivered("503", transient=True, redelivery=True), Failure.TRANSIENT),
    # The request is bad: the same input fails the same way.
    (ValidationError("wrong shape"), Failure.PERMANENT),
    (PayloadTooLarge("too big"), Failure.PERMANENT),
    (InputNotFound("no such key"), Failure.PERMANENT),
    (InputTooLarge("over maxInputBytes"), Failure.PERMANENT),
    (InputRefused("a FIFO"), Failure.PERMANENT),
    (LocationRefused("a name too long"), Failure.PERMANENT),
    (ModelError("model raised"), Failure.PERMANENT),
    # Unknown: counted retries, as before.
    (InferenceTimedOut("slow model"), Failure.RETRY),
    (Internal("bug"), Failure.RETRY),
    (RuntimeError("?"), Failure.RETRY),
    (redis.exceptions.ResponseError("WRONGTYPE"), Failure.RETRY),
    (NotificationUndelivered("404", transient=False, redelivery=True), Failure.RETRY),
])
def test_classify(error: BaseException, expected: Failure) -> None:
    assert classify(error) is expected


def test_only_an_unreachable_store_trips_the_breaker() -> None:
    assert trips_breaker(StoreUnreachable("refused"))
    assert not trips_breaker(ObjectStoreError("AccessDenied on one bucket"))
    assert not trips_breaker(redis.exceptions.ConnectionError("refused"))


def test_next_delay_doubles_to_the_cap_with_full_jitter() -> None:
    caps = [next_delay(n, 1.0, 30.0, top) for n in range(1, 8)]
    assert caps == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert next_delay(3, 1.0, 30.0, lambda: 0.5) == 2.0
    assert next_delay(3, 1.0, 30.0, lambda: 0.0) == 0.0
    assert next_delay(10_000, 1.0, 30.0, top) == 30.0  # no overflow
    assert next_delay(0, 1.0, 30.0, top) == 1.0


def test_within_the_budget_transient_failures_use_no_attempt() -> None:
    now = 1_000_000.0
    d = decide(POLICY, now=now, transient_since=None, tries=1, attempts=1, hold=True, rng=top)
    assert d.action is Action.WAIT and not d.counted
    assert d.transient_since == now and d.delay_s == 1.0
    assert "not counted" in d.reason and "0s of the 600s" in d.reason
    # Ten minutes minus a second later, still free; the backoff is at its cap.
    d = decide(POLICY, now=now + 599, transient_since=d.transient_since, tries=9, attempts=1,
               hold=True, rng=top)
    assert not d.counted and d.delay_s == 30.0 and d.transient_since == now


def test_past_the_budget_each_transient_failure_counts() -> None:
    since = 1_000_000.0
    d = decide(POLICY, now=since + 600, transient_since=since, tries=20, attempts=2, hold=True,
               rng=top)
    assert d.action is Action.WAIT and d.counted
    assert "past the transient budget of 600s: attempt 2 of 4 used" in d.reason


def test_a_budget_from_another_worker_survives() -> None:
    """transient_since comes from the id hash: a reclaimed request keeps its clock."""
    d = decide(POLICY, now=5000.0, transient_since=4000.0, tries=1, attempts=1, hold=True,
               rng=top)
    assert d.counted and d.transient_since == 4000.0
    # A clock that went backwards never makes the budget negative.
    d = decide(POLICY, now=3000.0, transient_since=4000.0, tries=1, attempts=1, hold=True,
               rng=top)
    assert not d.counted and d.transient_since == 3000.0


def test_a_zero_budget_counts_every_failure() -> None:
    policy = RetryPolicy(budget_s=0, first_s=1.0, max_s=30.0, max_retries=3)
    d = decide(policy, now=10.0, transient_since=None, tries=1, attempts=1, hold=True, rng=top)
    assert d.counted


def test_an_undelivered_notification_is_left_for_redelivery() -> None:
    d = decide(POLICY, now=10.0, transient_since=None, tries=1, attempts=1, hold=False,
               rng=top)
    assert d.action is Action.LEAVE and not d.counted


def test_breaker_opens_probes_on_backoff_and_closes() -> None:
    t = 100.0
    b = trip(Breaker(), POLICY, t, top)
    assert b.is_open and b.opened_at == t and b.probe_at == t + 1.0
    assert not b.probe_due(t + 0.5) and b.probe_due(t + 1.0)
    # Tripping an open breaker changes nothing (several tasks fail at once).
    assert trip(b, POLICY, t + 0.9, top) == b
    b = probed(b, False, POLICY, t + 1.0, top)
    assert b.is_open and b.probes == 1 and b.probe_at == t + 1.0 + 2.0
    b = probed(b, False, POLICY, t + 3.0, top)
    assert b.probe_at == t + 3.0 + 4.0
    for _ in range(10):
        b = probed(b, False, POLICY, t + 7.0, top)
    assert b.probe_at == t + 7.0 + 30.0  # capped
    closed = probed(b, True, POLICY, t + 40.0, top)
    assert not closed.is_open and closed.streak == 1


def test_a_flapping_store_is_probed_less_and_less_often() -> None:
    """Probes succeed but requests fail: each new opening starts further out, until a
    request goes through."""
    b = Breaker()
    firsts = []
    for i in range(6):
        b = trip(b, POLICY, float(i * 100), top)
        firsts.append(b.probe_at - i * 100)
        b = probed(b, True, POLICY, float(i * 100 + 50), top)
    assert firsts == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0]
    b = succeeded(b)
    assert trip(b, POLICY, 0.0, top).probe_at == 1.0


class _Refusing:
    """A minio client whose every call is answered with one S3 error code."""

    def __init__(self, code: str, status: int = 400) -> None:
        self.code = code
        self.status = status

    def _error(self) -> S3Error:
        response: Any = type("Response", (), {"status": self.status, "headers": {}})()
        return S3Error(response, self.code, "refused", "/b/k", "req-1", "host-1")

    def get_object(self, bucket: str, key: str) -> Any:
        raise self._error()

    def put_object(self, *args: Any, **kwargs: Any) -> Any:
        raise self._error()


def _store(monkeypatch: pytest.MonkeyPatch, code: str, status: int = 400) -> ObjectStore:
    monkeypatch.setattr(objects, "s3_client", lambda s3, maxsize: _Refusing(code, status))
    return ObjectStore(S3Settings(endpoint_url="http://s3.invalid"))


@pytest.mark.parametrize("code", ["KeyTooLongError", "InvalidArgument", "InvalidRequest",
                                  "InvalidObjectState", "InvalidObjectName"])
def test_an_input_s3_refuses_as_a_bad_request_fails_at_once(monkeypatch: pytest.MonkeyPatch,
                                                            code: str) -> None:
    """One bad request must not hold a worker slot for the transient budget."""
    with pytest.raises(InputRefused) as info:
        _store(monkeypatch, code).read("s3://b/in/x.json")
    assert classify(info.value) is Failure.PERMANENT and not trips_breaker(info.value)
    assert code in info.value.message and info.value.status == 400
    assert info.value.message[0].isupper() and not info.value.message.endswith(".")


def test_a_refusal_that_can_be_fixed_stays_transient(monkeypatch: pytest.MonkeyPatch) -> None:
    """Credentials and bucket policies get fixed: AccessDenied is waited out, on purpose."""
    with pytest.raises(ObjectStoreError) as denied:
        _store(monkeypatch, "AccessDenied", 403).read("s3://b/in/x.json")
    assert classify(denied.value) is Failure.TRANSIENT and not trips_breaker(denied.value)
    with pytest.raises(StoreUnreachable):
        _store(monkeypatch, "SlowDown", 503).read("s3://b/in/x.json")
    with pytest.raises(InputNotFound):
        _store(monkeypatch, "NoSuchKey", 404).read("s3://b/in/x.json")
    with pytest.raises(ObjectStoreError) as denied:
        _store(monkeypatch, "AccessDenied", 403).write("s3://b/out/x.out", b"{}", "")
    assert classify(denied.value) is Failure.TRANSIENT


def test_a_name_no_store_can_hold_is_a_permanent_write_failure(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A file:// folder name over 255 bytes (ENAMETOOLONG) or a key S3 calls too long
    fails the same way on every try: permanent, so it cannot loop as an outage would."""
    store = ObjectStore(S3Settings())
    long = f"file://{tmp_path}/out/{'a' * 300}/id-1.out"
    with pytest.raises(LocationRefused) as info:
        store.write(long, b"{}", "application/json")
    assert classify(info.value) is Failure.PERMANENT and not trips_breaker(info.value)
    assert "at most 255 bytes" in info.value.message
    name = f"file://{tmp_path}/out/{'b' * 300}"
    (tmp_path / "out").mkdir(exist_ok=True)
    with pytest.raises(LocationRefused):  # the last segment too long: no temp file left
        store.write(name, b"{}", "application/json")
    assert list((tmp_path / "out").iterdir()) == []
    with pytest.raises(LocationRefused) as info:
        _store(monkeypatch, "KeyTooLongError").write("s3://b/out/x.out", b"{}", "")
    assert classify(info.value) is Failure.PERMANENT
