"""Gateway admission (pure rules and the per-variant gate): as many in flight as the model
servers finish within the target latency, a bounded wait, 429 beyond."""

from __future__ import annotations

import asyncio

import pytest

from kubeinfer_runtime.errors import Throttled
from kubeinfer_runtime.gateway.shedding import (
    Admission,
    ShedPolicy,
    Ticket,
    VariantGate,
    decide,
    in_flight_limit,
)

POLICY = ShedPolicy(target_latency_s=0.5, floor_per_upstream=2, max_wait_s=1.0,
                    queue_per_upstream=3, max_queue_bytes=1000)
FIXED = ShedPolicy(target_latency_s=0.5, floor_per_upstream=2, max_wait_s=1.0,
                   queue_per_upstream=3, max_queue_bytes=1000, fixed_per_upstream=5)


@pytest.mark.parametrize(("policy", "upstreams", "rate", "want"), [
    (POLICY, 1, 0.0, 2),          # not measured yet: the floor
    (POLICY, 3, 0.0, 6),          # the floor is per ready model server
    (POLICY, 1, 10.0, 5),         # 10/s x 0.5 s
    (POLICY, 1, 20_000.0, 10_000),  # a fast model: a limit no burst of 1,000 reaches
    (POLICY, 0, 0.0, 2),          # no ready model server: counted as one
    (FIXED, 2, 20_000.0, 10),     # the variant's own fixed limit, per model server
])
def test_in_flight_limit(policy: ShedPolicy, upstreams: int, rate: float, want: int) -> None:
    assert in_flight_limit(policy, upstreams, rate) == want


@pytest.mark.parametrize(("in_flight", "queued", "qbytes", "rate", "want"), [
    (0, 0, 0, 0.0, Admission.GO),
    (1, 0, 0, 0.0, Admission.GO),
    (2, 0, 0, 0.0, Admission.WAIT),     # at the floor, rate unknown: wait (timer-bounded)
    (1, 1, 10, 0.0, Admission.WAIT),    # a free slot but a line: behind it (first in, first out)
    (2, 3, 30, 0.0, Admission.SHED),    # the line is full (3 per model server)
    (2, 1, 995, 0.0, Admission.SHED),   # the line's bodies would pass 1000 bytes
    (5, 1, 0, 10.0, Admission.WAIT),    # 2nd in line at 10/s: 0.2 s
    (5, 2, 0, 2.0, Admission.SHED),     # 3rd in line at 2/s: 1.5 s > 1 s
])
def test_decide(in_flight: int, queued: int, qbytes: int, rate: float,
                want: Admission) -> None:
    assert decide(POLICY, 1, in_flight, queued, qbytes, 10, rate) is want


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_service_rate_is_in_flight_over_latency() -> None:
    clock = Clock()
    gate = VariantGate("ep", "v", clock)
    gate.in_flight = 4
    gate.leave(Ticket(started=99.0, in_flight=4), POLICY, 1)   # 4 held for 1 s: 4/s
    assert gate.rate == pytest.approx(4.0)
    gate.in_flight = 1
    gate.leave(Ticket(started=99.999, in_flight=1), POLICY, 1)  # 1 for 1 ms: 1000/s
    assert gate.rate == pytest.approx(4.0 + 0.05 * (1000.0 - 4.0))
    # Light traffic does not look like low capacity: one at a time, each fast.
    fresh = VariantGate("ep", "v", clock)
    fresh.in_flight = 1
    fresh.leave(Ticket(started=99.9999, in_flight=1), POLICY, 1)
    assert fresh.rate == pytest.approx(10_000.0)
    assert fresh.limit(POLICY, 1) == 5000


def test_a_waiter_gets_the_slot_released_first_in_first_out() -> None:
    two = ShedPolicy(target_latency_s=0.5, floor_per_upstream=1, max_wait_s=1.0,
                     queue_per_upstream=3, max_queue_bytes=1000, fixed_per_upstream=2)

    async def run() -> None:
        gate = VariantGate("ep", "v")
        t0, t1 = [await gate.enter(two, 1, 10) for _ in range(2)]
        assert isinstance(t0, Ticket) and isinstance(t1, Ticket)
        first = asyncio.create_task(gate.enter(two, 1, 10))
        second = asyncio.create_task(gate.enter(two, 1, 10))
        await asyncio.sleep(0)
        assert len(gate.waiters) == 2 and gate.queued_bytes == 20
        gate.leave(t0, two, 1)
        assert isinstance(await first, Ticket) and not second.done()
        gate.leave(t1, two, 1)
        assert isinstance(await second, Ticket)
        assert gate.in_flight == 2 and gate.queued_bytes == 0 and not gate.waiters

    asyncio.run(run())


def test_a_waiter_not_served_in_time_is_refused_and_leaves_the_line() -> None:
    quick = ShedPolicy(target_latency_s=0.5, floor_per_upstream=1, max_wait_s=0.05,
                       queue_per_upstream=5, max_queue_bytes=1000)

    async def run() -> None:
        gate = VariantGate("ep", "v")
        held = await gate.enter(quick, 1, 1)
        assert isinstance(held, Ticket)
        refused = await gate.enter(quick, 1, 7)
        assert isinstance(refused, Throttled) and refused.status == 429
        assert "no slot within 0.05s" in refused.message
        assert not gate.waiters and gate.queued_bytes == 0 and gate.in_flight == 1
        gate.leave(held, quick, 1)
        assert gate.in_flight == 0

    asyncio.run(run())


def test_refusal_is_immediate_when_the_line_is_full() -> None:
    async def run() -> None:
        gate = VariantGate("ep", "v")
        held = [await gate.enter(POLICY, 1, 1) for _ in range(2)]
        waiting = [asyncio.create_task(gate.enter(POLICY, 1, 1)) for _ in range(3)]
        await asyncio.sleep(0)
        loop = asyncio.get_running_loop()
        started = loop.time()
        refused = await gate.enter(POLICY, 1, 1)
        assert isinstance(refused, Throttled) and loop.time() - started < 0.01
        assert refused.code == "ThrottlingException"
        for ticket in held:
            assert isinstance(ticket, Ticket)
            gate.leave(ticket, POLICY, 1)
        served = [await w for w in waiting]
        assert all(isinstance(t, Ticket) for t in served)

    asyncio.run(run())
