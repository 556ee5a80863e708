"""Data capture, the I/O: a tap per capturing endpoint, and the task that uploads.

``CaptureTap.observe`` runs on the request path (see ``taps``): one sampling
draw, then an append to the endpoint's bounded ``CaptureBuffer``; a record
whose bodies are small is encoded there too (``capture.Record.of``: a few µs,
half of what the same work costs later, cold), a larger one later. Nothing is
written there. ``CaptureTaps.run`` (a background task of the gateway) uploads a
batch when an endpoint's buffer reaches ``capture_batch_bytes`` or its oldest
record ``capture_flush_interval_s``: what is not encoded yet is encoded on the
loop in slices, and each object is written in a thread
(``queue.objects.ObjectStore``: the minio SDK for s3://, temp file + rename for
file://). A failed upload puts its records back and is retried with a backoff;
meanwhile new records still go into the buffer, which drops its oldest past
``capture_buffer_bytes`` (counted as ``dropped``). On shutdown what is buffered
gets ``capture_shutdown_timeout_s`` to be written.

Nothing here logs or quotes captured bytes: messages name the endpoint, the
destination, counts and error types.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from typing import Any

from kubeinfer_runtime import metrics
from kubeinfer_runtime.contract import EndpointRoute, GatewaySettings, RouteTable
from kubeinfer_runtime.contract.capture import CaptureRoute
from kubeinfer_runtime.gateway.capture import (
    CaptureBuffer,
    Heads,
    Objects,
    Record,
    encode_into,
    object_folder,
    object_uri,
    sampled,
)
from kubeinfer_runtime.gateway.taps import Exchange, Tap
from kubeinfer_runtime.queue.objects import ObjectStore

log = logging.getLogger("kubeinfer.gateway")

WRITTEN = "written"
DROPPED = "dropped"
SAMPLED_OUT = "sampled_out"
#: Retry backoff after a failed upload: doubles from the first up to the last, seconds.
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 5.0
_CONTENT_TYPE = "application/jsonl"


class CaptureTap:
    """One endpoint's capture: samples on the request path, buffers within a bound."""

    def __init__(self, endpoint: str, route: CaptureRoute, buffer_bytes: int,
                 rng: random.Random, wake: Callable[[], None], batch_bytes: int) -> None:
        self.endpoint = endpoint
        self.route = route
        self.buffer = CaptureBuffer(buffer_bytes)
        self._rng = rng
        self._wake = wake
        self._batch_bytes = batch_bytes
        self._counters: dict[tuple[str, str], Any] = {}
        self._gauge = metrics.CAPTURE_BUFFER_BYTES.labels(endpoint)
        #: Set when its endpoint left the table or stopped capturing: drain, then forget.
        self.retired = False
        self.failures = 0
        self.retry_at = 0.0
        #: eventId of the last exchange sampled in: a shadow tap, which observes right
        #: after this one, captures its copy's answer exactly when production's was.
        self.last_event_id = ""
        #: ``capture_line``'s cache for the records encoded as they are buffered (keyed
        #: by the route's id: emptied when the route changes).
        self.heads: Heads = {}

    def observe(self, exchange: Exchange) -> None:
        route = self.route
        percentage = route.sampling_percentage
        # At 100 % every draw is in: no draw.
        if self.retired or (percentage < 100.0
                            and not sampled(self._rng.random(), percentage)):
            self.count(exchange.variant, SAMPLED_OUT)
            return
        self.last_event_id = exchange.event_id
        self.add(exchange)

    def add(self, exchange: Exchange) -> None:
        """Buffer ``exchange`` without a sampling draw (a shadow's answer to a request
        whose production answer was captured: same eventId, the shadow as variant)."""
        buffer = self.buffer
        dropped = buffer.append(Record.of(exchange, self.route, time.monotonic(), self.heads))
        if dropped:
            for variant in dropped:
                self.count(variant, DROPPED)
        # The buffer-bytes gauge is published by the upload loop's rounds, not here.
        if buffer.waiting_bytes >= self._batch_bytes:
            self._wake()

    def count(self, variant: str, result: str, n: int = 1) -> None:
        key = (variant, result)
        child = self._counters.get(key)
        if child is None:
            child = self._counters[key] = metrics.CAPTURE_RECORDS.labels(self.endpoint, variant,
                                                                         result)
        child.inc(n)

    def publish_bytes(self) -> None:
        self._gauge.set(self.buffer.bytes)


#: Records encoded between two turns of the event loop (~0.1 ms of work).
ENCODE_SLICE = 48


async def encode_on_loop(records: tuple[Record, ...]) -> Objects:
    """The batch's objects, encoded on the event loop in slices (requests run between).

    Encoding is pure Python (CPU, holding the GIL): done in a worker thread it would
    also hold the GIL, and the event loop, which gives the GIL up on every socket
    call, would wait for the thread's next switch each time (a convoy that cost a
    quarter of the gateway's throughput at 100 % capture). On the loop, in slices,
    a request waits at most one slice. Only the write, which waits on I/O, goes to
    a thread.
    """
    objects: Objects = {}
    heads: Heads = {}
    for start in range(0, len(records), ENCODE_SLICE):
        encode_into(objects, records[start:start + ENCODE_SLICE], heads)
        await asyncio.sleep(0)
    return objects


class CaptureTaps:
    """The gateway's capture taps, by endpoint, and their upload loop.

    A tap provider for ``GatewayCore.apply``: ``apply(table)`` returns each
    endpoint's taps, keeping an endpoint's tap (and its buffer) across reloads.
    """

    def __init__(self, settings: GatewaySettings, *, rng: random.Random | None = None,
                 store: ObjectStore | None = None) -> None:
        self.buffer_bytes = settings.capture_buffer_bytes
        self.batch_bytes = min(settings.capture_batch_bytes, settings.capture_buffer_bytes)
        self.interval_s = settings.capture_flush_interval_s
        self.store = store or ObjectStore(settings.s3(), connections=4)
        self.rng = rng or random.Random()
        self.taps: dict[str, CaptureTap] = {}
        self.retired: list[CaptureTap] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def _wake_up(self) -> None:
        self._wake.set()

    def apply(self, table: RouteTable) -> dict[str, tuple[Tap, ...]]:
        """Each endpoint's capture taps under ``table`` (endpoints that capture only)."""
        out: dict[str, tuple[Tap, ...]] = {}
        wanted: dict[str, EndpointRoute] = {r.name: r for r in table.endpoints.values()
                                            if r.capture is not None}
        for name in [n for n in self.taps if n not in wanted]:
            self._retire(self.taps.pop(name))
        for name, route in wanted.items():
            assert route.capture is not None
            tap = self.taps.get(name) or self._revive(name)
            if tap is not None and name not in self.taps:  # revived: capturing again
                self.taps[name] = tap
                tap.route = route.capture
                tap.heads = {}
                log.info("Endpoint %s captures %g%% of requests to %s again", name,
                         route.capture.sampling_percentage, route.capture.destination)
            elif tap is None:
                tap = self.taps[name] = CaptureTap(name, route.capture, self.buffer_bytes,
                                                   self.rng, self._wake_up, self.batch_bytes)
                log.info("Endpoint %s captures %g%% of requests to %s", name,
                         route.capture.sampling_percentage, route.capture.destination)
            elif tap.route != route.capture:
                log.info("Endpoint %s now captures %g%% of requests to %s", name,
                         route.capture.sampling_percentage, route.capture.destination)
                tap.route = route.capture
                tap.heads = {}
            out[name] = (tap,)
        return out

    def _revive(self, name: str) -> CaptureTap | None:
        """The retired tap of endpoint ``name`` still holding records, back in service.

        A tap is retired when its endpoint stops capturing and kept until its records
        are written. Without this, capture turned off and on again while the
        destination refuses writes (the endpoint's author chooses it) kept one full
        buffer per toggle, past ``KUBEINFER_CAPTURE_BUFFER_BYTES``; with it, an
        endpoint has one buffer, live or retired. Its records keep their destination.
        """
        for tap in self.retired:
            if tap.endpoint == name:
                self.retired.remove(tap)
                tap.retired = False
                return tap
        return None

    def _retire(self, tap: CaptureTap) -> None:
        tap.retired = True
        if tap.buffer.bytes:
            self.retired.append(tap)
            self._wake.set()

    def all(self) -> list[CaptureTap]:
        return [*self.taps.values(), *self.retired]

    # -- the upload loop -------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="capture-upload")

    async def run(self) -> None:
        """Upload due batches until stopped and drained. Never dies on an error."""
        tick = max(0.05, min(1.0, self.interval_s / 4))
        while True:
            try:
                busy = await self._round()
            except Exception:
                log.exception("Data capture upload round failed unexpectedly: trying again")
                busy = False
            if self._stopping and not any(t.buffer.waiting for t in self.all()):
                return
            if busy:
                continue
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(tick):
                    await self._wake.wait()

    async def _round(self) -> bool:
        """One pass over the taps; True when a batch was written and more may be due."""
        now = time.monotonic()
        wrote = False
        for tap in self.all():
            tap.publish_bytes()
            buffer = tap.buffer
            due = ((self._stopping or tap.retired) and bool(buffer.waiting)
                   ) or buffer.due(now, self.batch_bytes, self.interval_s)
            if due and now >= tap.retry_at:
                wrote = await self._flush(tap) or wrote
        self.retired = [t for t in self.retired if t.buffer.bytes]
        return wrote

    async def _flush(self, tap: CaptureTap) -> bool:
        batch = tap.buffer.take(self.batch_bytes)
        if batch is None:
            return False
        written: list[Record] = []
        try:
            # One object per (destination, variant, hour); each written object's
            # records are counted as they go, so a failure midway gives back only
            # what was not written (no record is written twice).
            now = time.time()
            objects = await encode_on_loop(batch.records)
            for (destination, variant, hour), (lines, records) in objects.items():
                uri = object_uri(destination, tap.endpoint, variant, object_folder(hour), now)
                await asyncio.to_thread(self.store.write, uri, b"".join(lines), _CONTENT_TYPE)
                written.extend(records)
                tap.count(variant, WRITTEN, len(records))
        except Exception as exc:
            done = {id(r) for r in written}
            for variant in tap.buffer.give_back(tuple(r for r in batch.records
                                                      if id(r) not in done)):
                tap.count(variant, DROPPED)
            tap.publish_bytes()
            tap.failures += 1
            delay = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (tap.failures - 1))
            tap.retry_at = time.monotonic() + delay
            metrics.CAPTURE_UPLOAD_FAILURES.labels(tap.endpoint).inc()
            if tap.failures == 1:
                log.warning("Endpoint %s: writing captured data to %s failed (%s): keeping up "
                            "to %d bytes in memory and retrying; the oldest records are "
                            "dropped past that", tap.endpoint, tap.route.destination,
                            _describe(exc), self.buffer_bytes)
            return False
        tap.buffer.done()
        tap.publish_bytes()
        if tap.failures:
            log.info("Endpoint %s: captured data is written to %s again", tap.endpoint,
                     tap.route.destination)
        tap.failures = 0
        tap.retry_at = 0.0
        return True

    async def close(self, timeout_s: float) -> None:
        """Write what is buffered, within ``timeout_s``; what is left then is counted as
        dropped and logged."""
        self._stopping = True
        self._wake.set()
        task = self._task
        if task is None:
            self.start()
            task = self._task
        assert task is not None
        try:
            async with asyncio.timeout(timeout_s):
                await task
        except TimeoutError:
            pass
        finally:
            self._task = None
        for tap in self.all():
            left = list(tap.buffer.waiting)
            if tap.buffer.in_flight is not None:
                left += tap.buffer.in_flight.records
            if left:
                for r in left:
                    tap.count(r.variant, DROPPED)
                log.warning("Endpoint %s: %d captured record(s) were not written to %s before "
                            "shutdown (%gs): the store is slow or unreachable", tap.endpoint,
                            len(left), tap.route.destination, timeout_s)


def _describe(exc: BaseException) -> str:
    """An upload error for the log: our store errors say what failed, others their type."""
    from kubeinfer_runtime.errors import RuntimeServiceError

    if isinstance(exc, RuntimeServiceError):
        return str(exc)
    return type(exc).__name__
