"""The operator's scaler: auto scaling and serverless scale-to-zero on Kubernetes.

Chosen channel (README "Serverless"): gateways never talk to the Kubernetes
API. A gateway holding requests for a cold variant POSTs a
``contract.ScaleRequest`` to the operator's scaler (``KUBEINFER_SCALER_URL``,
the chart's ``<release>-scaler`` Service in front of the operator pod); the
operator, which already owns the Deployments, sets their ``replicas``. So no
Role for the runtime, and one writer of ``replicas``.

Decisions are the pure ``reconcile.autoscale`` functions. Every refresh of an
Endpoint (its status daemon) calls :meth:`ClusterScaler.evaluate`, which scrapes
the gateway Service's ``/metrics`` (invocations, held and in-flight requests),
asks Prometheus for Custom queries, and stores the desired replicas. ``sync``
then renders the variant Deployments with :meth:`replicas_for` (a new spec never
undoes the scaler: without a decision yet, the Deployment's current replicas
are kept) and :meth:`reason_for` goes into ``status.variants[].lastScaling``;
each change is also a Kubernetes Event (reason ``Scaled``) and a log line.

``CPUUtilization`` is not scraped from pods here (the operator has no Pod
access by design): on Kubernetes give CPU policies a ``Custom`` PromQL query
over cAdvisor metrics, or it abstains.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
from aiohttp import web
from pydantic import ValidationError

from kubeinfer_operator.handlers.async_scaler import BacklogReader, evaluate_async
from kubeinfer_operator.reconcile import autoscale
from kubeinfer_operator.reconcile.autoscale_metrics import MetricWindow, parse_gateway_metrics
from kubeinfer_operator.render import k8s_meta as meta
from kubeinfer_operator.render.plan import EndpointPlan
from kubeinfer_runtime.contract import ScaleRequest

log = logging.getLogger(__name__)

#: Metrics window of the policies on Kubernetes (SageMaker evaluates per minute).
WINDOW_S = 60.0
REQUEST_FRESH_S = 10.0

Key = tuple[str, str, str]  # namespace, endpoint, variant


@dataclass
class _Memory:
    window: MetricWindow = field(default_factory=lambda: MetricWindow(WINDOW_S))
    state: autoscale.ScaleState = field(default_factory=autoscale.ScaleState)
    desired: int | None = None
    reason: str = ""
    last_activity: float | None = None
    last_invocations: float | None = None
    requested_at: float | None = None


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


class ClusterScaler:
    def __init__(self, *, port: int | None = None, redis_url: str | None = None) -> None:
        self.port = port
        #: Async endpoints' queue backlogs (the operator's KUBEINFER_REDIS_URL).
        self.read_backlog = BacklogReader(redis_url)
        self.memory: dict[Key, _Memory] = {}
        #: Called with (namespace, endpoint) when a scale request arrives.
        self.on_request: Callable[[str, str], Coroutine[Any, Any, None]] | None = None
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._pending: set[asyncio.Task[None]] = set()

    # -- the scale-request endpoint ----------------------------------------------------------

    async def start(self) -> None:
        if self.port is None:
            return
        app = web.Application()
        app.router.add_post("/scale", self._on_scale)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "0.0.0.0", self.port).start()
        log.info("Scaler listening on :%d/scale for gateways' scale-up requests", self.port)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()
        await self.read_backlog.close()

    async def _on_scale(self, request: web.Request) -> web.Response:
        try:
            scale = ScaleRequest.model_validate_json(await request.read())
        except ValidationError as exc:
            return web.json_response({"message": f"Invalid scale request: {exc}"}, status=400)
        if not scale.namespace:
            return web.json_response({"message": "Scale request names no namespace: set "
                                                 "KUBEINFER_NAMESPACE on the gateway"},
                                     status=400)
        self.request(scale.namespace, scale.endpoint, scale.variant)
        if self.on_request is not None:
            task = asyncio.create_task(self.on_request(scale.namespace, scale.endpoint))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)
        return web.json_response({"accepted": True}, status=202)

    def request(self, namespace: str, endpoint: str, variant: str) -> None:
        self._mem((namespace, endpoint, variant)).requested_at = time.monotonic()

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

    async def _prometheus(self, base: str, query: str) -> float | None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3))
        try:
            async with self._session.get(base.rstrip("/") + "/api/v1/query",
                                         params={"query": query}) as resp:
                result = (await resp.json())["data"]["result"]
                return float(result[0]["value"][1]) if result else None
        except (TimeoutError, aiohttp.ClientError, ValueError, KeyError, IndexError,
                TypeError) as exc:
            log.warning("Prometheus query %r on %s failed: %s", query, base, exc)
            return None

    async def evaluate(self, plan: EndpointPlan, namespace: str, gateway_url: str,
                       current: Mapping[str, int], now: datetime | None = None,
                       fetch: Fetch | None = None) -> list[str]:
        """Decide every scaled variant of ``plan``; returns the change messages.

        ``current``: each variant Deployment's replicas now.
        """
        if plan.async_config is not None:  # scaled on the queue backlog instead
            return await evaluate_async(self, plan, namespace, current, self.read_backlog,
                                        self.read_backlog.states)
        if plan.serverless is None and not any(v.autoscaling for v in plan.variants):
            return []
        fetch = fetch or self._fetch
        text = await fetch(gateway_url.rstrip("/") + "/metrics")
        view = parse_gateway_metrics(text or "", plan.name)
        now = now or datetime.now(UTC)
        now_m = time.monotonic()
        offset = now.timestamp() - now_m
        messages = []
        for variant in plan.variants:
            if plan.serverless is None and variant.autoscaling is None:
                continue
            key = (namespace, plan.name, variant.name)
            mem = self._mem(key)
            replicas = current.get(variant.name, variant.replicas)
            invocations = view.invocations.get(variant.name, 0.0)
            mem.window.add(now_m, invocations, {})
            if mem.last_invocations is not None and invocations != mem.last_invocations:
                mem.last_activity = now_m
            mem.last_invocations = invocations
            waiting = view.held.get(variant.name, 0.0) > 0 or (
                mem.requested_at is not None and now_m - mem.requested_at < REQUEST_FRESH_S
                and replicas == 0)
            if waiting:  # per variant; in-flight is per endpoint (see local.scaler)
                mem.last_activity = now_m
            values: dict[str, float | None] = {
                autoscale.Metric.INVOCATIONS_PER_REPLICA.value:
                    mem.window.invocations_per_replica_per_minute(replicas)}
            policy = variant.autoscaling
            if policy is not None and policy.prometheus_url:
                for k in policy.metric_keys():
                    if k.startswith("custom:"):
                        values[k] = await self._prometheus(policy.prometheus_url,
                                                           k[len("custom:"):])
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

    def replicas_for(self, plan: EndpointPlan, namespace: str,
                     deployments: Mapping[str, Mapping[str, Any]]) -> EndpointPlan:
        """``plan`` with the scaler's replicas for scaled variants (PURE given memory)."""
        from dataclasses import replace

        variants = []
        for v in plan.variants:
            scaled = (plan.serverless is not None or v.autoscaling is not None
                      or plan.async_config is not None)
            mem = self.memory.get((namespace, plan.name, v.name))
            if scaled and mem is not None and mem.desired is not None:
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
