"""The operator's scaler: auto scaling and serverless scale-to-zero on Kubernetes (I/O).

Chosen channel (README "Serverless"): gateways never talk to the Kubernetes
API. A gateway holding requests for a cold variant POSTs a
``contract.ScaleRequest`` to the operator's scaler (``KUBEINFER_SCALER_URL``,
the chart's ``<release>-scaler`` Service in front of the operator pod); the
operator, which already owns the Deployments, sets their ``replicas``. So no
Role for the runtime, and one writer of ``replicas``.

Decisions are pure (``reconcile.cluster_scaling`` over ``reconcile.autoscale``);
this module only gathers their inputs. Every refresh of an Endpoint (its
status daemon) calls :meth:`ClusterScaler.evaluate`, which scrapes
``/metrics`` of every ready gateway pod (invocations, held and in-flight
requests), asks Prometheus for Custom queries, and stores the desired
replicas. ``sync`` then renders the variant Deployments with
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
flood costs neither API calls nor memory. Honoured requests are coalesced
per Endpoint (:meth:`ClusterScaler.schedule_round`), so a flood of valid ones
costs at most two rounds at a time, and the rounds they ask for start at most
once per ``ROUND_INTERVAL_S`` per Endpoint (the first at once: a cold start
waits for nothing; without the spacing a namespace's token made the operator
run rounds back to back, ~200 API requests a second against the emulator).
The listener's connections are bounded in
count and lifetime, and gateway and Prometheus answers in size
(``http_bounds``).

Every gateway pod, not the gateway Service: with ``gatewayReplicas`` > 1 the
Service hands each scrape to one pod, whose counts are a fraction of the
traffic and flip between pods. The pods are listed from the API by the labels
the operator renders on them and reached at the IPs their kubelets reported
(``k8s.pods``), never through a Service's DNS name: those Services live in the
tenant's namespace, and an editor there could repoint one (``ExternalName``,
another selector) to make the operator scrape a host of their choosing and
act on its numbers (``reconcile.pod_addresses``). They are scraped
concurrently with a timeout (a dead pod costs at most that and is skipped),
and their counters summed per variant by ``CounterSum``, so a restarted or
vanished pod never makes a negative or bogus rate. A round whose pods cannot
be listed in time is skipped whole (``GatewaysUnknown``), so no pod's counter
is forgotten for it.

``CPUUtilization`` is not scraped from pods here (the operator reads no pod
metrics by design): a variant scaled on CPUUtilization alone gets a
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
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Collection, Coroutine, Mapping
from datetime import UTC, datetime
from typing import Any

import aiohttp
from aiohttp import web
from pydantic import ValidationError

from kubeinfer_operator.errors import ClusterError
from kubeinfer_operator.http_bounds import (
    MAX_METRICS_BYTES,
    MAX_QUERY_BYTES,
    AnswerLimit,
    BoundedListener,
)
from kubeinfer_operator.k8s.client import KubeClient
from kubeinfer_operator.k8s.peering import Peering
from kubeinfer_operator.k8s.pods import ready_pod_urls, variant_start_failure
from kubeinfer_operator.reconcile.autoscale_metrics import GatewayView, parse_gateway_metrics
from kubeinfer_operator.reconcile.cluster_scaling import (
    ScalerMemory,
    authorized_scale,
    custom_metric_variants,
)
from kubeinfer_operator.reconcile.promql_scope import (
    DEFAULT_PROMQL_NAMESPACE_LABEL,
    prometheus_url_problem,
    scope_problem,
    with_namespace,
)
from kubeinfer_operator.reconcile.start_failure import StartFailure
from kubeinfer_operator.render import k8s_autoscaling
from kubeinfer_operator.render import k8s_meta as meta
from kubeinfer_operator.render.async_plan import queue_name
from kubeinfer_operator.render.plan import EndpointPlan
from kubeinfer_operator.scaling.backlog import BacklogReader
from kubeinfer_operator.scaling.start_failures import (
    StartFailureLookups,
    start_failed_response,
)
from kubeinfer_runtime.contract import AsyncBacklog, ScaleRequest
from kubeinfer_runtime.contract.outbound import (
    OutboundPolicy,
    redact_url,
    url_problem,
)
from kubeinfer_runtime.contract.outbound_io import guarded_connector

log = logging.getLogger(__name__)

#: Longest wait for one gateway pod's /metrics: a dead pod is skipped after this.
SCRAPE_TIMEOUT_S = 2.0
#: Largest scale-request body accepted, bytes.
MAX_REQUEST_BYTES = 4096
#: Rounds asked for by scale requests start at most this often per Endpoint, seconds
#: (gateways repeat a request once a second while they hold requests).
ROUND_INTERVAL_S = 1.0

Fetch = Callable[[str], Awaitable[str | None]]
#: (namespace, endpoint) → base URLs (``http://10.0.0.7:9090``) of the metrics
#: listeners of its ready gateway pods.
Discover = Callable[[str, str], Awaitable[list[str]]]
ReadBacklog = Callable[[str], Awaitable[AsyncBacklog]]


class GatewaysUnknown(ClusterError):
    """An Endpoint's gateway pods could not be listed in time (this round is skipped)."""


class ClusterScaler(ScalerMemory):
    """The scale-request server and the scrapes and queries behind each decision."""

    def __init__(self, *, port: int | None = None, redis_url: str | None = None,
                 monotonic: Callable[[], float] = time.monotonic,
                 outbound: OutboundPolicy | None = None,
                 signing_key: bytes | None = None,
                 kube: KubeClient | None = None,
                 metrics_port: int | None = None,
                 promql_label: str = DEFAULT_PROMQL_NAMESPACE_LABEL) -> None:
        """``kube`` and ``metrics_port`` (the gateways' metrics listener): where gateway
        pods are listed and scraped (either None: none are found, as in tests that set
        ``discover``)."""
        super().__init__()
        self.port = port
        #: Scale requests carry ``scaler_token(signing_key, namespace)``.
        self.signing_key = signing_key if signing_key is not None else secrets.token_bytes(32)
        #: Where Prometheus queries may go (None: the default policy, no allow-list).
        self.outbound = outbound if outbound is not None else OutboundPolicy.parse()
        #: The label every selector of a tenant's PromQL must pin to its namespace
        #: (``reconcile.promql_scope``; empty: not checked).
        self.promql_label = promql_label
        #: Times the metrics window and scale requests (tests pass a fake clock).
        self.monotonic = monotonic
        #: Async endpoints' queue backlogs (the operator's KUBEINFER_REDIS_URL).
        self.backlog_reader = BacklogReader(redis_url)
        #: Reads a queue's backlog (tests put their own in).
        self.read_backlog: ReadBacklog = self.backlog_reader
        #: Called with (namespace, endpoint) when a scale request arrives.
        self.on_request: Callable[[str, str], Coroutine[Any, Any, None]] | None = None
        #: Which replica acts (HA); None: this one always does (a single replica).
        self.peering: Peering | None = None
        self._listener: BoundedListener | None = None
        self._session: aiohttp.ClientSession | None = None
        #: Prometheus queries: URLs from specs, so through the guarded connector.
        self._prometheus_session: aiohttp.ClientSession | None = None
        self._pending: set[asyncio.Task[None]] = set()
        #: (namespace, endpoint) whose requested round is scheduled or running -> whether
        #: a request came after it started (then one more round follows it).
        self._rounds: dict[tuple[str, str], bool] = {}
        #: Least time between the starts of two requested rounds of one Endpoint.
        self.round_interval_s = ROUND_INTERVAL_S
        self._metrics_limit = AnswerLimit(MAX_METRICS_BYTES, "Gateway metrics")
        self._query_limit = AnswerLimit(MAX_QUERY_BYTES, "Prometheus answer")
        self.kube = kube
        self.metrics_port = metrics_port
        #: Whether a requested variant's start failed (its pods, read at a bounded pace).
        self.start_failures = StartFailureLookups(self.variant_start_failure, monotonic)
        #: Finds the gateway pods (from the API; tests inject their own).
        self.discover: Discover = self.gateway_pods
        self.scrape_timeout_s = SCRAPE_TIMEOUT_S

    # -- the scale-request endpoint ----------------------------------------------------------

    async def start(self) -> None:
        if self.port is None:
            return
        # A scale request is ~150 bytes: anything much bigger is not one.
        app = web.Application(client_max_size=MAX_REQUEST_BYTES)
        app.router.add_post("/scale", self._on_scale)
        self._listener = BoundedListener(app, "0.0.0.0", self.port)
        await self._listener.start()
        log.info("Scaler listening on :%d/scale for gateways' scale-up requests", self.port)

    async def drop_queue(self, namespace: str, endpoint: str) -> None:
        """Remove a deleted Endpoint's async queue (``backlog``: why); a Redis that cannot
        be reached is logged, not raised: the deletion goes on without it."""
        queue = queue_name(namespace, endpoint)
        try:
            dropped = await self.backlog_reader.drop(queue)
        except Exception as e:  # redis-py raises its own and OSErrors
            log.warning("Could not remove the queue of deleted Endpoint %s/%s from Redis "
                        "(%s); its keys stay until removed by hand", namespace, endpoint,
                        type(e).__name__)
            return
        if dropped:
            log.info("Removed the async queue of deleted Endpoint %s/%s from Redis",
                     namespace, endpoint)

    async def close(self) -> None:
        self.start_failures.close()
        if self._listener is not None:
            await self._listener.close()
        for session in (self._session, self._prometheus_session):
            if session is not None:
                await session.close()
        await self.backlog_reader.close()

    async def _on_scale(self, request: web.Request) -> web.Response:
        """Honour a gateway's scale request: only with its namespace's token, only for a
        scaled Endpoint of that namespace the operator knows. Everything else is answered
        at once (401/403/404/400) without a reconcile and without keeping anything."""
        header = request.headers.get("Authorization", "")
        token = header[len("Bearer "):].strip() if header.startswith("Bearer ") else ""
        if not token or not token.isascii():  # no issued token has other characters
            return web.json_response(
                {"message": f"Scale request has {'a malformed' if token else 'no'} bearer "
                            "token: gateways send their namespace's token "
                            "(KUBEINFER_SCALER_TOKEN, from the kubeinfer-runtime Secret)"},
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
        if not authorized_scale(token, self.signing_key, scale.namespace):
            return web.json_response(
                {"message": f"Scale request token is not valid for namespace "
                            f"{scale.namespace[:63]!r}: a gateway may only scale Endpoints of "
                            "its own namespace"}, status=403)
        if self.peering is not None and not await self.peering.active(scale.namespace):
            # A standby's kopf is paused and knows no Endpoint. Closing the connection
            # makes the gateway's next try (it repeats every second while it holds
            # requests) open a new one, which the Service may send to the active replica.
            return web.json_response(
                {"message": "This operator replica is a standby; the active replica scales "
                            "(retry)"},
                status=503, headers={"Retry-After": "1", "Connection": "close"})
        variants = self.known.get((scale.namespace, scale.endpoint))
        if variants is None or scale.variant not in variants:
            return web.json_response(
                {"message": f"No scaled variant {scale.endpoint[:63]}/{scale.variant[:63]} in "
                            f"namespace {scale.namespace[:63]}"}, status=404)
        self.request(scale.namespace, scale.endpoint, scale.variant)
        self.schedule_round(scale.namespace, scale.endpoint)
        failure = await self.start_failures.get(scale.namespace, scale.endpoint, scale.variant)
        if failure is not None:
            # Its callers are answered at once now, so the gateway's held-requests gauge
            # no longer shows them: the refused request is the variant's traffic, and it
            # must not be scaled in as idle while callers keep asking (Kubernetes keeps
            # restarting its pods meanwhile; without callers, idleTimeout scales it in).
            self._mem((scale.namespace, scale.endpoint, scale.variant)).last_activity = (
                self.monotonic())
            return start_failed_response(failure, scale.namespace, scale.endpoint,
                                         scale.variant)
        return web.json_response({"accepted": True}, status=202)

    async def variant_start_failure(self, namespace: str, endpoint: str,
                                    variant: str) -> StartFailure | None:
        """From the API (None without a client, as in tests that run no cluster)."""
        if self.kube is None:
            return None
        return await variant_start_failure(self.kube, namespace, endpoint, variant)

    def request(self, namespace: str, endpoint: str, variant: str) -> None:
        self.mark_requested((namespace, endpoint, variant), self.monotonic())

    def schedule_round(self, namespace: str, endpoint: str) -> None:
        """Have ``on_request`` run for the Endpoint: one round at a time per Endpoint.

        Gateways repeat a request every second per held variant, so requests are
        coalesced: while a round is scheduled it covers them; once it runs (it may
        have read its inputs already) a request asks for one more round after it,
        and no more than one waits, so no scale-from-zero request is lost and a
        flood costs at most two rounds per Endpoint. That next round starts
        ``round_interval_s`` after the last one started, not sooner.
        """
        if self.on_request is None:
            return
        key = (namespace, endpoint)
        if key in self._rounds:
            self._rounds[key] = True
            return
        self._rounds[key] = False
        task = asyncio.create_task(self._run_rounds(key, self.on_request))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _run_rounds(self, key: tuple[str, str],
                          handle: Callable[[str, str], Coroutine[Any, Any, None]]) -> None:
        loop = asyncio.get_running_loop()
        try:
            again = True
            while again:
                self._rounds[key] = False  # requests until now: this round sees them
                started = loop.time()
                try:
                    await handle(*key)
                except Exception:  # the next request (or the Endpoint's refresh) retries
                    log.exception("Scaling round of Endpoint %s/%s failed", *key)
                # Requests meanwhile and until the interval is over share one round.
                rest = self.round_interval_s - (loop.time() - started)
                if rest > 0:
                    await asyncio.sleep(rest)
                # Checked and removed with no await in between: a later request
                # finds no round and starts its own.
                again = self._rounds[key]
        finally:
            del self._rounds[key]

    # -- decisions ---------------------------------------------------------------------------

    async def _fetch(self, url: str) -> str | None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3))
        try:
            async with self._session.get(url) as resp:
                if resp.status != 200:
                    return None
                body = await self._metrics_limit.read(resp, url)
        except (TimeoutError, aiohttp.ClientError):
            return None
        return body.decode("utf-8", "replace") if body is not None else None

    async def _prometheus(self, base: str, query: str, namespace: str,
                          field: str = "autoscaling.prometheusUrl") -> float | None:
        """The value of PromQL ``query`` (an Endpoint's in ``namespace``, ``{namespace}``
        not yet filled in) on ``base``; None when unknown or refused."""
        problem = url_problem(base, self.outbound, field)
        query = with_namespace(query, namespace)
        # Checked at admission too (validate_endpoint); again here, as sent, because the
        # value goes back to the Endpoint's author.
        problem = (problem or prometheus_url_problem(base, self.promql_label, field)
                   or scope_problem(query, namespace, self.promql_label, field))
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
                body = await self._query_limit.read(resp, redact_url(base))
                if body is None:
                    return None  # warned once per Prometheus
                result = json.loads(body)["data"]["result"]
                return float(result[0]["value"][1]) if result else None
        except (TimeoutError, aiohttp.ClientError, ValueError, KeyError, IndexError,
                TypeError, RecursionError) as exc:  # RecursionError: JSON nested too deep
            log.warning("Prometheus query %r on %s failed: %s", query, redact_url(base), exc)
            return None

    async def query_prometheus(self, base: str, query: str, namespace: str,
                               field: str) -> float | None:
        """``query``'s value on ``base`` (outbound policy and namespace scope checked;
        None: unknown/refused)."""
        return await self._prometheus(base, query, namespace, field)

    async def gateway_pods(self, namespace: str, endpoint: str) -> list[str]:
        """Metrics URLs of the Endpoint's ready gateway pods, listed by the labels the
        operator renders on them (``k8s.pods``): no Service, no DNS name."""
        if self.kube is None or self.metrics_port is None:
            return []
        return await ready_pod_urls(self.kube, namespace,
                                    meta.pod_selector(endpoint, meta.COMPONENT_GATEWAY),
                                    self.metrics_port)

    async def find_gateways(self, namespace: str, endpoint: str) -> list[str]:
        """``discover``, bounded like a scrape (a slow API must not hold the decision);
        raises ``GatewaysUnknown`` (a ``ClusterError``) when it took longer."""
        try:
            return await asyncio.wait_for(self.discover(namespace, endpoint),
                                          self.scrape_timeout_s)
        except TimeoutError:
            raise GatewaysUnknown(f"Listing the gateway pods of Endpoint {namespace}/"
                                  f"{endpoint} timed out; this round is skipped") from None

    async def scrape(self, namespace: str, endpoint: str,
                     fetch: Fetch) -> dict[str, GatewayView | None]:
        """Each ready gateway pod's view of ``endpoint``, by pod URL (None: its scrape
        failed); empty when no gateway pod is ready."""
        urls = await self.find_gateways(namespace, endpoint)

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

    async def evaluate(self, plan: EndpointPlan, namespace: str,
                       current: Mapping[str, int], now: datetime | None = None,
                       fetch: Fetch | None = None,
                       held: Collection[str] = ()) -> list[str]:
        """Decide every scaled variant of ``plan``; returns the change messages.

        ``current``: each variant Deployment's replicas now. ``held``: variants
        whose guarded rollout runs (not scaled meanwhile). Raises ``ClusterError``
        (``GatewaysUnknown``) when the gateway pods cannot be listed: no decision then.
        """
        if plan.async_config is not None:  # scaled on the queue backlog instead
            return await self.evaluate_backlog(plan, namespace, current)
        self.hand_over_to_hpas(plan, namespace)
        if not k8s_autoscaling.scrapes_gateway(plan):
            return []
        views = await self.scrape(namespace, plan.name, fetch or self._fetch)
        custom: dict[str, dict[str, float | None]] = {}
        for path, variant, url, queries in custom_metric_variants(plan):
            field = f"Endpoint {namespace}/{plan.name}: {path}.autoscaling.prometheusUrl"
            custom[variant] = {f"custom:{q}": await self._prometheus(url, q, namespace, field)
                               for q in queries}
        return self.decide_scraped(plan, namespace, current, views, custom,
                                   now=now or datetime.now(UTC), now_m=self.monotonic(),
                                   held=held)

    async def evaluate_backlog(self, plan: EndpointPlan, namespace: str,
                               current: Mapping[str, int]) -> list[str]:
        """Decide an async ``plan``'s workers from its queue backlog (read from Redis)."""
        cfg = plan.async_config
        if cfg is None or not plan.variants:
            return []
        try:
            backlog = await self.read_backlog(cfg.queue)
        except Exception as exc:
            log.warning("Endpoint %s/%s: cannot read the async backlog (%s); replicas "
                        "unchanged", namespace, plan.name, exc)
            return []
        return self.decide_backlog(plan, namespace, current, backlog.total, self.monotonic())
