"""How an async request's failure is retried: PURE, takes a clock and a random source.

An outage must not turn into permanent failures, and a bad request must not
be retried. So every failure of one try is put in one of three classes
(:func:`classify`):

======================  =====================================  ==========================
class                   errors                                 what happens
======================  =====================================  ==========================
``TRANSIENT``           object store unreachable or failing    the worker keeps the entry
                        (``ObjectStoreError``: connection,     and tries again after an
                        5xx, credentials), Redis unreachable   exponential backoff with
                        or loading, the model not loaded yet   full jitter; no attempt is
                        (503 ``NotReady``), 429, a webhook     used until the request has
                        that cannot be reached or answers 5xx  failed this way for the
                                                               transient budget
``PERMANENT``           the input is bad: 400 validation       failure object at once
                        (shape, type, JSON), 413 too large,    (attempts 1), no retry:
                        404 missing input, refused input,      the same input fails the
                        424 model error on that input, an      same way
                        S3 bad request on the input, an
                        output name no store can hold
``RETRY``               anything else (500 InternalFailure,    re-queued at once, up to
                        the model timing out)                  ``maxRetries`` times
======================  =====================================  ==========================

A missing input (404) is permanent: the client uploads its input before
naming it, and every S3 store this runs against is read-after-write
consistent, so an input that is not there when a worker reads it will not
appear on a retry minutes later (and a retry would only delay the failure the
client needs to see).

:func:`next_delay` is the backoff (full jitter: uniform in ``[0, min(max,
first * 2**(n-1))]``), :func:`decide` what one transient failure does to the
request, and :class:`Breaker` the worker-wide circuit breaker: after the store
was unreachable, the worker stops taking new entries and probes the store on
the same backoff until it answers, so a queue is not churned through during
an outage.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import StrEnum

from kubeinfer_runtime.errors import (
    ModelError,
    NotReady,
    RuntimeServiceError,
    Throttled,
    ValidationError,
)
from kubeinfer_runtime.queue.objects import StoreUnreachable

#: A random source in [0, 1) (``random.random`` in production, a fixed one in tests).
Rng = Callable[[], float]


class Failure(StrEnum):
    TRANSIENT = "transient"
    PERMANENT = "permanent"
    RETRY = "retry"


class InferenceTimedOut(ModelError):
    """The model did not finish within InvocationTimeoutSeconds (load may be why: retried)."""


class NotificationUndelivered(Exception):
    """The webhook did not take the notification of a finished request.

    ``transient``: it could not be reached or answered 5xx / 429 (an outage);
    otherwise it refused (3xx, 4xx, or a destination the outbound policy refuses).
    ``redelivery``: only the notification was tried (the request had finished
    before), so the try is not an attempt at the request.
    """

    def __init__(self, message: str, *, transient: bool, redelivery: bool) -> None:
        super().__init__(message)
        self.transient = transient
        self.redelivery = redelivery


def _redis_outage(exc: BaseException) -> bool:
    try:
        import redis.exceptions as r
    except ImportError:  # pragma: no cover - redis is a dependency of the runtime
        return False
    return isinstance(exc, (r.ConnectionError, r.TimeoutError, r.ReadOnlyError))


def classify(exc: BaseException) -> Failure:
    """Which class a try's failure is in (see the module's table)."""
    if isinstance(exc, NotificationUndelivered):
        return Failure.TRANSIENT if exc.transient else Failure.RETRY
    if isinstance(exc, InferenceTimedOut):
        return Failure.RETRY
    if isinstance(exc, (ValidationError, ModelError)):
        return Failure.PERMANENT
    if isinstance(exc, (NotReady, Throttled)):
        return Failure.TRANSIENT
    if isinstance(exc, RuntimeServiceError):
        return Failure.RETRY
    if _redis_outage(exc) or isinstance(exc, (ConnectionError, TimeoutError)):
        return Failure.TRANSIENT
    return Failure.RETRY


def trips_breaker(exc: BaseException) -> bool:
    """Whether ``exc`` says the whole store is down (not one object or one bucket)."""
    return isinstance(exc, StoreUnreachable)


def next_delay(attempt: int, first_s: float, max_s: float, rng: Rng) -> float:
    """Wait before retry ``attempt`` (1-based): full jitter below an exponential cap.

    The cap is ``first_s``, ``2*first_s``, ``4*first_s`` ... up to ``max_s``; the
    delay is uniform below it, so workers that failed together do not retry together.
    """
    exponent = min(max(attempt, 1) - 1, 62)
    cap = min(max_s, first_s * 2.0 ** exponent)
    return cap * min(max(rng(), 0.0), 1.0)


@dataclass(frozen=True)
class RetryPolicy:
    #: Seconds a request may fail transiently before those failures use attempts.
    budget_s: float
    first_s: float
    max_s: float
    #: Attempts after the first before a request is dead-lettered.
    max_retries: int


class Action(StrEnum):
    #: Keep the entry, try again after ``delay_s``.
    WAIT = "wait"
    #: Leave the entry pending: it is delivered again after the visibility timeout.
    LEAVE = "leave"


@dataclass(frozen=True)
class Decision:
    action: Action
    delay_s: float
    #: Whether this try used one of the request's attempts (False: it is given back).
    counted: bool
    #: When the request started failing transiently (wall clock), to be remembered.
    transient_since: float
    reason: str


def decide(policy: RetryPolicy, *, now: float, transient_since: float | None, tries: int,
           attempts: int, hold: bool, rng: Rng) -> Decision:
    """What one transient failure does, at wall-clock ``now``.

    ``transient_since``: when the request first failed transiently (None: now);
    ``tries``: transient failures in a row on this worker, this one included (it
    sets the backoff); ``attempts``: the request's counted attempts, this try
    included; ``hold``: keep the entry and wait (store, Redis, model) rather than
    leave it for redelivery (a webhook outage: the worker goes on with other work).

    Within the budget the try is not counted. Past it, each transient try counts,
    so after ``max_retries`` more the request is dead-lettered by the ordinary
    attempts check (which still needs the store, to write the failure object).
    """
    since = now if transient_since is None else min(transient_since, now)
    spent = now - since
    counted = spent >= policy.budget_s
    delay = next_delay(tries, policy.first_s, policy.max_s, rng)
    if counted:
        reason = (f"failing for {spent:.0f}s, past the transient budget of "
                  f"{policy.budget_s:g}s: attempt {attempts} of {policy.max_retries + 1} used")
    else:
        reason = (f"attempt not counted (failing for {spent:.0f}s of the "
                  f"{policy.budget_s:g}s transient budget)")
    return Decision(action=Action.WAIT if hold else Action.LEAVE, delay_s=delay,
                    counted=counted, transient_since=since, reason=reason)


@dataclass(frozen=True)
class Breaker:
    """The worker's circuit breaker on the object store (monotonic clock).

    Closed: entries are read as usual. Open (``opened_at`` set): nothing new is
    read or reclaimed; at ``probe_at`` the worker probes the store, and closes
    the breaker when it answers. ``streak`` counts openings since a request last
    succeeded, so a store that answers probes but fails requests (flapping) is
    probed less and less often rather than in a tight loop.
    """

    opened_at: float | None = None
    probe_at: float = 0.0
    probes: int = 0
    streak: int = 0

    @property
    def is_open(self) -> bool:
        return self.opened_at is not None

    def probe_due(self, now: float) -> bool:
        return self.is_open and now >= self.probe_at


def trip(b: Breaker, policy: RetryPolicy, now: float, rng: Rng) -> Breaker:
    """A request found the store unreachable: open (an open breaker stays as it is)."""
    if b.is_open:
        return b
    streak = b.streak + 1
    return Breaker(opened_at=now, probes=0, streak=streak,
                   probe_at=now + next_delay(streak, policy.first_s, policy.max_s, rng))


def probed(b: Breaker, ok: bool, policy: RetryPolicy, now: float, rng: Rng) -> Breaker:
    """After a probe: closed when it answered, else the next probe further out."""
    if ok:
        return Breaker(streak=b.streak)
    probes = b.probes + 1
    delay = next_delay(b.streak + probes, policy.first_s, policy.max_s, rng)
    return replace(b, probes=probes, probe_at=now + delay)


def succeeded(b: Breaker) -> Breaker:
    """A request went through: closed, and the flapping streak forgotten."""
    return Breaker()
