"""The worker's circuit breaker on the object store, as the loop and the tasks use it.

``retry_policy.Breaker`` decides (pure: when to probe, when to close); this
small object holds it with what the I/O side needs around it: an event the
tasks waiting on the store wake on when it closes, the probe itself, and one
log line per opening and closing (not one per failed request).
"""

from __future__ import annotations

import asyncio
import logging
import time

from kubeinfer_runtime.queue.objects import ObjectStore, StoreUnreachable
from kubeinfer_runtime.queue.retry_policy import (
    Breaker,
    RetryPolicy,
    Rng,
    probed,
    succeeded,
    trip,
)

log = logging.getLogger("kubeinfer.queue")


class StoreGate:
    def __init__(self, store: ObjectStore, probe_uri: str, policy: RetryPolicy,
                 rng: Rng) -> None:
        self.store = store
        self.probe_uri = probe_uri
        self.policy = policy
        self.rng = rng
        self.breaker = Breaker()
        #: Set while closed: tasks waiting on the store wake when it is set again.
        self.up = asyncio.Event()
        self.up.set()

    @property
    def is_open(self) -> bool:
        return self.breaker.is_open

    def trip(self, error: BaseException) -> None:
        """A request found the store unreachable: stop taking new requests."""
        if self.breaker.is_open:
            return
        self.breaker = trip(self.breaker, self.policy, time.monotonic(), self.rng)
        self.up.clear()
        log.warning("Object store unreachable (%s): taking no new async requests until it "
                    "answers; probing in %.1fs", error,
                    self.breaker.probe_at - time.monotonic())

    def close(self, why: str) -> None:
        if self.breaker.is_open:
            down = time.monotonic() - (self.breaker.opened_at or time.monotonic())
            log.warning("Object store answers again after %.1fs (%s): taking async requests "
                        "again", down, why)
            self.up.set()
        self.breaker = probed(self.breaker, True, self.policy, time.monotonic(), self.rng)

    def succeeded(self) -> None:
        """A request went through while closed: forget the flapping streak."""
        if not self.breaker.is_open:
            self.breaker = succeeded(self.breaker)

    def wait_s(self, now: float) -> float:
        """Seconds until the next probe is due (0: due now)."""
        return max(0.0, self.breaker.probe_at - now)

    async def probe(self) -> None:
        """Probe the store (when due); close when it answers."""
        try:
            await asyncio.to_thread(self.store.probe, self.probe_uri)
        except StoreUnreachable as e:
            self.breaker = probed(self.breaker, False, self.policy, time.monotonic(), self.rng)
            log.info("Object store still unreachable (%s): next probe in %.1fs", e,
                     self.breaker.probe_at - time.monotonic())
            return
        self.close("a probe succeeded")
