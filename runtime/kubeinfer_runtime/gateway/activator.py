"""The serverless activator: admission (maxConcurrency) and holding requests on a cold start.

SageMaker real-time endpoints fail requests while scaling from zero; we hold
them instead. For a ``type: Serverless`` endpoint the hot path (``proxy``):

1. ``admit``: counts the request in flight, or refuses it with 429
   ThrottlingException when ``max_concurrency`` requests are already in flight
   (held ones included), so the queue of held requests is bounded by the same
   number and never grows without limit;
2. when no variant can take it (zero ready replicas), ``hold`` asks the scaler
   for a replica (``POST <scaler_url>`` with a ``contract.ScaleRequest``, at most
   once per ``RESEND_S`` per variant, off the request path) and waits, polling
   the route table every ``POLL_S`` (and, on Kubernetes, re-resolving the
   variant's headless Service every ``REDISCOVER_S``) so the request goes out
   as soon as a ready replica appears; after ``cold_start_timeout_s`` it
   answers 503;
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
import time
from urllib.parse import urlsplit

from kubeinfer_runtime import metrics
from kubeinfer_runtime.contract import ScaleRequest
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


class Activator:
    def __init__(self, core: GatewayCore) -> None:
        self.core = core
        self.in_flight: dict[str, int] = {}
        self.held: dict[tuple[str, str], int] = {}
        self._asked: dict[tuple[str, str], float] = {}
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

    def admit(self, endpoint: EndpointState) -> Throttled | None:
        """Count one request in flight, or the 429 to answer when over the limit."""
        assert endpoint.serverless is not None
        limit = endpoint.serverless.max_concurrency
        current = self.in_flight.get(endpoint.name, 0)
        if current >= limit:
            return Throttled(f'Endpoint "{endpoint.name}" has {current} requests in flight, its '
                             f"maxConcurrency is {limit}: retry with backoff, or raise "
                             "spec.serverless.maxConcurrency")
        self.in_flight[endpoint.name] = current + 1
        metrics.GATEWAY_IN_FLIGHT.labels(endpoint.name).set(current + 1)
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
                    return NotReady(
                        f'Endpoint "{name}": no replica of variant(s) {", ".join(waiting)} '
                        f"became ready within {timeout:g}s (coldStartTimeout): retry later, or "
                        "set spec.serverless.provisionedConcurrency to keep replicas warm")
                endpoint = current
        finally:
            for key in keys:
                self.held[key] = max(self.held.get(key, 1) - 1, 0)
                metrics.GATEWAY_HELD.labels(*key).set(self.held[key])

    def waiting(self) -> int:
        return sum(self.held.values())

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

    async def _post(self, body: bytes, key: tuple[str, str]) -> None:
        assert self._scaler is not None
        base, path = self._scaler
        try:
            response = await self._client.request(base, b"POST", path, self._scaler_headers,
                                                  body, _SCALER_TIMEOUT_S)
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
