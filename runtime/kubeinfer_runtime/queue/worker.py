"""The async worker loop: Redis Stream in, objects and notifications out.

Per request (one asyncio task each, at most ``max_concurrency`` at once):

1. if the request's id hash says it already finished (a previous attempt died
   after writing its object), only notify and acknowledge — no second inference;
2. count the attempt; past ``max_retries`` retries, or with a malformed entry,
   dead-letter it: failure object, error notification, XADD to the
   dead-letter stream and XACK in one transaction;
3. a request older than its RequestTTLSeconds fails without running;
4. read the input object, infer (bounded by InvocationTimeoutSeconds), write
   the output object where the gateway said (``<outputPath>/<InferenceId>.out``,
   or as the client's S3OutputPathExtension and Filename placed it: the
   location travels in the entry); on error with retries left, re-queue a
   copy and acknowledge the original in one transaction (a fast retry, no
   visibility timeout to wait for);
5. record completion in the id hash, POST the notification (retries, backoff),
   then XACK + XDEL. An unacknowledged entry survives any crash.

Crashed workers' entries stay pending; ``XAUTOCLAIM`` hands the ones idle
longer than the visibility timeout to a live worker. A live worker touches its
in-flight entries (``XCLAIM ... JUSTID``) every third of the timeout, so a
slow request is never reclaimed from a healthy worker. On shutdown the worker
stops reading, lets in-flight requests finish for ``drain_timeout_s``, and
releases the rest (marks them idle so another worker takes them at once).

Guarantees: every accepted request ends with exactly one final object (output
or failure, at a deterministic key) — a re-processed request overwrites the
same key; notifications are delivered at least once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kubeinfer_runtime import codec, metrics
from kubeinfer_runtime.contract import AsyncQueueKeys, AsyncWorkerSettings
from kubeinfer_runtime.contract.locations import default_input_paths
from kubeinfer_runtime.errors import ModelError, RuntimeServiceError
from kubeinfer_runtime.queue.notifier import Notifier
from kubeinfer_runtime.queue.objects import ObjectStore
from kubeinfer_runtime.queue.request import (
    AsyncRequest,
    Confinement,
    failure_body,
    notification,
)
from kubeinfer_runtime.server.hotpath import invocations_work
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
                          settings.output_path, settings.failure_path)


def consumer_name() -> str:
    """Unique per process: the pod name on Kubernetes, plus pid and a random suffix."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Worker:
    def __init__(self, settings: AsyncWorkerSettings, slot: ModelSlot, redis: Any,
                 store: ObjectStore, notifier: Notifier, pool: ThreadPoolExecutor) -> None:
        self.settings = settings
        self.slot = slot
        self.redis = redis
        self.store = store
        self.notifier = notifier
        self.pool = pool
        self.keys = AsyncQueueKeys(queue=settings.queue)
        self.confinement = worker_confinement(settings)
        self.consumer = consumer_name()
        self.inflight: dict[str, asyncio.Task[None]] = {}
        self.stopping = asyncio.Event()
        self._claim_cursor = "0-0"
        self._last_claim = 0.0
        endpoint = settings.endpoint_name or settings.queue
        self._outcomes = {o: metrics.ASYNC_REQUESTS.labels(endpoint, o)
                          for o in ("success", "failure", "dead_letter", "expired")}
        self._retries = metrics.ASYNC_RETRIES.labels(endpoint)
        self._processing = metrics.ASYNC_PROCESSING_SECONDS.labels(endpoint)

    # -- the loop --------------------------------------------------------------------------

    async def ensure_group(self) -> None:
        import redis.exceptions

        try:
            await self.redis.xgroup_create(self.keys.stream, self.keys.group, id="0",
                                           mkstream=True)
        except redis.exceptions.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    async def run(self) -> None:
        """Consume until :meth:`stop`; then drain or release in-flight requests."""
        await self.ensure_group()
        heartbeat = asyncio.create_task(self._heartbeat(), name="async-heartbeat")
        log.info("Async worker %s consuming %s (concurrency %d, visibility %gs)",
                 self.consumer, self.keys.stream, self.settings.max_concurrency,
                 self.settings.visibility_timeout_s)
        try:
            while not self.stopping.is_set():
                try:
                    await self._step()
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    # Redis restarting, a network blip: keep going, never exit.
                    log.warning("Async worker loop error (%s: %s): retrying in 1s",
                                type(e).__name__, e)
                    await self._sleep(1.0)
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
            await self._drain()

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), seconds)

    async def _step(self) -> None:
        if self.slot.model is None:
            # Not ready (loading, or failed for good): take nothing, /ping says why.
            await self._sleep(0.05 if not self.slot.failed else 1.0)
            return
        free = self.settings.max_concurrency - len(self.inflight)
        if free <= 0:
            await asyncio.wait(list(self.inflight.values()), timeout=1.0,
                               return_when=asyncio.FIRST_COMPLETED)
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
            task = asyncio.create_task(self._guarded(msg_id, fields))
            self.inflight[msg_id] = task
            task.add_done_callback(self._forget_task)

    def _forget_task(self, task: asyncio.Task[None]) -> None:
        for msg_id, t in list(self.inflight.items()):
            if t is task:
                del self.inflight[msg_id]

    async def _reclaim(self, count: int) -> list[tuple[str, dict[str, str]]]:
        """Entries idle past the visibility timeout on any consumer (crashed workers')."""
        now = time.monotonic()
        interval = min(self.settings.visibility_timeout_s / 2, 5.0)
        if now - self._last_claim < interval and self._claim_cursor == "0-0":
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

    async def _heartbeat(self) -> None:
        """Keep our in-flight entries from looking abandoned (resets their idle time)."""
        period = self.settings.visibility_timeout_s / 3
        while True:
            await asyncio.sleep(period)
            ids = list(self.inflight)
            if ids:
                with contextlib.suppress(Exception):
                    await self.redis.xclaim(self.keys.stream, self.keys.group, self.consumer,
                                            min_idle_time=0, message_ids=ids, justid=True)

    async def stop(self) -> None:
        self.stopping.set()

    async def _drain(self) -> None:
        if not self.inflight:
            await self._forget_consumer()
            return
        tasks = list(self.inflight.values())
        log.info("Draining %d in-flight async request(s) (up to %gs)", len(tasks),
                 self.settings.drain_timeout_s)
        _, pending = await asyncio.wait(tasks, timeout=self.settings.drain_timeout_s)
        released = [m for m, t in self.inflight.items() if t in pending]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if released:
            await self._release(released)
        await self._forget_consumer()

    async def _release(self, ids: list[str]) -> None:
        """Hand unfinished entries back: idle enough for any worker to reclaim at once."""
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

    # -- one request -----------------------------------------------------------------------

    async def _guarded(self, msg_id: str, fields: dict[str, str]) -> None:
        try:
            await self.process(msg_id, fields)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            # Redis or the object store failed mid-way: the entry stays pending and
            # is reclaimed after the visibility timeout.
            log.warning("Async request %s left pending (%s: %s): it is retried after %gs",
                        msg_id, type(e).__name__, e, self.settings.visibility_timeout_s)

    async def process(self, msg_id: str, fields: dict[str, str]) -> None:
        try:
            req = AsyncRequest.from_fields(fields)
        except ValueError as e:
            await self._dead_letter_malformed(msg_id, fields, str(e))
            return
        forged = self.confinement.destination_problem(req)
        if forged:
            # Not written anywhere: a location outside the endpoint's paths did not
            # come from our gateway.
            await self._dead_letter_malformed(msg_id, fields, forged)
            return
        id_key = self.keys.inference(req.inference_id)
        # One round trip: the state, and this attempt counted (harmless when done).
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(id_key)
        pipe.hincrby(id_key, "attempts", 1)
        state, attempts = await pipe.execute()
        if state.get("done"):
            # An earlier attempt finished and wrote its object, then died before
            # acknowledging, or could not deliver its notification: notify again
            # (at least once) and acknowledge. Past maxRetries deliveries the
            # webhook is given up on (the object exists; the entry is dead-lettered
            # saying so) so a dead receiver cannot hold the backlog forever.
            give_up = int(attempts) > self.settings.max_retries + 1
            reason = state.get("last_error", "")
            if give_up:
                reason = (f"Notification of request {req.inference_id} undeliverable after "
                          f"{int(attempts) - 1} deliveries: check the webhook receiver")
                log.error("%s", reason)
            await self._notify_and_ack(msg_id, req, ok=state["done"] == "success",
                                       note=state["note"].encode(),
                                       dead_letter=state.get("dlq", "") == "1" or give_up,
                                       reason=reason, notify=not give_up)
            return
        retries = self.settings.max_retries
        if attempts > retries + 1:
            last = state.get("last_error") or ("the worker processing it stopped (crashed or "
                                               "was killed) on every attempt")
            await self._fail(msg_id, req, "ModelError",
                             f"Request {req.inference_id} failed {attempts - 1} times, more "
                             f"than maxRetries ({retries}); last error: {last}: fix the input "
                             "or the model, then submit again with a new InferenceId",
                             attempts - 1, dead_letter=True)
            return
        if req.expired(time.time()):
            await self._fail(msg_id, req, "RequestExpired",
                             f"Request {req.inference_id} expired: no worker took it within "
                             f"its RequestTTLSeconds ({req.expires_at - req.received_at:g}s): "
                             "add workers, or send a longer RequestTTLSeconds", attempts,
                             dead_letter=False, outcome="expired")
            return
        refused = self.confinement.input_problem(req)
        if refused:
            await self._fail(msg_id, req, "ValidationError", refused, attempts,
                             dead_letter=False, outcome="failure")
            return
        started = time.perf_counter()
        try:
            payload, content_type = await self._infer(req)
            await asyncio.to_thread(self.store.write, req.output_location, payload,
                                    content_type)
        except RuntimeServiceError as e:
            code, message = e.code, e.message
        except Exception as e:
            # The exception's text stays in the log: it may quote what was read.
            log.exception("Async request %s failed unexpectedly", req.inference_id)
            code, message = "InternalFailure", (f"The worker failed processing the request "
                                                f"({type(e).__name__}): see its log")
        else:
            self._processing.observe(time.perf_counter() - started)
            note = notification(req, ok=True, now=time.time(),
                                region=self.settings.s3_region or "",
                                output_content_type=content_type)
            pipe = self.redis.pipeline(transaction=True)
            pipe.hincrby(self.keys.writes, req.inference_id, 1)
            pipe.hset(id_key, mapping={"done": "success", "note": note})
            await pipe.execute()
            self._outcomes["success"].inc()
            await self._notify_and_ack(msg_id, req, ok=True, note=note)
            return
        reason = f"{code}: {message}"
        await self.redis.hset(id_key, "last_error", reason)
        if attempts <= retries:
            log.info("Async request %s attempt %d failed (%s): re-queued", req.inference_id,
                     attempts, reason)
            await self._requeue(msg_id, req)
            return
        await self._fail(msg_id, req, code,
                         f"Request {req.inference_id} failed on all {attempts} attempt(s) "
                         f"(maxRetries {retries}); last error: {reason}", attempts,
                         dead_letter=True)

    async def _infer(self, req: AsyncRequest) -> tuple[bytes, str]:
        model = self.slot.get()
        body = await asyncio.to_thread(self.store.read, req.input_location)
        encoding = codec.negotiate(req.accept or None)
        loop = asyncio.get_running_loop()
        timeout = req.invocation_timeout_s
        limits = codec.DecodeLimits.for_settings(self.settings.max_payload_bytes,
                                                 self.settings.max_decoded_bytes)
        try:
            payload, _ = await asyncio.wait_for(
                loop.run_in_executor(self.pool, invocations_work, model, body,
                                     req.content_type or None, encoding, limits), timeout)
        except TimeoutError:
            raise ModelError(f"Model did not finish request {req.inference_id} within its "
                             f"InvocationTimeoutSeconds ({timeout:g}s): send a longer "
                             "timeout or a smaller input") from None
        return payload, encoding.content_type.decode()

    async def _requeue(self, msg_id: str, req: AsyncRequest) -> None:
        """A fresh copy at the tail, the original acknowledged: atomically."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.xadd(self.keys.stream, req.to_fields())
        pipe.xack(self.keys.stream, self.keys.group, msg_id)
        pipe.xdel(self.keys.stream, msg_id)
        await pipe.execute()
        self._retries.inc()

    async def _fail(self, msg_id: str, req: AsyncRequest, code: str, message: str,
                    attempts: int, *, dead_letter: bool, outcome: str = "") -> None:
        body = failure_body(req, code, message, attempts)
        await asyncio.to_thread(self.store.write, req.failure_location, body, "application/json")
        note = notification(req, ok=False, now=time.time(), region=self.settings.s3_region or "",
                            failure_reason=message)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hincrby(self.keys.writes, req.inference_id, 1)
        pipe.hset(self.keys.inference(req.inference_id), mapping={
            "done": "failure", "note": note, "dlq": "1" if dead_letter else "",
            "last_error": message})
        await pipe.execute()
        self._outcomes[outcome or ("dead_letter" if dead_letter else "failure")].inc()
        log.warning("Async request %s failed%s: %s", req.inference_id,
                    " (dead-lettered)" if dead_letter else "", message)
        await self._notify_and_ack(msg_id, req, ok=False, note=note, dead_letter=dead_letter,
                                   reason=message)

    async def _notify_and_ack(self, msg_id: str, req: AsyncRequest, *, ok: bool, note: bytes,
                              dead_letter: bool = False, reason: str = "",
                              notify: bool = True) -> None:
        url = self.settings.success_url if ok else self.settings.error_url
        if notify and url and not await self.notifier.send(url, note, req.inference_id):
            return  # stays pending: reclaimed later and notified again
        pipe = self.redis.pipeline(transaction=True)
        if dead_letter:
            pipe.xadd(self.keys.dead_letter, {**req.to_fields(), "error": reason,
                                              "original_id": msg_id})
        pipe.xack(self.keys.stream, self.keys.group, msg_id)
        # Finished entries leave the stream: its length stays the backlog.
        pipe.xdel(self.keys.stream, msg_id)
        await pipe.execute()

    async def _dead_letter_malformed(self, msg_id: str, fields: dict[str, str],
                                     problem: str) -> None:
        log.error("Async queue entry %s is malformed (%s): dead-lettered", msg_id, problem)
        pipe = self.redis.pipeline(transaction=True)
        pipe.xadd(self.keys.dead_letter, {**fields, "error": f"Malformed entry: {problem}",
                                          "original_id": msg_id})
        pipe.xack(self.keys.stream, self.keys.group, msg_id)
        pipe.xdel(self.keys.stream, msg_id)
        await pipe.execute()
        self._outcomes["dead_letter"].inc()
