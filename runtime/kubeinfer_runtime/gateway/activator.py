"""The serverless activator: admission (maxConcurrency) and holding requests on a cold start.

SageMaker real-time endpoints fail requests while scaling from zero; we hold
them instead. For a ``type: Serverless`` endpoint the hot path (``proxy``):

1. ``admit``: counts the request in flight, or refuses it with 429
   ThrottlingException (``Retry-After: 1``) when ``max_concurrency`` requests
   are already in flight (held ones included), so the queue of held requests is
   bounded by the same number and never grows without limit. A request is
   admitted once its body is read (and its caller authenticated), so a caller
   trickling a body holds a connection, bounded by the listener, never a slot;
   without auth, ``full`` answers the 429 before the body is read when every
   slot is taken already;
2. when no variant can take it (zero ready replicas), ``hold`` asks the scaler
   for a replica (``POST <scaler_url>`` with a ``contract.ScaleRequest``, at most
   once per ``RESEND_S`` per variant, off the request path) and waits, polling
   the route table every ``POLL_S`` (and, on Kubernetes, re-resolving the
   variant's headless Service every ``REDISCOVER_S``) so the request goes out
   as soon as a ready replica appears; after ``cold_start_timeout_s`` it
   answers 503. When the scaler answers that the variant's last start failed
   (``contract.scale.StartFailed``: its model failed to load, its server exited
   or ran out of memory), the requests held for it (and new ones, until the
   scaler tries again) are answered 503 at once, naming the variant, with
   ``Retry-After`` until the scaler's next try;
3. ``release`` when the answer is sent.

Why a POST and not a shared channel: the gateway and the scaler are separate
processes (local supervisor, or the operator on Kubernetes); a tiny HTTP call
works for both and the scaler also notices held requests through the gateway's
``kubeinfer_gateway_held_requests`` gauge if the POST is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from urllib.parse import urlsplit

from pydantic import ValidationError

from kubeinfer_runtime import metrics
from kubeinfer_runtime.contract import ScaleRequest
from kubeinfer_runtime.contract.scale import START_FAILED_STATUS, StartFailed
from kubeinfer_runtime.errors import NotReady, RuntimeServiceError, Throttled
from kubeinfer_runtime.gateway.core import GatewayCore
from kubeinfer_runtime.gateway.loops import rediscover_routes, reload_routes
from kubeinfer_runtime.gateway.routing import EndpointState, Pick, choose, unknown_endpoint
from kubeinfer_runtime.gateway.upstream import UpstreamClient, UpstreamError

log = logging.getLogger("kubeinfer.gateway")

#: How often held requests look for a ready replica (and the route file is polled).
POLL_S = 0.02
#: A variant still cold this long after a scale request is asked again.
RESEND_S = 1.0
#: How often held requests re-resolve per-pod (DNS) upstreams on Kubernetes.
REDISCOVER_S = 0.25
_SCALER_TIMEOUT_S = 2.0
#: ``Retry-After`` of a 429 (maxConcurrency) and of a 503 after coldStartTimeout, seconds.
RETRY_AFTER_S = 1


def start_failure(status: int, body: bytes) -> StartFailed | None:
    """The scaler's word that a variant's last start failed, from its answer (PURE)."""
    if status != START_FAILED_STATUS:
        return None
    try:
        return StartFailed.model_validate_json(body)
    except ValidationError:
        return None  # a standby's or a proxy's 503: not about the variant


def _retry_after(seconds: float) -> list[tuple[bytes, bytes]]:
    return [(b"retry-after", str(max(1, math.ceil(seconds))).encode())]


class Activator:
    def __init__(self, core: GatewayCore) -> None:
        self.core = core
        self.in_flight: dict[str, int] = {}
        self.held: dict[tuple[str, str], int] = {}
        self._asked: dict[tuple[str, str], float] = {}
        #: (endpoint, variant) whose last start failed -> (until when, monotonic; what).
        #: Keys are route-table variants only, so it is bounded by the table.
        self._failed: dict[tuple[str, str], tuple[float, str]] = {}
        self._client = UpstreamClient(max_idle=2)
        self._poller: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        scaler = core.settings.scaler_url
        self._scaler: tuple[str, bytes] | None = None
        if scaler:
            parts = urlsplit(scaler)
            self._scaler = (f"{parts.scheme}://{parts.netloc}", (parts.path or "/").encode())
        token = core.settings.scaler_token
        self._scaler_headers = [(b"content-type", b"application/json")] + (
            [(b"authorization", b"Bearer " + token.get_secret_value().encode())]
            if token is not None else [])

    # -- admission -------------------------------------------------------------------------

    def full(self, endpoint: EndpointState) -> Throttled | None:
        """The 429 to answer when every maxConcurrency slot is taken (counts nothing)."""
        assert endpoint.serverless is not None
        limit = endpoint.serverless.max_concurrency
        current = self.in_flight.get(endpoint.name, 0)
        if current < limit:
            return None
        throttled = Throttled(f'Endpoint "{endpoint.name}" has {current} requests in flight, '
                              f"its maxConcurrency is {limit}: retry with backoff, or raise "
                              "spec.serverless.maxConcurrency")
        throttled.headers = _retry_after(RETRY_AFTER_S)
        return throttled

    def admit(self, endpoint: EndpointState) -> Throttled | None:
        """Count one request in flight, or the 429 to answer when over the limit."""
        throttled = self.full(endpoint)
        if throttled is not None:
            return throttled
        current = self.in_flight.get(endpoint.name, 0) + 1
        self.in_flight[endpoint.name] = current
        metrics.GATEWAY_IN_FLIGHT.labels(endpoint.name).set(current)
        return None

    def release(self, name: str) -> None:
        left = max(self.in_flight.get(name, 1) - 1, 0)
        self.in_flight[name] = left
        metrics.GATEWAY_IN_FLIGHT.labels(name).set(left)

    # -- holding ---------------------------------------------------------------------------

    def _cold_variants(self, endpoint: EndpointState, target: str | None) -> list[str]:
        down = self.core.health.down
        if target is not None:
            variant = endpoint.by_name.get(target)
            return [target] if variant is not None and not variant.has_healthy(down) else []
        return [v.name for v in endpoint.weighted if not v.has_healthy(down)]

    async def hold(self, endpoint: EndpointState, target: str | None,
                   refusal: RuntimeServiceError) -> Pick | RuntimeServiceError:
        """Wait (bounded) until a replica can take the request; the pick or the refusal."""
        assert endpoint.serverless is not None
        if not isinstance(refusal, NotReady):
            return refusal  # unknown variant and the like: holding would not help
        name = endpoint.name
        waiting = self._cold_variants(endpoint, target)
        if not waiting:
            return refusal
        timeout = endpoint.serverless.cold_start_timeout_s
        started = time.monotonic()
        keys = [(name, v) for v in waiting]
        for key in keys:
            self.held[key] = self.held.get(key, 0) + 1
            metrics.GATEWAY_HELD.labels(*key).set(self.held[key])
        self._ensure_poller()
        try:
            while True:
                self._ask(keys, endpoint)
                failed = self._start_failed(keys, endpoint)
                if failed is not None:
                    return failed
                await asyncio.sleep(POLL_S)
                current = self.core.routes.endpoints.get(name)
                if current is None:
                    return unknown_endpoint(name)
                pick = choose(current, target, self.core.health.down, self.core.rng)
                if isinstance(pick, Pick):
                    waited = time.monotonic() - started
                    metrics.GATEWAY_COLD_START_WAIT_SECONDS.labels(
                        name, pick.variant.name).observe(waited)
                    log.info("Held request for endpoint %s sent to variant %s after %.3fs",
                             name, pick.variant.name, waited)
                    return pick
                if time.monotonic() - started >= timeout:
                    late = NotReady(
                        f'Endpoint "{name}": no replica of variant(s) {", ".join(waiting)} '
                        f"became ready within {timeout:g}s (coldStartTimeout): retry later, or "
                        "set spec.serverless.provisionedConcurrency to keep replicas warm")
                    late.headers = _retry_after(RETRY_AFTER_S)
                    return late
                endpoint = current
        finally:
            for key in keys:
                self.held[key] = max(self.held.get(key, 1) - 1, 0)
                metrics.GATEWAY_HELD.labels(*key).set(self.held[key])

    def waiting(self) -> int:
        return sum(self.held.values())

    def _start_failed(self, keys: list[tuple[str, str]],
                      endpoint: EndpointState) -> NotReady | None:
        """The 503 to answer when the last start of every variant the request waits for
        failed and the scaler has not tried again yet; None to keep holding."""
        now = time.monotonic()
        found = []
        for key in keys:
            failure = self._failed.get(key)
            if failure is None:
                return None
            until, what = failure
            if now >= until:
                del self._failed[key]  # the scaler tries again: hold for that try
                return None
            found.append((key[1], until - now, what))
        if not found:
            return None
        names = ", ".join(f'"{v}" ({what})' for v, _, what in found)
        wait = min(left for _, left, _ in found)
        refusal = NotReady(
            f'Endpoint "{endpoint.name}": variant {names} failed to start a replica; the '
            f"scaler tries again in {math.ceil(wait)}s: retry then, and fix the variant if it "
            "persists (its scaling events say why)")
        refusal.headers = _retry_after(wait)
        return refusal

    def _ensure_poller(self) -> None:
        if self._poller is None or self._poller.done():
            self._poller = asyncio.create_task(self._poll_routes(), name="activator-poll")

    async def _poll_routes(self) -> None:
        """Re-read the route table quickly while requests are held (the regular
        reload loop may run only every second)."""
        last_dns = 0.0
        while self.waiting() > 0:
            try:
                reload_routes(self.core)
                if time.monotonic() - last_dns >= REDISCOVER_S:
                    last_dns = time.monotonic()
                    await rediscover_routes(self.core)
            except Exception:
                log.exception("Route table reload for held requests failed: retrying")
            await asyncio.sleep(POLL_S)

    def _ask(self, keys: list[tuple[str, str]], endpoint: EndpointState) -> None:
        if self._scaler is None:
            return
        now = time.monotonic()
        for key in keys:
            last = self._asked.get(key)
            if last is not None and now - last < RESEND_S:
                continue
            self._asked[key] = now
            body = ScaleRequest(endpoint=key[0], variant=key[1],
                                namespace=self.core.settings.namespace,
                                waiting=self.held.get(key, 1)).model_dump_json().encode()
            task = asyncio.create_task(self._post(body, key))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    def note_answer(self, key: tuple[str, str], status: int, body: bytes) -> bool:
        """Remember what the scaler answered a scale request for ``key`` (endpoint,
        variant); True when it said the variant's last start failed."""
        failure = start_failure(status, body)
        if failure is None:
            if status < 300:
                self._failed.pop(key, None)  # it starts a replica again: hold for it
            return False
        if key not in self._failed:
            log.warning("Scaler: the last start of %s/%s failed (%s); its held requests are "
                        "answered 503 for %gs", key[0], key[1], failure.start_failed,
                        failure.retry_after_s)
        self._failed[key] = (time.monotonic() + failure.retry_after_s, failure.start_failed)
        return True

    async def _post(self, body: bytes, key: tuple[str, str]) -> None:
        assert self._scaler is not None
        base, path = self._scaler
        try:
            response = await self._client.request(base, b"POST", path, self._scaler_headers,
                                                  body, _SCALER_TIMEOUT_S)
            if self.note_answer(key, response.status, response.body):
                return
            if response.status >= 300:
                log.warning("Scaler %s answered %d to a scale-up of %s/%s: %s", base,
                            response.status, key[0], key[1], response.body[:200])
            else:
                log.info("Asked scaler %s for a replica of %s/%s", base, key[0], key[1])
        except UpstreamError as exc:
            log.warning("Scaler %s unreachable for a scale-up of %s/%s: %s (retrying while "
                        "requests are held)", base, key[0], key[1], exc.detail)

    async def close(self) -> None:
        for task in [*self._background, *([self._poller] if self._poller else [])]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self._client.close()
