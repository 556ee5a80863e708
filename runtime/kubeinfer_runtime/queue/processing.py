"""One try at one queued request: state, inference, objects, completion, notification, XACK.

Split from ``worker`` (which owns the loop, the leases and the retry timing):
this module does what a single delivery of an entry does, and raises what it
cannot finish. A try:

1. if the request's id hash says it already finished (a previous attempt died
   after writing its object, or its notification was not delivered), only
   notify and acknowledge — no second inference;
2. counts the attempt; past ``max_retries`` retries, or with a malformed entry,
   dead-letters it: failure object, error notification, XADD to the
   dead-letter stream and XACK in one transaction. A failure object that
   cannot be written does not hold the request (``_unwritten``): unless the
   store is down (then it waits, as every write does), the request is
   dead-lettered without it, the reason in its dead letter and notification;
3. a request older than its RequestTTLSeconds fails without running;
4. reads the input object, infers (bounded by InvocationTimeoutSeconds),
   writes the output object where the gateway said. A failure is classified
   (``retry_policy.classify``): a PERMANENT one (bad input, model error on it)
   writes the failure object at once; a RETRY one re-queues a copy and
   acknowledges the original in one transaction while retries are left; a
   TRANSIENT one (store, Redis or webhook unreachable) is raised for the worker
   to back off without using an attempt;
5. records completion in the id hash (with ``writes``, the objects written: an
   audit that expires with the hash), POSTs the notification, then XACK + XDEL.

Every Redis or store error raised out of here leaves the entry pending: the
worker retries it, or another worker reclaims it after a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from kubeinfer_runtime import codec, metrics
from kubeinfer_runtime.contract import AsyncQueueKeys, AsyncWorkerSettings
from kubeinfer_runtime.errors import RuntimeServiceError
from kubeinfer_runtime.queue.inference_threads import InferenceThreads
from kubeinfer_runtime.queue.notifier import Delivery, Notifier
from kubeinfer_runtime.queue.objects import ObjectStore, ObjectStoreError
from kubeinfer_runtime.queue.producer import DEDUPE_EXTRA_S
from kubeinfer_runtime.queue.request import (
    AsyncRequest,
    Confinement,
    failure_body,
    notification,
)
from kubeinfer_runtime.queue.retry_policy import (
    Failure,
    InferenceTimedOut,
    NotificationUndelivered,
    classify,
    trips_breaker,
)
from kubeinfer_runtime.server.hotpath import invocations_work
from kubeinfer_runtime.server.state import ModelSlot

log = logging.getLogger("kubeinfer.queue")

#: Dead letters kept per endpoint (the oldest go first; trimmed exactly: a dead letter
#: is rare, so exact trimming costs nothing). Each holds a request's fields, never its
#: payload; without a bound every input that fails on every try adds one for good, in
#: a Redis every namespace may share. Each also has its failure object and error
#: notification.
DEAD_LETTER_MAX_ENTRIES = 10_000


# Count a try in the request's id hash, once per token: a try whose reply was lost
# (Redis died after running it) is not counted twice when the same token comes again.
# A finished request is not counted: its redeliveries only notify (failed ones are
# charged afterwards, see _TRANSIENT). KEYS[1]: the id hash; ARGV[1]: the try's token;
# ARGV[2]: seconds it lives if it has no expiry (see _EXPIRING). Returns the hash (flat).
_COUNT = """
if redis.call('HEXISTS', KEYS[1], 'done') == 0 and
   redis.call('HGET', KEYS[1], 'try') ~= ARGV[1] then
  redis.call('HINCRBY', KEYS[1], 'attempts', 1)
  redis.call('HSET', KEYS[1], 'try', ARGV[1])
end
if redis.call('TTL', KEYS[1]) == -1 then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return redis.call('HGETALL', KEYS[1])
"""

# A transient failure: remember since when, and give back the try counted with the
# token (only if it still is: idempotent too), or charge a failed redelivery. ARGV:
# token ('' keeps the count), the wall-clock time of the first transient failure, the
# error, '1' to charge an attempt, the seconds it lives if it has no expiry.
_TRANSIENT = """
if ARGV[1] ~= '' and redis.call('HGET', KEYS[1], 'try') == ARGV[1] then
  redis.call('HINCRBY', KEYS[1], 'attempts', -1)
  redis.call('HDEL', KEYS[1], 'try')
end
if ARGV[4] == '1' then
  redis.call('HINCRBY', KEYS[1], 'attempts', 1)
end
redis.call('HSETNX', KEYS[1], 'transient_since', ARGV[2])
redis.call('HSET', KEYS[1], 'last_error', ARGV[3])
if redis.call('TTL', KEYS[1]) == -1 then redis.call('EXPIRE', KEYS[1], ARGV[5]) end
return 1
"""

# A try stopped unfinished by a graceful shutdown (released to other workers): give back
# the attempt it counted, if it still is (idempotent, as _TRANSIENT's) and the request is
# not done. KEYS[1]: the id hash; ARGV[1]: the try's token.
_RELEASED = """
if redis.call('HEXISTS', KEYS[1], 'done') == 0 and
   redis.call('HGET', KEYS[1], 'try') == ARGV[1] then
  redis.call('HINCRBY', KEYS[1], 'attempts', -1)
  redis.call('HDEL', KEYS[1], 'try')
end
return 1
"""

# A failed redelivery uses an attempt. KEYS[1]: the id hash; ARGV[1]: as _COUNT's ARGV[2].
_CHARGE = """
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
if redis.call('TTL', KEYS[1]) == -1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return 1
"""

#: How long an id hash lives when a worker finds it gone and writes it again (its request
#: outlived it: the producer's expiry had passed): the scripts above give it this one, so
#: no hash of the queue is left without an expiry, however late its request runs.
_EXPIRING = str(DEDUPE_EXTRA_S)


@dataclass
class Ticket:
    """What the worker holding one entry knows about it across its tries."""

    req: AsyncRequest | None = None
    #: True once the id hash counts the try in progress: later tries of the same
    #: count (after a transient failure that keeps it) do not count again.
    counted: bool = False
    #: The token the current count was (or may have been) made with.
    token: str | None = None
    #: The request's counted attempts, as last read.
    attempts: int = 0
    #: When the request first failed transiently (wall clock; from the id hash).
    transient_since: float | None = None
    #: Transient failures in a row on this worker (sets the backoff).
    tries: int = 0
    #: A try found the whole object store unreachable (the breaker tripped).
    store_down: bool = False


def _describe(e: Exception, inference_id: str) -> tuple[str, str]:
    """The error code and the message a failure object carries (never the input's bytes)."""
    if isinstance(e, RuntimeServiceError):
        return e.code, e.message
    # The exception's text stays in the log: it may quote what was read.
    log.error("Async request %s failed unexpectedly", inference_id, exc_info=e)
    return "InternalFailure", (f"The worker failed processing the request "
                               f"({type(e).__name__}): see its log")


class Processor:
    """Carries out tries; one per worker process."""

    def __init__(self, settings: AsyncWorkerSettings, slot: ModelSlot, redis: Any,
                 store: ObjectStore, notifier: Notifier, pool: ThreadPoolExecutor,
                 confinement: Confinement) -> None:
        self.settings = settings
        self.slot = slot
        self.redis = redis
        #: Redis's clock less ours, seconds (the worker measures it): request TTLs run on
        #: Redis's clock, which stamped their stream entries (``AsyncRequest.expired``).
        self.clock_offset_s = 0.0
        self.store = store
        self.notifier = notifier
        self.pool = pool
        self.threads = InferenceThreads(pool, settings.inference_threads)
        self.confinement = confinement
        self.keys = AsyncQueueKeys(queue=settings.queue)
        endpoint = settings.endpoint_name or settings.queue
        self._outcomes = {o: metrics.ASYNC_REQUESTS.labels(endpoint, o)
                          for o in ("success", "failure", "dead_letter", "expired")}
        self._retries = metrics.ASYNC_RETRIES.labels(endpoint)
        self._processing = metrics.ASYNC_PROCESSING_SECONDS.labels(endpoint)
        self._count = redis.register_script(_COUNT)
        self._transient = redis.register_script(_TRANSIENT)
        self._charge = redis.register_script(_CHARGE)
        self._released = redis.register_script(_RELEASED)

    async def count(self, id_key: str, ticket: Ticket) -> dict[str, str]:
        """The id hash, this try counted unless the ticket's count still stands."""
        if ticket.counted:
            state: dict[str, str] = await self.redis.hgetall(id_key)
            return state
        ticket.token = ticket.token or uuid.uuid4().hex
        flat = await self._count(keys=[id_key], args=[ticket.token, _EXPIRING])
        ticket.counted = True
        return dict(zip(flat[::2], flat[1::2], strict=True))

    async def record_transient(self, ticket: Ticket, since: float, *, give_back: bool,
                               charge: bool, error: Exception) -> None:
        """Remember in the id hash since when the request fails transiently; give back
        the attempt this try used, or charge one for a failed redelivery. Best effort:
        Redis may be the outage (the next try's count is idempotent, so nothing is
        counted twice either way)."""
        if ticket.req is None:
            return
        token = ticket.token if give_back and ticket.token else ""
        try:
            await self._transient(keys=[self.keys.inference(ticket.req.inference_id)],
                                  args=[token, repr(since), f"{type(error).__name__}: {error}",
                                        "1" if charge else "", _EXPIRING])
        except Exception as e:
            log.debug("Could not record the transient failure of %s (%s)",
                      ticket.req.inference_id, e)

    async def give_back(self, ticket: Ticket) -> None:
        """The try was stopped unfinished by a shutdown: not the request's fault, so its
        attempt is given back (a request longer than the drain would otherwise be failed
        after maxRetries rolling updates or scale-downs). Best effort: counted, it is
        charged as a crash would be."""
        if ticket.req is None or not ticket.counted or not ticket.token:
            return
        with contextlib.suppress(Exception):
            await self._released(keys=[self.keys.inference(ticket.req.inference_id)],
                                 args=[ticket.token])

    async def charge(self, ticket: Ticket) -> None:
        """A redelivery the receiver refused: it uses an attempt (best effort)."""
        if ticket.req is not None:
            with contextlib.suppress(Exception):
                await self._charge(keys=[self.keys.inference(ticket.req.inference_id)],
                                   args=[_EXPIRING])

    async def process(self, msg_id: str, fields: dict[str, str], ticket: Ticket) -> None:
        """One try; returns when the entry is settled (acknowledged or re-queued)."""
        try:
            req = AsyncRequest.from_fields(fields)
        except ValueError as e:
            await self._dead_letter_malformed(msg_id, fields, str(e))
            return
        forged = self.confinement.destination_problem(req, time.time())
        if forged:
            # Not written anywhere: a location outside the endpoint's paths did not
            # come from our gateway.
            await self._dead_letter_malformed(msg_id, fields, forged)
            return
        ticket.req = req
        id_key = self.keys.inference(req.inference_id)
        # One round trip: the state, and this try counted (harmless when done).
        state = await self.count(id_key, ticket)
        attempts = ticket.attempts = int(state.get("attempts") or 0)
        if state.get("transient_since"):
            since = float(state["transient_since"])
            ticket.transient_since = min(since, ticket.transient_since or since)
        if state.get("done"):
            await self._redeliver(msg_id, req, state, attempts)
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
        now = time.time()
        if req.expired(now, entry_id=msg_id, queue_now=now + self.clock_offset_s):
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
        except Exception as e:
            kind = classify(e)
            if kind is Failure.TRANSIENT:
                raise  # the worker backs off; no attempt used within the budget
            code, message = _describe(e, req.inference_id)
            reason = f"{code}: {message}"
            if kind is Failure.PERMANENT:
                await self._fail(msg_id, req, code,
                                 f"Request {req.inference_id} failed: {reason} (not retried: "
                                 "the same input fails the same way)", attempts,
                                 dead_letter=False, outcome="failure")
                return
            await self.redis.hset(id_key, "last_error", reason)
            if attempts <= retries:
                log.info("Async request %s attempt %d failed (%s): re-queued",
                         req.inference_id, attempts, reason)
                await self._requeue(msg_id, req)
                return
            await self._fail(msg_id, req, code,
                             f"Request {req.inference_id} failed on all {attempts} attempt(s) "
                             f"(maxRetries {retries}); last error: {reason}", attempts,
                             dead_letter=True)
            return
        self._processing.observe(time.perf_counter() - started)
        note = notification(req, ok=True, now=time.time(), region=self.settings.s3_region or "",
                            output_content_type=content_type)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hincrby(id_key, "writes", 1)
        pipe.hset(id_key, mapping={"done": "success", "note": note})
        await pipe.execute()
        self._outcomes["success"].inc()
        await self._notify_and_ack(msg_id, req, ok=True, note=note)

    async def _redeliver(self, msg_id: str, req: AsyncRequest, state: dict[str, str],
                         attempts: int) -> None:
        """An earlier try finished and wrote its object, then died before acknowledging,
        or could not deliver its notification: notify again (at least once) and
        acknowledge. A redelivery is no attempt; a failed one is charged one when the
        receiver refused it, or was down for longer than the transient budget. Once
        the first delivery and maxRetries charged ones have failed, the webhook is
        given up on (the object exists; the entry is dead-lettered saying so), so a
        dead receiver cannot hold the backlog forever."""
        give_up = attempts > self.settings.max_retries
        reason = state.get("last_error", "")
        if give_up:
            reason = (f"Notification of request {req.inference_id} undeliverable after "
                      f"{attempts} deliveries: check the webhook receiver")
            log.error("%s", reason)
        await self._notify_and_ack(msg_id, req, ok=state["done"] == "success",
                                   note=state["note"].encode(),
                                   dead_letter=state.get("dlq", "") == "1" or give_up,
                                   reason=reason, notify=not give_up, redelivery=True)

    async def _infer(self, req: AsyncRequest) -> tuple[bytes, str]:
        model = self.slot.get()
        body = await asyncio.to_thread(self.store.read, req.input_location)
        encoding = codec.negotiate(req.accept or None)
        timeout = req.invocation_timeout_s
        limits = codec.DecodeLimits.for_settings(self.settings.max_payload_bytes,
                                                 self.settings.max_decoded_bytes)
        try:
            # The timeout runs from when a thread is free (``InferenceThreads``).
            payload, _ = await self.threads.run(timeout, invocations_work, model, body,
                                                req.content_type or None, encoding, limits)
        except TimeoutError:
            raise InferenceTimedOut(f"Model did not finish request {req.inference_id} within "
                                    f"its InvocationTimeoutSeconds ({timeout:g}s): send a "
                                    "longer timeout or a smaller input") from None
        return payload, encoding.content_type.decode()

    async def _requeue(self, msg_id: str, req: AsyncRequest) -> None:
        """A fresh copy at the tail, the original acknowledged: atomically."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.xadd(self.keys.stream, req.to_fields())
        pipe.xack(self.keys.stream, self.keys.group, msg_id)
        pipe.xdel(self.keys.stream, msg_id)
        # An outage before this try is over: the next one starts a new budget.
        pipe.hdel(self.keys.inference(req.inference_id), "transient_since")
        await pipe.execute()
        self._retries.inc()

    async def _fail(self, msg_id: str, req: AsyncRequest, code: str, message: str,
                    attempts: int, *, dead_letter: bool, outcome: str = "") -> None:
        body = failure_body(req, code, message, attempts)
        unwritten = ""
        try:
            await asyncio.to_thread(self.store.write, req.failure_location, body,
                                    "application/json")
        except Exception as e:
            unwritten = self._unwritten(e, req, message, dead_letter=dead_letter)
            # The dead letter is the only record left: the request goes there, acknowledged.
            message = f"{message}; no failure object was written ({unwritten})"
            dead_letter, outcome = True, "dead_letter"
        note = notification(req, ok=False, now=time.time(), region=self.settings.s3_region or "",
                            failure_reason=message)
        pipe = self.redis.pipeline(transaction=True)
        if not unwritten:
            pipe.hincrby(self.keys.inference(req.inference_id), "writes", 1)
        pipe.hset(self.keys.inference(req.inference_id), mapping={
            "done": "failure", "note": note, "dlq": "1" if dead_letter else "",
            "last_error": message})
        await pipe.execute()
        self._outcomes[outcome or ("dead_letter" if dead_letter else "failure")].inc()
        log.log(logging.ERROR if unwritten else logging.WARNING, "Async request %s failed%s: %s",
                req.inference_id, " (dead-lettered)" if dead_letter else "", message)
        await self._notify_and_ack(msg_id, req, ok=False, note=note, dead_letter=dead_letter,
                                   reason=message)

    @staticmethod
    def _unwritten(error: Exception, req: AsyncRequest, message: str, *,
                   dead_letter: bool) -> str:
        """Why the failure object will not be written; raises to wait for it instead.

        Waited for (the request stays pending, as after any transient failure) is
        only what may pass: the store being down — the failure waits for it, as
        every write does — and, while the request is not yet being dead-lettered,
        a refusal that can be fixed (permissions, a full disk, credentials). Those
        retries use the transient budget and then attempts, so the request comes
        back here dead-lettered. Anything else — a name no store can hold, a
        refusal outlasting every attempt — must not hold the request and a worker
        slot forever.
        """
        if trips_breaker(error):
            raise error
        if classify(error) is Failure.TRANSIENT and not dead_letter:
            # Recorded as the try's error: the dead letter of a later try still says why
            # the request failed, not only why its failure object could not be written.
            code, text = _describe(error, req.inference_id)
            raise ObjectStoreError(f"{message}; its failure object cannot be written yet "
                                   f"({code}: {text})") from None
        code, text = _describe(error, req.inference_id)
        return f"{code}: {text}"

    async def _notify_and_ack(self, msg_id: str, req: AsyncRequest, *, ok: bool, note: bytes,
                              dead_letter: bool = False, reason: str = "",
                              notify: bool = True, redelivery: bool = False) -> None:
        url = self.settings.success_url if ok else self.settings.error_url
        if notify and url:
            delivery = await self.notifier.deliver(url, note, req.inference_id)
            if delivery is not Delivery.DELIVERED:
                # Stays pending: delivered again after the visibility timeout.
                raise NotificationUndelivered(
                    f"Notification of request {req.inference_id} was not delivered "
                    f"({delivery.value})", transient=delivery is Delivery.UNREACHABLE,
                    redelivery=redelivery)
        pipe = self.redis.pipeline(transaction=True)
        if dead_letter:
            pipe.xadd(self.keys.dead_letter, {**req.to_fields(), "error": reason,
                                              "original_id": msg_id},
                      maxlen=DEAD_LETTER_MAX_ENTRIES, approximate=False)
        pipe.xack(self.keys.stream, self.keys.group, msg_id)
        # Finished entries leave the stream: its length stays the backlog.
        pipe.xdel(self.keys.stream, msg_id)
        await pipe.execute()

    async def _dead_letter_malformed(self, msg_id: str, fields: dict[str, str],
                                     problem: str) -> None:
        log.error("Async queue entry %s is malformed (%s): dead-lettered", msg_id, problem)
        pipe = self.redis.pipeline(transaction=True)
        pipe.xadd(self.keys.dead_letter, {**fields, "error": f"Malformed entry: {problem}",
                                          "original_id": msg_id},
                  maxlen=DEAD_LETTER_MAX_ENTRIES, approximate=False)
        pipe.xack(self.keys.stream, self.keys.group, msg_id)
        pipe.xdel(self.keys.stream, msg_id)
        await pipe.execute()
        self._outcomes["dead_letter"].inc()
