"""The operator's scaler: auto scaling and serverless scale-to-zero on Kubernetes.

Chosen channel (README "Serverless"): gateways never talk to the Kubernetes
API. A gateway holding requests for a cold variant POSTs a
``contract.ScaleRequest`` to the operator's scaler (``KUBEINFER_SCALER_URL``,
the chart's ``<release>-scaler`` Service in front of the operator pod); the
operator, which already owns the Deployments, sets their ``replicas``. So no
Role for the runtime, and one writer of ``replicas``.

Decisions are the pure ``reconcile.autoscale`` functions. Every refresh of an
Endpoint (its status daemon) calls :meth:`ClusterScaler.evaluate`, which
scrapes ``/metrics`` of every ready gateway pod (invocations, held and
in-flight requests), asks Prometheus for Custom queries, and stores the
desired replicas. ``sync`` then renders the variant Deployments with
:meth:`replicas_for` (a new spec never undoes the scaler: without a decision
yet, the Deployment's current replicas are kept) and :meth:`reason_for` goes
into ``status.variants[].lastScaling``; each change is also a Kubernetes Event
(reason ``Scaled``) and a log line.

Scale requests are authenticated: a gateway presents its namespace's token
(``render.k8s_secrets.scaler_token``, an HMAC of the namespace under the
operator's signing key, delivered through the namespace's runtime Secret), and
the scaler honours it only for a scaled Endpoint of that namespace it
reconciles (``known``, kept by ``EndpointSync``). Anything else is answered
401/403/404 at once, without a reconcile and without remembering it, so a
flood costs neither API calls nor memory.

Every gateway pod, not the gateway Service: with ``gatewayReplicas`` > 1 the
Service hands each scrape to one pod, whose counts are a fraction of the
traffic and flip between pods. The pods are found through the headless
``<endpoint>-gateway-pods`` Service (its DNS name resolves to the ready pods'
addresses), scraped concurrently with a timeout (a dead pod costs at most
that and is skipped), and their counters summed per variant by
``CounterSum``, so a restarted or vanished pod never makes a negative or
bogus rate. Where the name does not resolve (an operator run outside the
cluster), the gateway Service's one view is used as before.

``CPUUtilization`` is not scraped from pods here (the operator has no Pod
access by design): a variant scaled on CPUUtilization alone gets a
HorizontalPodAutoscaler (``render.k8s_autoscaling``) and this scaler abstains
for it; any other CPU policy is refused as InvalidSpec with the fix.

``autoscaling.prometheusUrl`` is the Endpoint author's, and the operator holds
a cluster-wide token: Prometheus queries obey the outbound policy
(``contract.outbound``, ``KUBEINFER_OUTBOUND_ALLOW``): the URL is checked
before each query, the connection goes through the guarded connector (its
own session, apart from the gateway scrapes) and redirects are not followed.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from pydantic import ValidationError

from kubeinfer_operator.handlers.async_scaler import BacklogReader, evaluate_async
from kubeinfer_operator.reconcile import autoscale
from kubeinfer_operator.reconcile.autoscale_metrics import (
    CounterSum,
    GatewayView,
    MetricWindow,
    parse_gateway_metrics,
    sum_views,
)
from kubeinfer_operator.render import k8s_autoscaling
from kubeinfer_operator.render import k8s_meta as meta
from kubeinfer_operator.render.k8s_secrets import scaler_token
from kubeinfer_operator.render.plan import EndpointPlan
from kubeinfer_runtime.contract import ScaleRequest
from kubeinfer_runtime.contract.outbound import (
    OutboundPolicy,
    redact_url,
    url_problem,
)
from kubeinfer_runtime.contract.outbound_io import guarded_connector

log = logging.getLogger(__name__)

#: Metrics window of the policies on Kubernetes (SageMaker evaluates per minute).
WINDOW_S = 60.0
REQUEST_FRESH_S = 10.0
#: Longest wait for one gateway pod's /metrics: a dead pod is skipped after this.
SCRAPE_TIMEOUT_S = 2.0

Key = tuple[str, str, str]  # namespace, endpoint, variant
#: Largest scale-request body accepted, bytes.
MAX_REQUEST_BYTES = 4096


def authorized_scale(token: str, signing_key: bytes, namespace: str) -> bool:
    """Whether ``token`` is the one issued to gateways of ``namespace`` (constant time)."""
    expected = scaler_token(signing_key, namespace)
    return hmac.compare_digest(token.encode(), expected.encode())


@dataclass
class _Memory:
    window: MetricWindow = field(default_factory=lambda: MetricWindow(WINDOW_S))
    #: Invocations summed over the gateway pods (by pod URL).
    invocations: CounterSum = field(default_factory=CounterSum)
    state: autoscale.ScaleState = field(default_factory=autoscale.ScaleState)
    desired: int | None = None
    reason: str = ""
    last_activity: float | None = None
    last_invocations: float | None = None
    requested_at: float | None = None
    #: An HPA scales this variant (``reason`` says which).
    by_hpa: bool = False


def scaling_event(namespace: str, endpoint: str, uid: str, message: str,
                  now: datetime) -> dict[str, Any]:
    """A core/v1 Event on the Endpoint (``kubectl describe kie NAME`` shows it): PURE."""
    stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"generateName": f"{endpoint}.", "namespace": namespace},
        "involvedObject": {"apiVersion": "kubeinfer.io/v1alpha1", "kind": "Endpoint",
                           "name": endpoint, "namespace": namespace, "uid": uid},
        "reason": "Scaled", "message": message[:1024], "type": "Normal",
        "source": {"component": "kubeinfer-operator"},
        "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1,
    }


Fetch = Callable[[str], Awaitable[str | None]]
#: Base URLs (``http://10.0.0.7:8080``) of the pods behind a headless Service URL;
#: None when its name does not resolve.
Discover = Callable[[str], Awaitable[list[str] | None]]


async def discover_pods(service_url: str) -> list[str] | None:
    """The ready pods behind a headless Service: its DNS name's A/AAAA records."""
    parts = urlsplit(service_url)
    host, port = parts.hostname, parts.port or 80
    if host is None:
        return None
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port,
                                                             type=socket.SOCK_STREAM)
    except OSError as exc:  # socket.gaierror: no such name, or no ready pod behind it
        log.debug("Cannot resolve %s: %s", host, exc)
        return None
    addresses = sorted({str(info[4][0]) for info in infos})
    return [f"http://[{a}]:{port}" if ":" in a else f"http://{a}:{port}" for a in addresses]


class ClusterScaler:
    def __init__(self, *, port: int | None = None, redis_url: str | None = None,
                 monotonic: Callable[[], float] = time.monotonic,
                 outbound: OutboundPolicy | None = None,
                 signing_key: bytes | None = None) -> None:
        self.port = port
        #: Scale requests carry ``scaler_token(signing_key, namespace)``.
        self.signing_key = signing_key if signing_key is not None else secrets.token_bytes(32)
        #: Scaled Endpoints the operator reconciles, and their variants: a scale
        #: request for anything else is refused at once, and leaves nothing behind.
        self.known: dict[tuple[str, str], frozenset[str]] = {}
        #: Where Prometheus queries may go (None: the default policy, no allow-list).
        self.outbound = outbound if outbound is not None else OutboundPolicy.parse()
        #: Times the metrics window and scale requests (tests pass a fake clock).
        self.monotonic = monotonic
        #: Async endpoints' queue backlogs (the operator's KUBEINFER_REDIS_URL).
        self.read_backlog = BacklogReader(redis_url)
        self.memory: dict[Key, _Memory] = {}
        #: Called with (namespace, endpoint) when a scale request arrives.
        self.on_request: Callable[[str, str], Coroutine[Any, Any, None]] | None = None
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        #: Prometheus queries: URLs from specs, so through the guarded connector.
        self._prometheus_session: aiohttp.ClientSession | None = None
        self._pending: set[asyncio.Task[None]] = set()
        #: Finds the gateway pods (DNS; tests inject their own).
        self.discover: Discover = discover_pods
        self.scrape_timeout_s = SCRAPE_TIMEOUT_S

    # -- the scale-request endpoint ----------------------------------------------------------

    async def start(self) -> None:
        if self.port is None:
            return
        # A scale request is ~150 bytes: anything much bigger is not one.
        app = web.Application(client_max_size=MAX_REQUEST_BYTES)
        app.router.add_post("/scale", self._on_scale)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "0.0.0.0", self.port).start()
        log.info("Scaler listening on :%d/scale for gateways' scale-up requests", self.port)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        for session in (self._session, self._prometheus_session):
            if session is not None:
                await session.close()
        await self.read_backlog.close()

    async def _on_scale(self, request: web.Request) -> web.Response:
        """Honour a gateway's scale request: only with its namespace's token, only for a
        scaled Endpoint of that namespace the operator knows. Everything else is answered
        at once (401/403/404/400) without a reconcile and without keeping anything."""
        header = request.headers.get("Authorization", "")
        if not header.startswith("Bearer ") or not header[len("Bearer "):].strip():
            return web.json_response(
                {"message": "Scale request has no bearer token: gateways send their "
                            "namespace's token (KUBEINFER_SCALER_TOKEN, from the "
                            "kubeinfer-runtime Secret)"},
                status=401, headers={"WWW-Authenticate": "Bearer"})
        try:
            scale = ScaleRequest.model_validate_json(await request.read())
        except ValidationError as exc:
            return web.json_response(
                {"message": f"Invalid scale request: {exc.error_count()} problem(s) in the "
                            "body: send a contract.ScaleRequest"}, status=400)
        except web.HTTPRequestEntityTooLarge:
            return web.json_response({"message": "Scale request body too large"}, status=413)
        if not scale.namespace:
            return web.json_response({"message": "Scale request names no namespace: set "
                                                 "KUBEINFER_NAMESPACE on the gateway"},
                                     status=400)
        if not authorized_scale(header[len("Bearer "):].strip(), self.signing_key,
                                scale.namespace):
            return web.json_response(
                {"message": f"Scale request token is not valid for namespace "
                            f"{scale.namespace[:63]!r}: a gateway may only scale Endpoints of "
                            "its own namespace"}, status=403)
        variants = self.known.get((scale.namespace, scale.endpoint))
        if variants is None or scale.variant not in variants:
            return web.json_response(
                {"message": f"No scaled variant {scale.endpoint[:63]}/{scale.variant[:63]} in "
                            f"namespace {scale.namespace[:63]}"}, status=404)
        self.request(scale.namespace, scale.endpoint, scale.variant)
        if self.on_request is not None:
            task = asyncio.create_task(self.on_request(scale.namespace, scale.endpoint))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)
        return web.json_response({"accepted": True}, status=202)

    def register(self, namespace: str, endpoint: str, variants: frozenset[str] | None) -> None:
        """Record which variants of an Endpoint scale requests may name (None: none)."""
        if variants:
            self.known[(namespace, endpoint)] = variants
        else:
            self.known.pop((namespace, endpoint), None)

    def forget(self, namespace: str, endpoint: str) -> None:
        """A deleted Endpoint: nothing about it stays in memory."""
        self.known.pop((namespace, endpoint), None)
        for k in [k for k in self.memory if k[:2] == (namespace, endpoint)]:
            del self.memory[k]

    def request(self, namespace: str, endpoint: str, variant: str) -> None:
        self._mem((namespace, endpoint, variant)).requested_at = self.monotonic()

    def _mem(self, key: Key) -> _Memory:
        mem = self.memory.get(key)
        if mem is None:
            mem = self.memory[key] = _Memory()
        return mem

    # -- decisions ---------------------------------------------------------------------------

    async def _fetch(self, url: str) -> str | None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3))
        try:
            async with self._session.get(url) as resp:
                return await resp.text() if resp.status == 200 else None
        except (TimeoutError, aiohttp.ClientError):
            return None

    async def _prometheus(self, base: str, query: str,
                          field: str = "autoscaling.prometheusUrl") -> float | None:
        """The value of PromQL ``query`` on ``base``; None when unknown or refused."""
        problem = url_problem(base, self.outbound, field)
        if problem is not None:
            log.warning("Prometheus query %r not sent: %s", query, problem)
            return None
        if self._prometheus_session is None:
            self._prometheus_session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=3), connector=guarded_connector(self.outbound))
        try:
            async with self._prometheus_session.get(base.rstrip("/") + "/api/v1/query",
                                                    params={"query": query},
                                                    allow_redirects=False) as resp:
                if resp.status != 200:  # a 3xx too: redirects are not followed
                    raise ValueError(f"HTTP {resp.status}")
                result = (await resp.json())["data"]["result"]
                return float(result[0]["value"][1]) if result else None
        except (TimeoutError, aiohttp.ClientError, ValueError, KeyError, IndexError,
                TypeError) as exc:
            log.warning("Prometheus query %r on %s failed: %s", query, redact_url(base), exc)
            return None

    async def scrape(self, endpoint: str, gateway_url: str, pods_url: str | None,
                     fetch: Fetch) -> dict[str, GatewayView | None]:
        """Each gateway pod's view of ``endpoint``, by pod URL (None: its scrape failed).

        Pods come from the headless Service ``pods_url``; when it does not
        resolve, the gateway Service ``gateway_url`` stands for them all.
        """
        urls = None
        if pods_url:
            try:  # bounded: a slow resolver must not hold the decision either
                urls = await asyncio.wait_for(self.discover(pods_url), self.scrape_timeout_s)
            except TimeoutError:
                log.warning("Endpoint %s: resolving %s timed out", endpoint, pods_url)
        if not urls:
            urls = [gateway_url.rstrip("/")]

        async def one(url: str) -> GatewayView | None:
            try:
                text = await asyncio.wait_for(fetch(url + "/metrics"), self.scrape_timeout_s)
            except TimeoutError:
                text = None
            if text is None:
                log.warning("Endpoint %s: no metrics from gateway %s; skipped this round",
                            endpoint, url)
                return None
            try:
                return parse_gateway_metrics(text, endpoint)
            except ValueError as exc:  # not Prometheus text: not our gateway
                log.warning("Endpoint %s: gateway %s served unreadable metrics: %s", endpoint,
                            url, exc)
                return None

        views = await asyncio.gather(*(one(u) for u in urls))
        return dict(zip(urls, views, strict=True))

    async def evaluate(self, plan: EndpointPlan, namespace: str, gateway_url: str,
                       current: Mapping[str, int], now: datetime | None = None,
                       fetch: Fetch | None = None,
                       pods_url: str | None = None) -> list[str]:
        """Decide every scaled variant of ``plan``; returns the change messages.

        ``current``: each variant Deployment's replicas now. ``pods_url``: the
        headless Service over the gateway pods (None: scrape ``gateway_url``).
        """
        if plan.async_config is not None:  # scaled on the queue backlog instead
            return await evaluate_async(self, plan, namespace, current, self.read_backlog,
                                        self.read_backlog.states)
        self.hand_over_to_hpas(plan, namespace)
        if not k8s_autoscaling.scrapes_gateway(plan):
            return []
        views = await self.scrape(plan.name, gateway_url, pods_url, fetch or self._fetch)
        answered = {url: v for url, v in views.items() if v is not None}
        summed = sum_views(answered.values())
        now = now or datetime.now(UTC)
        now_m = self.monotonic()
        offset = now.timestamp() - now_m
        hpa = k8s_autoscaling.hpa_variants(plan)
        messages = []
        for index, variant in enumerate(plan.variants):
            if (plan.serverless is None and variant.autoscaling is None) or variant.name in hpa:
                continue
            key = (namespace, plan.name, variant.name)
            mem = self._mem(key)
            replicas = current.get(variant.name, variant.replicas)
            # A pod that answered without the variant's series counts 0 (restarted).
            invocations = mem.invocations.update(
                {url: v.invocations.get(variant.name, 0.0) for url, v in answered.items()},
                keep=views.keys())
            mem.window.add(now_m, invocations, {})
            if mem.last_invocations is not None and invocations != mem.last_invocations:
                mem.last_activity = now_m
            mem.last_invocations = invocations
            waiting = summed.held.get(variant.name, 0.0) > 0 or (
                mem.requested_at is not None and now_m - mem.requested_at < REQUEST_FRESH_S
                and replicas == 0)
            if waiting:  # per variant; in-flight is per endpoint (see local.scaler)
                mem.last_activity = now_m
            values: dict[str, float | None] = {
                autoscale.Metric.INVOCATIONS_PER_REPLICA.value:
                    mem.window.invocations_per_replica_per_minute(replicas)}
            policy = variant.autoscaling
            if policy is not None and policy.prometheus_url:
                field = (f"Endpoint {namespace}/{plan.name}: spec.variants[{index}]"
                         ".autoscaling.prometheusUrl")
                for k in policy.metric_keys():
                    if k.startswith("custom:"):
                        values[k] = await self._prometheus(policy.prometheus_url,
                                                           k[len("custom:"):], field)
            serverless = plan.serverless_policy
            if serverless is not None:
                last = None if mem.last_activity is None else mem.last_activity + offset
                decision = autoscale.decide_serverless(serverless, policy, replicas, values,
                                                       mem.state, last, waiting, now)
            else:
                assert policy is not None
                decision = autoscale.decide(policy, replicas, values, mem.state, now)
            mem.state = decision.state
            if decision.desired != replicas:
                # Remembered only when the scaler changes something: until then
                # the Deployment's own replicas are the truth (replicas_for).
                mem.desired = decision.desired
                mem.reason = decision.reason
                message = f"Variant {variant.name}: {decision.reason}"
                log.info("Endpoint %s/%s: %s", namespace, plan.name, message)
                messages.append(message)
        return messages

    def hand_over_to_hpas(self, plan: EndpointPlan, namespace: str) -> None:
        """Forget our decisions for variants an HPA scales; :meth:`reason_for` then says so.

        ``sync`` calls it before :meth:`replicas_for`, so a variant whose spec just
        turned CPU-only never gets a stale decision of ours, and if it comes
        back to our policies they start from the Deployment's replicas.
        """
        for variant in plan.variants:
            reason = k8s_autoscaling.hpa_reason(plan.name, namespace, plan, variant)
            key = (namespace, plan.name, variant.name)
            mem = self.memory.get(key)
            if reason is not None and (mem is None or mem.reason != reason):
                self.memory[key] = _Memory(reason=reason, by_hpa=True)
            elif reason is None and mem is not None and mem.by_hpa:
                del self.memory[key]  # back to our policies: a fresh start

    def replicas_for(self, plan: EndpointPlan, namespace: str,
                     deployments: Mapping[str, Mapping[str, Any]]) -> EndpointPlan:
        """``plan`` with the scaler's replicas for scaled variants (PURE given memory).

        A variant an HPA scales keeps its Deployment's replicas as they are
        (render leaves them out of the manifest anyway).
        """
        from dataclasses import replace

        hpa = k8s_autoscaling.hpa_variants(plan)
        variants = []
        for v in plan.variants:
            scaled = (plan.serverless is not None or v.autoscaling is not None
                      or plan.async_config is not None)
            mem = self.memory.get((namespace, plan.name, v.name))
            if v.name in hpa:
                existing = deployments.get(meta.variant_object_name(plan.name, v.name))
                n = ((existing or {}).get("spec") or {}).get("replicas")
                if isinstance(n, int):
                    v = replace(v, replicas=n)
            elif scaled and mem is not None and mem.desired is not None:
                v = replace(v, replicas=mem.desired)
            elif scaled:
                existing = deployments.get(meta.variant_object_name(plan.name, v.name))
                spec = (existing or {}).get("spec") or {}
                if isinstance(spec.get("replicas"), int):
                    n = int(spec["replicas"])
                    if v.autoscaling is not None:
                        n = min(max(n, v.autoscaling.min_replicas), v.autoscaling.max_replicas)
                    v = replace(v, replicas=n)
            variants.append(v)
        return replace(plan, variants=tuple(variants))

    def reason_for(self, namespace: str, endpoint: str, variant: str) -> str | None:
        mem = self.memory.get((namespace, endpoint, variant))
        return mem.reason if mem is not None and mem.reason else None
