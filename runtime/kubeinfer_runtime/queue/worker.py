"""The async worker loop: Redis Stream in, one task per request, retries timed by policy.

The loop reads entries (``XREADGROUP``, at most ``max_concurrency`` in flight)
and runs each in its own task, which calls ``processing.Processor.process``
(one try) until the entry is settled. What a failed try does is the retry
policy's (``retry_policy``):

* a TRANSIENT failure (object store, Redis or model not reachable) keeps the
  entry with this worker and tries again after an exponential backoff with
  full jitter; the attempt it used is given back (``attempts`` in the id hash
  is decremented) until the request has failed that way for
  ``transient_budget_s`` (``transient_since`` in the id hash, so the budget
  survives restarts and reclaims);
* when the store itself is unreachable, the worker's circuit breaker opens: no
  new entry is read or reclaimed until a probe of the store succeeds, so a
  queue is not churned through during an outage; the waiting tasks try again
  as soon as it closes;
* an undelivered notification (the request's object was written) leaves the
  entry pending for redelivery after the visibility timeout, counted only
  past the budget (or when the receiver refused it).

Crashed workers' entries stay pending; ``XAUTOCLAIM`` hands the ones idle
longer than the visibility timeout to a live worker. A live worker touches its
in-flight entries (``XCLAIM ... JUSTID``) every third of the timeout — the ones
waiting on a backoff included, so they are never taken as abandoned — and at
once after an outage of Redis. On shutdown the worker stops reading, lets
in-flight requests finish for ``drain_timeout_s`` (requests waiting on a
backoff stop waiting; the heartbeat goes on, so none is taken as abandoned
meanwhile), and releases the rest (marks them idle so another worker takes
them at once, and gives back the attempt each used: a shutdown is not the
request's fault).

Guarantees: every accepted request ends with exactly one final object (output
or failure, at a deterministic key) — a re-processed request overwrites the
same key — or, when its failure object can never be written, in the
dead-letter stream saying why; notifications are delivered at least once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kubeinfer_runtime.contract import AsyncQueueKeys, AsyncWorkerSettings
from kubeinfer_runtime.contract.async_paths import parse_former_paths
from kubeinfer_runtime.contract.locations import default_input_paths
from kubeinfer_runtime.queue.gate import StoreGate
from kubeinfer_runtime.queue.held_threads import HeldThreads, assess, live_bound_s
from kubeinfer_runtime.queue.notifier import Notifier
from kubeinfer_runtime.queue.objects import ObjectStore
from kubeinfer_runtime.queue.processing import Processor, Ticket
from kubeinfer_runtime.queue.request import Confinement
from kubeinfer_runtime.queue.retry_policy import (
    Action,
    Failure,
    NotificationUndelivered,
    RetryPolicy,
    Rng,
    classify,
    decide,
    trips_breaker,
)
from kubeinfer_runtime.server.state import ModelSlot

log = logging.getLogger("kubeinfer.queue")

#: XREADGROUP blocks at most this long, so the loop notices a stop request soon.
BLOCK_MS = 500
#: A consumer silent this long (ms) with nothing pending is a dead worker's: forgotten.
DEAD_CONSUMER_IDLE_MS = 3_600_000
#: Released entries get this idle time (ms): any worker's next XAUTOCLAIM takes them.
RELEASED_IDLE_MS = 10**9


def worker_confinement(settings: AsyncWorkerSettings) -> Confinement:
    """Where this worker may read inputs and write objects (its endpoint's paths)."""
    inputs = [p.strip() for p in settings.input_paths.split(",") if p.strip()]
    return Confinement.of(inputs or default_input_paths(settings.output_path),
                          settings.output_path, settings.failure_path,
                          parse_former_paths(settings.former_paths))


def consumer_name() -> str:
    """Unique per process: the pod name on Kubernetes, plus pid and a random suffix."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Worker:
    def __init__(self, settings: AsyncWorkerSettings, slot: ModelSlot, redis: Any,
                 store: ObjectStore, notifier: Notifier, pool: ThreadPoolExecutor, *,
                 rng: Rng = random.random) -> None:
        self.settings = settings
        self.slot = slot
        self.redis = redis
        self.store = store
        self.keys = AsyncQueueKeys(queue=settings.queue)
        self.confinement = worker_confinement(settings)
        self.processor = Processor(settings, slot, redis, store, notifier, pool,
                                   self.confinement)
        self.policy = RetryPolicy(budget_s=settings.transient_budget_s,
                                  first_s=settings.transient_backoff_s,
                                  max_s=settings.transient_backoff_max_s,
                                  max_retries=settings.max_retries)
        self.rng = rng
        self.consumer = consumer_name()
        self.inflight: dict[str, asyncio.Task[None]] = {}
        #: The ticket of each in-flight entry (what a release at shutdown gives back).
        self.tickets: dict[str, Ticket] = {}
        self.stopping = asyncio.Event()
        #: The circuit breaker on the object store (its probe: the output location).
        self.gate = StoreGate(store, settings.output_path, self.policy, rng)
        #: Entries whose task stopped waiting on a backoff at shutdown: released.
        self._parked: set[str] = set()
        #: Touch in-flight entries before reclaiming anything (Redis was unreachable).
        self._touch_first = False
        self._claim_cursor = "0-0"
        self._last_claim = 0.0
        self._reclaim_after = 0.0
        #: Model calls run at once at most: the fewer of its threads and its entries.
        self.usable_threads = min(settings.inference_threads, settings.max_concurrency)
        # From the endpoint's default timeout (async.invocationTimeout): a request may
        # send a longer one, but a call held that long past its own is not coming back.
        self.held_live_bound_s = live_bound_s(settings.held_threads_liveness_s,
                                              settings.invocation_timeout_s)
        #: What was last logged about held threads: "", "held" or "stuck".
        self._held_logged = ""

    # -- the loop --------------------------------------------------------------------------

    async def ensure_group(self) -> None:
        import redis.exceptions

        try:
            await self.redis.xgroup_create(self.keys.stream, self.keys.group, id="0",
                                           mkstream=True)
        except redis.exceptions.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        # Earlier versions counted writes in one hash per queue that never expired (a
        # field per request ever processed); the count is in each id hash now.
        await self.redis.unlink(f"kubeinfer:async:{{{self.settings.queue}}}:writes")

    async def run(self) -> None:
        """Consume until :meth:`stop`; then drain or release in-flight requests."""
        heartbeat = asyncio.create_task(self._heartbeat(), name="async-heartbeat")
        log.info("Async worker %s consuming %s (concurrency %d, visibility %gs)",
                 self.consumer, self.keys.stream, self.settings.max_concurrency,
                 self.settings.visibility_timeout_s)
        failing_since: float | None = None
        # The group is made inside the loop that outlasts outages: a worker that starts
        # while Redis is away (a restart, a failover, a fresh install) retries it with
        # everything else instead of ending its loop and idling forever while /ping,
        # which only pings Redis, says it is ready.
        group_ready = False
        try:
            while not self.stopping.is_set():
                try:
                    if not group_ready:
                        await self.ensure_group()
                        group_ready = True
                    await self._step()
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    # Redis restarting, a network blip: keep going, never exit. Logged
                    # once per outage, not once a second.
                    if failing_since is None:
                        failing_since = time.monotonic()
                        log.warning("Async worker loop error (%s: %s): retrying every 1s",
                                    type(e).__name__, e)
                    else:
                        log.debug("Async worker loop error (%s: %s)", type(e).__name__, e)
                    self._touch_first = True
                    if "NOGROUP" in str(e):  # Redis came back without our group
                        group_ready = False
                    await self._sleep(1.0)
                    continue
                if failing_since is not None:
                    log.warning("Async worker loop recovered after %.1fs",
                                time.monotonic() - failing_since)
                    failing_since = None
        finally:
            await self._drain(heartbeat)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), seconds)

    async def _step(self) -> None:
        if self.slot.model is None:
            # Not ready (loading, or failed for good): take nothing, /ping says why.
            await self._sleep(0.05 if not self.slot.failed else 1.0)
            return
        if self._touch_first:
            await self._touch()
            self._touch_first = False
            # Redis is back: give every worker a heartbeat to touch its entries before
            # taking any that only look abandoned because Redis was away.
            self._reclaim_after = time.monotonic() + self.settings.visibility_timeout_s / 3 + 1
        if self.gate.is_open:
            await self._paused()
            return
        # Threads still running requests that timed out hold their share: the entries
        # they would run are left to replicas that can start them now. When they hold
        # every thread, none is taken: it could only wait here for one to return.
        free = (self.settings.max_concurrency - len(self.inflight)
                - self.processor.threads.orphans)
        if self.held_threads(time.monotonic()) is not None:
            free = 0
        if free <= 0:
            if self.inflight:
                await asyncio.wait(list(self.inflight.values()), timeout=1.0,
                                   return_when=asyncio.FIRST_COMPLETED)
            else:
                # Only abandoned calls hold the threads: nothing to wait on but time.
                await self._sleep(1.0)
            return
        entries = await self._reclaim(free)
        if not entries:
            reply = await self.redis.xreadgroup(self.keys.group, self.consumer,
                                                {self.keys.stream: ">"}, count=free,
                                                block=BLOCK_MS)
            entries = reply[0][1] if reply else []
        for msg_id, fields in entries:
            if not fields or msg_id in self.inflight:
                continue  # deleted meanwhile, or already ours and running
            ticket = self.tickets[msg_id] = Ticket()
            task = asyncio.create_task(self._guarded(msg_id, fields, ticket))
            self.inflight[msg_id] = task
            task.add_done_callback(self._forget_task)

    def held_threads(self, now: float) -> HeldThreads | None:
        """Whether abandoned model calls hold every usable thread (the probes ask, and the
        loop before it takes entries); logged once when it begins, ends, or outlasts the
        liveness bound, so the log says why the queue stopped moving."""
        held = assess(self.processor.threads.abandoned(), self.usable_threads, now,
                      self.held_live_bound_s)
        state = "" if held is None else "held" if held.live else "stuck"
        if state != self._held_logged:
            if held is None:
                log.warning("Async worker %s: an inference thread is free again: taking "
                            "requests", self.consumer)
            elif held.live:
                log.warning("%s", held.not_ready())
            else:
                log.error("%s", held.not_live())
            self._held_logged = state
        return held

    def _forget_task(self, task: asyncio.Task[None]) -> None:
        for msg_id, t in list(self.inflight.items()):
            if t is task:
                del self.inflight[msg_id]
                self.tickets.pop(msg_id, None)

    async def _paused(self) -> None:
        """While the breaker is open: no reads, no reclaims; probe the store when due."""
        wait = self.gate.wait_s(time.monotonic())
        if wait > 0:
            await self._sleep(min(wait, BLOCK_MS / 1000))
            return
        await self.gate.probe()

    # -- reclaiming and leases -------------------------------------------------------------

    async def _reclaim(self, count: int) -> list[tuple[str, dict[str, str]]]:
        """Entries idle past the visibility timeout on any consumer (crashed workers')."""
        now = time.monotonic()
        interval = min(self.settings.visibility_timeout_s / 2, 5.0)
        if now < self._reclaim_after or (now - self._last_claim < interval
                                         and self._claim_cursor == "0-0"):
            return []
        self._last_claim = now
        reply = await self.redis.xautoclaim(
            self.keys.stream, self.keys.group, self.consumer,
            min_idle_time=int(self.settings.visibility_timeout_s * 1000),
            start_id=self._claim_cursor, count=count)
        self._claim_cursor = reply[0]
        if self._claim_cursor == "0-0":
            await self._forget_dead_consumers()
        claimed: list[tuple[str, dict[str, str]]] = reply[1]
        if claimed:
            log.info("Reclaimed %d async request(s) idle over %gs", len(claimed),
                     self.settings.visibility_timeout_s)
        return claimed

    async def _forget_dead_consumers(self) -> None:
        """Drop consumers that hold nothing and were silent for an hour (killed workers
        that never said goodbye), so the group's consumer list does not grow forever."""
        consumers = await self.redis.xinfo_consumers(self.keys.stream, self.keys.group)
        for c in consumers:
            if int(c.get("pending", 0)) == 0 and int(c.get("idle", 0)) > DEAD_CONSUMER_IDLE_MS:
                await self.redis.xgroup_delconsumer(self.keys.stream, self.keys.group,
                                                    c["name"])

    async def _touch(self) -> None:
        """Reset the idle time of our in-flight entries (those waiting on a backoff too)."""
        ids = list(self.inflight)
        if ids:
            await self.redis.xclaim(self.keys.stream, self.keys.group, self.consumer,
                                    min_idle_time=0, message_ids=ids, justid=True)

    async def _heartbeat(self) -> None:
        """Keep our in-flight entries from looking abandoned (and Redis's clock known)."""
        period = self.settings.visibility_timeout_s / 3
        while True:
            await self._read_redis_clock()
            await asyncio.sleep(period)
            try:
                await self._touch()
            except Exception:
                self._touch_first = True  # Redis is away: touch them as soon as it is back

    async def _read_redis_clock(self) -> None:
        """How far Redis's clock is from ours (request TTLs run on it); best effort, the
        last value (or none: 0) stays when Redis does not answer."""
        with contextlib.suppress(Exception):
            before = time.time()
            seconds, micros = await self.redis.time()
            after = time.time()
            self.processor.clock_offset_s = seconds + micros / 1e6 - (before + after) / 2

    async def stop(self) -> None:
        self.stopping.set()

    async def _drain(self, heartbeat: asyncio.Task[None]) -> None:
        """Let in-flight requests finish for ``drain_timeout_s``, then release the rest.

        ``heartbeat`` runs until the release: an entry untouched while its request still
        runs here looks abandoned after the visibility timeout, and another worker would
        take it and run it a second time. Stopped before the release, which a later touch
        would undo (a released entry must look idle)."""
        pending: set[asyncio.Task[None]] = set()
        released: list[str] = []
        if self.inflight:
            tasks = list(self.inflight.values())
            log.info("Draining %d in-flight async request(s) (up to %gs)", len(tasks),
                     self.settings.drain_timeout_s)
            _, pending = await asyncio.wait(tasks, timeout=self.settings.drain_timeout_s)
            released = [m for m, t in self.inflight.items() if t in pending]
        tickets = [self.tickets[m] for m in released if m in self.tickets]
        heartbeat.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await heartbeat
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for ticket in tickets:
            await self.processor.give_back(ticket)
        await self._release(released + sorted(self._parked))
        await self._forget_consumer()

    async def _release(self, ids: list[str]) -> None:
        """Hand unfinished entries back: idle enough for any worker to reclaim at once."""
        if not ids:
            return
        with contextlib.suppress(Exception):
            await self.redis.xclaim(self.keys.stream, self.keys.group, self.consumer,
                                    min_idle_time=0, message_ids=ids, idle=RELEASED_IDLE_MS,
                                    justid=True)
            log.info("Released %d unfinished async request(s) to other workers", len(ids))

    async def _forget_consumer(self) -> None:
        """Leave the group's consumer list when nothing is pending on us (clean metrics)."""
        with contextlib.suppress(Exception):
            pending = await self.redis.xpending_range(self.keys.stream, self.keys.group,
                                                      min="-", max="+", count=1,
                                                      consumername=self.consumer)
            if not pending:
                await self.redis.xgroup_delconsumer(self.keys.stream, self.keys.group,
                                                    self.consumer)

    # -- one request: tries until settled -------------------------------------------------

    async def _guarded(self, msg_id: str, fields: dict[str, str], ticket: Ticket) -> None:
        while True:
            try:
                await self.processor.process(msg_id, fields, ticket)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if classify(e) is not Failure.TRANSIENT:
                    # E.g. a notification the receiver refused: the entry stays pending
                    # and is delivered again after the visibility timeout.
                    if isinstance(e, NotificationUndelivered) and e.redelivery:
                        await self.processor.charge(ticket)
                    log.warning("Async request %s left pending (%s: %s): it is retried "
                                "after %gs", msg_id, type(e).__name__, e,
                                self.settings.visibility_timeout_s)
                    return
                if not await self._back_off(msg_id, ticket, e):
                    return
                continue
            if ticket.store_down:
                # It read its input and wrote its object: the store answers again.
                self.gate.close("a request went through")
            self.gate.succeeded()
            return

    async def _back_off(self, msg_id: str, ticket: Ticket, error: Exception) -> bool:
        """After a transient failure: True to try again now, False when the task ends
        (the entry left pending for redelivery, or parked for release at shutdown)."""
        ticket.tries += 1
        undelivered = isinstance(error, NotificationUndelivered)
        d = decide(self.policy, now=time.time(), transient_since=ticket.transient_since,
                   tries=ticket.tries, attempts=ticket.attempts, hold=not undelivered,
                   rng=self.rng)
        ticket.transient_since = d.transient_since
        # A try that ran the request and only failed to notify stays counted; a failed
        # redelivery (no attempt by itself) is charged one past the budget.
        give_back = charge = False
        if isinstance(error, NotificationUndelivered):
            charge = error.redelivery and d.counted
        else:
            give_back = not d.counted
        await self.processor.record_transient(ticket, d.transient_since, give_back=give_back,
                                              charge=charge, error=error)
        # The next try counts again: with the same token when this one was given back
        # (a no-op if giving back did not reach Redis), with a new one when it was used.
        ticket.counted = False
        if d.counted:
            ticket.token = None
        name = ticket.req.inference_id if ticket.req is not None else msg_id
        if d.action is Action.LEAVE:
            log.warning("Async request %s: %s: left pending for redelivery after %gs; %s",
                        name, error, self.settings.visibility_timeout_s, d.reason)
            return False
        if trips_breaker(error):
            ticket.store_down = True
            self.gate.trip(error)
        log.warning("Async request %s: %s: retry %d in %.1fs; %s", name, error, ticket.tries,
                    d.delay_s, d.reason)
        waits = [asyncio.ensure_future(self.stopping.wait())]
        if not self.gate.up.is_set():
            waits.append(asyncio.ensure_future(self.gate.up.wait()))
        try:
            await asyncio.wait(waits, timeout=d.delay_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        if self.stopping.is_set():
            self._parked.add(msg_id)
            return False
        return True
