"""Admission at the gateway: a bounded number in flight, a bounded wait, 429 beyond.

Without it a burst is forwarded whole: with a slow model every request queues
at the model server and all of them get slow, by seconds, while the gateway
holds their bodies. With it, a real-time variant keeps in flight only as many
requests as its model servers can finish within ``target_latency_s`` (Little's
law: limit = service rate x target latency, never fewer than
``floor_per_upstream`` per ready model server; or a fixed number per model
server when the variant sets one). The service rate is measured per finished
request as (requests in flight when it started) / (its latency): the rate
the model servers are finishing work while they hold that much, whether the
traffic is light or heavy. The next requests wait in a first-in first-out
line, but only while the wait they can expect (their place in line over the
service rate) stays under ``max_wait_s`` and
the line under its count and byte bounds; anything else is answered 429
ThrottlingException at once (boto3 retries it with backoff), and a waiter not
served within ``max_wait_s`` gets the same.

The limit follows the measured rate both ways: fast models (thousands a
second) get a limit no burst reaches, so nothing is refused while the model
servers keep up (refusing would only burn the gateway's CPU on answers that
closed-loop clients retry at once); slow ones settle where admitted requests
spend about ``target_latency_s`` at the model server.

``decide`` and ``in_flight_limit`` are the pure rules, unit-tested;
``VariantGate`` keeps one variant's counters on the event loop (single
threaded: no locks).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from kubeinfer_runtime.errors import Throttled

#: The adaptive limit never goes above this (a sanity bound on a wild measurement).
MAX_IN_FLIGHT = 100_000
#: Weight of the newest request in the service-rate average.
RATE_ALPHA = 0.05


class Admission(Enum):
    GO = "go"
    WAIT = "wait"
    SHED = "shed"


@dataclass(frozen=True)
class ShedPolicy:
    """The bounds of one variant (gateway defaults, or the variant's own)."""

    #: Adaptive limit: requests in flight so that each finishes within this, seconds.
    target_latency_s: float
    #: Adaptive limit: never fewer in flight than this per ready model server.
    floor_per_upstream: int
    #: Longest a request may wait for its turn, seconds.
    max_wait_s: float
    #: Waiting requests per ready model server.
    queue_per_upstream: int
    #: Bodies held by the waiting requests of one variant, bytes.
    max_queue_bytes: int
    #: A fixed limit per ready model server instead of the adaptive one (None: adaptive).
    fixed_per_upstream: int | None = None


def in_flight_limit(policy: ShedPolicy, upstreams: int, rate: float) -> int:
    """How many requests may be in flight now (PURE). ``rate``: the service rate,
    requests per second (0: not measured yet)."""
    ups = max(1, upstreams)
    if policy.fixed_per_upstream is not None:
        return ups * policy.fixed_per_upstream
    adaptive = min(MAX_IN_FLIGHT, math.ceil(rate * policy.target_latency_s))
    return max(ups * policy.floor_per_upstream, adaptive)


def decide(policy: ShedPolicy, upstreams: int, in_flight: int, queued: int,
           queued_bytes: int, body_bytes: int, rate: float) -> Admission:
    """Go now, wait for a slot, or be refused (PURE).

    A newcomer behind ``queued`` others can expect to wait about ``(queued + 1) /
    rate`` seconds (unknown while nothing has finished: then only the line's
    bounds and the wait's timer apply).
    """
    if in_flight < in_flight_limit(policy, upstreams, rate) and queued == 0:
        return Admission.GO
    if queued >= max(1, upstreams) * policy.queue_per_upstream:
        return Admission.SHED
    if queued_bytes + body_bytes > policy.max_queue_bytes:
        return Admission.SHED
    if rate > 0 and (queued + 1) / rate > policy.max_wait_s:
        return Admission.SHED
    return Admission.WAIT


@dataclass(frozen=True)
class Ticket:
    """A slot held: when it was taken, and how many were in flight with it."""

    started: float
    in_flight: int


class VariantGate:
    """One variant's slots, waiting line and service rate."""

    def __init__(self, endpoint: str, variant: str,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.endpoint = endpoint
        self.variant = variant
        self.clock = clock
        self.in_flight = 0
        self.waiters: deque[tuple[asyncio.Future[None], int]] = deque()
        self.queued_bytes = 0
        #: Service rate, requests per second (0 until a request finished).
        self.rate = 0.0

    def _throttled(self, why: str) -> Throttled:
        return Throttled(f'Variant "{self.variant}" of endpoint "{self.endpoint}" is at '
                         f"capacity ({why}): retry with backoff, add replicas, or raise the "
                         "variant's admission limits")

    def limit(self, policy: ShedPolicy, upstreams: int) -> int:
        return in_flight_limit(policy, upstreams, self.rate)

    def _take(self) -> Ticket:
        self.in_flight += 1
        return Ticket(self.clock(), self.in_flight)

    async def enter(self, policy: ShedPolicy, upstreams: int,
                    body_bytes: int) -> Ticket | Throttled:
        """Take a slot (a ticket for ``leave``), waiting if allowed; else the 429 to answer."""
        verdict = decide(policy, upstreams, self.in_flight, len(self.waiters),
                         self.queued_bytes, body_bytes, self.rate)
        if verdict is Admission.GO:
            return self._take()
        if verdict is Admission.SHED:
            return self._throttled(f"{self.in_flight} in flight, {len(self.waiters)} waiting")
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (waiter, body_bytes)
        self.waiters.append(entry)
        self.queued_bytes += body_bytes
        try:
            await asyncio.wait_for(asyncio.shield(waiter), policy.max_wait_s)
        except TimeoutError:
            if not (waiter.done() and not waiter.cancelled()):
                waiter.cancel()
                return self._throttled(f"no slot within {policy.max_wait_s:g}s")
            # Handed a slot at the last moment: keep it.
        finally:
            if entry in self.waiters:
                self.waiters.remove(entry)
                self.queued_bytes -= body_bytes
        # ``leave`` counted the slot in when it woke us.
        return Ticket(self.clock(), self.in_flight)

    def leave(self, ticket: Ticket, policy: ShedPolicy, upstreams: int) -> None:
        """Give a slot back (the request finished, well or not) and start waiters."""
        self.in_flight -= 1
        held = self.clock() - ticket.started
        if held > 0:
            sample = ticket.in_flight / held
            self.rate = sample if self.rate == 0.0 else self.rate + RATE_ALPHA * (
                sample - self.rate)
        limit = self.limit(policy, upstreams)
        while self.waiters and self.in_flight < limit:
            waiter, body_bytes = self.waiters.popleft()
            self.queued_bytes -= body_bytes
            if not waiter.done():
                self.in_flight += 1
                waiter.set_result(None)
