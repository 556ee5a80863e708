"""Local mode's scaler: auto scaling and serverless scale-to-zero for one endpoint.

Runs inside the endpoint's supervisor. Every ``interval_s`` (and at once when
the gateway's activator POSTs a ``contract.ScaleRequest`` to ``/scale``) it:

1. scrapes the gateway's ``/metrics`` (invocations, requests in flight and
   held) and each model server's ``/metrics`` (``process_cpu_seconds_total``),
   plus Prometheus for Custom queries when a policy names one;
2. turns them into per-variant values over a sliding window (``MetricWindow``,
   pure);
3. asks ``reconcile.autoscale`` for the desired replicas and, when they
   change, starts or stops model-server processes, recording the reason as an
   event (``kubeinfer events``) and in the supervisor log.

Scale-out from zero is the cold-start path, so it polls the new server's
``/ping`` every 20 ms instead of waiting for the supervisor's monitor tick.
When that start fails (the model does not load, the server exits or runs out
of memory) the variant is not tried again for ``RETRY_AFTER_FAILURE_S``, and
meanwhile a scale request for it is answered 503 with a
``contract.scale.StartFailed`` body (the kind of failure, never the server's
own words): the gateway answers the requests it holds for the variant at once
instead of holding them until ``coldStartTimeout``.
The scrape endpoint is the supervisor's own little HTTP server (aiohttp, bound
to 127.0.0.1 on a free port, its connections bounded like the operator's by
``http_bounds``), handed to the gateway as ``KUBEINFER_SCALER_URL``.

Prometheus URLs come from the spec, so those queries obey the outbound policy
(``contract.outbound``, ``KUBEINFER_OUTBOUND_ALLOW``) as on Kubernetes: the
URL is checked before each query, the connection goes through the guarded
aiohttp connector, redirects are not followed and an answer over
``http_bounds.MAX_QUERY_BYTES`` counts as no answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import os
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import aiohttp
import httpx
from aiohttp import web
from pydantic import ValidationError

from kubeinfer_operator.http_bounds import MAX_QUERY_BYTES, AnswerLimit, BoundedListener
from kubeinfer_operator.local.children import LOAD_FAILED
from kubeinfer_operator.local.host import EndpointHost
from kubeinfer_operator.local.memory import OOM_KILLED
from kubeinfer_operator.local.prefork import ForkServer
from kubeinfer_operator.reconcile import autoscale
from kubeinfer_operator.reconcile.autoscale_metrics import (
    MetricWindow,
    parse_cpu_seconds,
    parse_gateway_metrics,
)
from kubeinfer_operator.reconcile.promql_scope import LOCAL_NAMESPACE, with_namespace
from kubeinfer_operator.render.plan import EndpointPlan
from kubeinfer_runtime.contract import ScaleRequest
from kubeinfer_runtime.contract.outbound import redact_url, url_problem
from kubeinfer_runtime.contract.outbound_io import guarded_connector
from kubeinfer_runtime.contract.scale import START_FAILED_STATUS, StartFailed

if TYPE_CHECKING:
    from kubeinfer_operator.local.children import Child

log = logging.getLogger("kubeinfer.local")

#: Sliding window of the metrics policies see (SageMaker evaluates per minute).
WINDOW_S = float(os.environ.get("KUBEINFER_AUTOSCALE_WINDOW_S", "60"))
#: How often policies are evaluated.
INTERVAL_S = float(os.environ.get("KUBEINFER_AUTOSCALE_INTERVAL_S", "1"))
#: A scale request from the activator counts as waiting traffic this long.
REQUEST_FRESH_S = 5.0
#: After a failed scale-out (model does not load, crash), wait this long before
#: trying that variant again, rather than starting a failing server every round.
RETRY_AFTER_FAILURE_S = 10.0


def keep_scaled_replicas(old: EndpointPlan | None, new: EndpointPlan) -> EndpointPlan:
    """A new spec must not undo the scaler: scaled variants keep their current
    replicas (clamped to the new bounds) instead of jumping back to the spec's."""
    if old is None:
        return new
    variants = []
    for v in new.variants:
        before = old.variant(v.name)
        if before is not None and v.autoscaling is not None:
            n = min(max(before.replicas, v.autoscaling.min_replicas), v.autoscaling.max_replicas)
            v = replace(v, replicas=n)
        elif before is not None and new.serverless is not None and new.scales_to_zero(v):
            v = replace(v, replicas=max(before.replicas, new.serverless.provisionedConcurrency))
        variants.append(v)
    return replace(new, variants=tuple(variants))


# -- I/O: the scaler task ---------------------------------------------------------------------


@dataclass
class ReasonLog:
    """The reason of a variant's last scaling decision, kept between rounds.

    A cooldown that holds a change back is decided again every round; logging
    it only when the reason changes keeps the supervisor log readable. Shared
    by auto scaling (``LocalScaler``) and async backlog scaling (``AsyncLocal``).
    """

    last: str = ""

    def changes(self, variant: str, current: int, desired: int, reason: str) -> bool:
        """Remember ``reason``; True when ``desired`` differs from ``current`` (go scale).

        When it does not, a new cooldown reason is logged once.
        """
        if desired == current and reason != self.last and "cooldown" in reason:
            log.info("variant %s: %s", variant, reason)
        self.last = reason
        return desired != current


@dataclass
class _VariantMemory:
    window: MetricWindow
    state: autoscale.ScaleState = field(default_factory=autoscale.ScaleState)
    last_activity: float | None = None
    last_invocations: float | None = None
    requested_at: float | None = None
    reasons: ReasonLog = field(default_factory=ReasonLog)
    #: No scale-out before this (monotonic), after a failed one.
    retry_at: float = 0.0
    #: The reason of the last change carried out.
    last_scaling: str = ""
    #: What kind of failure the last failed scale-out was (``start_failure_summary``).
    start_failure: str = ""


def start_failure_summary(error: str) -> str:
    """What a held request's caller may be told about a failed start (PURE): the kind of
    failure, never the model server's message (it names model URIs and paths)."""
    if OOM_KILLED in error:
        return "its model server ran out of memory"
    if LOAD_FAILED in error:
        return "its model failed to load"
    if " exited " in error:
        return "its model server exited"
    return "its model server did not become ready"


class LocalScaler:
    def __init__(self, supervisor: EndpointHost, *, window_s: float = WINDOW_S,
                 interval_s: float = INTERVAL_S) -> None:
        self.sup = supervisor
        self.window_s = window_s
        self.interval_s = interval_s
        self.memory: dict[str, _VariantMemory] = {}
        self.url: str | None = None
        #: The gateway presents it on POST /scale (it reaches it through its env); any
        #: other local process reaching the port gets 401.
        self.token = secrets.token_urlsafe(32)
        self._wake = asyncio.Event()
        self._listener: BoundedListener | None = None
        #: Prometheus queries (URLs from the spec): through the guarded connector.
        self._prometheus_session: aiohttp.ClientSession | None = None
        self._query_limit = AnswerLimit(MAX_QUERY_BYTES, "Prometheus answer")
        self.lock = asyncio.Lock()
        #: Model servers of scaled endpoints start from a pre-imported runtime.
        self.fork_server = ForkServer(supervisor.paths.root / "prefork.sock",
                                      supervisor.paths.log_file("prefork"))

    def launcher(self) -> Callable[..., Any] | None:
        """How to start a model server: the fork server once it is up (scaled endpoints)."""
        return self.fork_server.launch if self.fork_server.ready else None

    # -- the scale-request endpoint ----------------------------------------------------------

    async def start_server(self) -> str:
        app = web.Application(client_max_size=4096)
        app.router.add_post("/scale", self._on_scale)
        self._listener = BoundedListener(app, "127.0.0.1", 0)
        await self._listener.start()
        self.url = f"http://127.0.0.1:{self._listener.port}/scale"
        return self.url

    async def stop_server(self) -> None:
        self.fork_server.stop()
        if self._listener is not None:
            await self._listener.close()
            self._listener = None
        if self._prometheus_session is not None:
            await self._prometheus_session.close()
            self._prometheus_session = None

    async def _on_scale(self, request: web.Request) -> web.Response:
        given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        # Undecodable header bytes arrive as surrogates, which cannot be encoded: a
        # token that is not ASCII is simply not this one.
        if not given.isascii() or not hmac.compare_digest(given.encode(), self.token.encode()):
            return web.json_response({"message": "Scale request without this supervisor's "
                                                 "token: only its gateway may ask"},
                                     status=401, headers={"WWW-Authenticate": "Bearer"})
        try:
            scale = ScaleRequest.model_validate_json(await request.read())
        except ValidationError as exc:
            return web.json_response({"message": f"Invalid scale request: {exc.error_count()} "
                                                 "problem(s) in the body"}, status=400)
        if scale.endpoint != self.sup.name or scale.variant not in self.sup.running:
            return web.json_response(
                {"message": f"Variant {scale.endpoint}/{scale.variant} is not served by this "
                            "supervisor: check the gateway's KUBEINFER_SCALER_URL"}, status=404)
        mem = self._memory(scale.variant)
        now = time.monotonic()
        mem.requested_at = now
        if mem.start_failure and now < mem.retry_at:
            wait = mem.retry_at - now
            answer = StartFailed(
                message=f"Variant {scale.endpoint}/{scale.variant}: the last start failed "
                        f"({mem.start_failure}); the next try is in {wait:.0f}s",
                start_failed=mem.start_failure, retry_after_s=round(wait, 3))
            return web.json_response(answer.model_dump(), status=START_FAILED_STATUS,
                                     headers={"Retry-After": str(max(1, math.ceil(wait)))})
        self._wake.set()
        return web.json_response({"accepted": True}, status=202)

    def last_scaling(self, variant: str) -> str:
        """Why ``variant``'s replicas last changed (for state.json / status)."""
        mem = self.memory.get(variant)
        return mem.last_scaling if mem is not None else ""

    def _memory(self, variant: str) -> _VariantMemory:
        mem = self.memory.get(variant)
        if mem is None:
            mem = self.memory[variant] = _VariantMemory(MetricWindow(self.window_s))
        return mem

    # -- the loop ----------------------------------------------------------------------------

    def active(self) -> bool:
        plan = self.sup.current_plan()
        return plan.serverless is not None or any(v.autoscaling for v in plan.variants)

    async def run(self, client: httpx.AsyncClient) -> None:
        while True:
            self._wake.clear()
            try:
                if self.active():
                    self.fork_server.start()  # idempotent; ready in a second or two
                if self.active() and not self.sup.applying and self.sup.started:
                    await self.tick(client)
            except Exception:  # one bad round must not end scaling
                log.exception("autoscaling round failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.interval_s)

    async def _get(self, client: httpx.AsyncClient, url: str) -> str | None:
        try:
            response = await client.get(url, timeout=2.0)
        except httpx.HTTPError:
            return None
        return response.text if response.status_code == 200 else None

    async def _prometheus(self, base: str, query: str,
                          field: str = "autoscaling.prometheusUrl") -> float | None:
        """The value of PromQL ``query`` on ``base``; None when unknown or refused."""
        policy = self.sup.outbound
        problem = url_problem(base, policy, field)
        if problem is not None:
            log.warning("Prometheus query %r not sent: %s", query, problem)
            return None
        if self._prometheus_session is None:
            self._prometheus_session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=2.0), connector=guarded_connector(policy))
        try:
            async with self._prometheus_session.get(base.rstrip("/") + "/api/v1/query",
                                                    params={"query": query},
                                                    allow_redirects=False) as response:
                if response.status != 200:  # a 3xx too: redirects are not followed
                    raise ValueError(f"HTTP {response.status}")
                body = await self._query_limit.read(response, redact_url(base))
                if body is None:
                    return None  # warned once per Prometheus
                result = json.loads(body)["data"]["result"]
            return float(result[0]["value"][1]) if result else None
        except (TimeoutError, aiohttp.ClientError, ValueError, KeyError, IndexError,
                TypeError, RecursionError) as exc:  # RecursionError: JSON nested too deep
            log.warning("Prometheus query %r on %s failed: %s", query, redact_url(base), exc)
            return None

    async def tick(self, client: httpx.AsyncClient) -> None:
        sup = self.sup
        gateway = sup.gateway
        if gateway is None or not gateway.ready:
            return
        text = await self._get(client, gateway.url + "/metrics")
        view = parse_gateway_metrics(text or "", sup.name)
        now_m = time.monotonic()
        plan = sup.current_plan()
        for variant in plan.variants:
            shadow = variant.shadow_sampling is not None
            if shadow and variant.autoscaling is None:
                continue  # a shadow keeps its replicas unless it has its own autoscaling
            children = sup._variant_children(variant.name, active=True)
            cpu: dict[str, float] = {}
            for child in children:
                body = await self._get(client, child.url + "/metrics") if child.ready else None
                seconds = parse_cpu_seconds(body) if body else None
                if seconds is not None:
                    cpu[child.url] = seconds
            mem = self._memory(variant.name)
            invocations = view.offered(variant.name, shadow, plan.routes_of(variant))
            mem.window.add(now_m, invocations, cpu)
            if mem.last_invocations is not None and invocations != mem.last_invocations:
                mem.last_activity = now_m
            mem.last_invocations = invocations
            held = view.held.get(variant.name, 0.0)
            waiting = not shadow and (held > 0 or (mem.requested_at is not None
                                                   and now_m - mem.requested_at < REQUEST_FRESH_S
                                                   and not children))
            # Activity is per variant: answered requests (the counter moved) or
            # requests held for it. (In-flight is per endpoint: a request held
            # for another variant must not keep this one warm.)
            if waiting:
                mem.last_activity = now_m
            if sup.rolling_out(variant.name):
                continue  # green starts at blue's replicas; scaling resumes after the rollout
            metrics = await self._metric_values(variant.name, variant.autoscaling, mem,
                                                len(children))
            await self._decide(plan, variant.name, len(children), metrics, mem, waiting, now_m)

    async def _metric_values(self, variant: str, policy: autoscale.Policy | None,
                             mem: _VariantMemory, replicas: int) -> dict[str, float | None]:
        values: dict[str, float | None] = {
            autoscale.Metric.INVOCATIONS_PER_REPLICA.value:
                mem.window.invocations_per_replica_per_minute(replicas),
            autoscale.Metric.CPU_UTILIZATION.value: mem.window.cpu_percent(replicas),
        }
        if policy is not None and policy.prometheus_url:
            for key in policy.metric_keys():
                if key.startswith("custom:"):
                    values[key] = await self._prometheus(
                        policy.prometheus_url,
                        with_namespace(key[len("custom:"):], LOCAL_NAMESPACE),
                        f"Endpoint {self.sup.name}, variant {variant}: autoscaling.prometheusUrl")
        return values

    async def _decide(self, plan: EndpointPlan, name: str, current: int,
                      metrics: dict[str, float | None], mem: _VariantMemory, waiting: bool,
                      now_m: float) -> None:
        variant = plan.variant(name)
        assert variant is not None
        # Policies get wall-clock time for schedules only; cooldowns, the
        # stabilization window and idleness run on the monotonic clock (t=), so a
        # wall-clock step cannot hold scaling for as long as the step.
        now = datetime.now(UTC)
        # Read now, not at the round's start: the scrapes and queries since took time, and
        # a decision stamped early would let the next one come sooner after the action
        # (and its event) than the cooldown says.
        t = time.monotonic()
        serverless = plan.serverless_policy if plan.scales_to_zero(variant) else None
        if serverless is not None:
            decision = autoscale.decide_serverless(serverless, variant.autoscaling, current,
                                                   metrics, mem.state, mem.last_activity,
                                                   waiting, now, t=t)
        elif variant.autoscaling is not None:
            decision = autoscale.decide(variant.autoscaling, current, metrics, mem.state, now,
                                        t=t)
        else:
            return
        mem.state = decision.state
        if not mem.reasons.changes(name, current, decision.desired, decision.reason):
            return
        if decision.desired > current and now_m < mem.retry_at:
            return  # the last scale-out failed; its event says why
        if not await self.scale(name, current, decision.desired, decision.reason):
            mem.retry_at = now_m + RETRY_AFTER_FAILURE_S

    async def scale(self, name: str, current: int, desired: int, reason: str) -> bool:
        """Start or stop model servers of ``name``; False when a scale-out failed."""
        sup = self.sup
        async with self.lock:
            plan = sup.running.get(name)
            if plan is None or sup.applying:
                return True
            sup.event(f"Variant {name}: {reason}")
            self._memory(name).last_scaling = reason
            if desired > current:
                error = await self._scale_out(name, current, desired)
                if error:
                    sup.event(f"Variant {name}: scale-out to {desired} failed: {error}; "
                              f"retrying in {RETRY_AFTER_FAILURE_S:g}s", level="error")
                    self._memory(name).start_failure = start_failure_summary(error)
                    return False
                self._memory(name).start_failure = ""
                return True
            sup.running[name] = replace(plan, replicas=desired)
            extra = [c for c in sup._variant_children(name, active=True)
                     if (c.spec.replica or 0) >= desired]
            await sup.drain(extra)
            sup.write_state()
            return True

    async def _scale_out(self, name: str, current: int, desired: int) -> str | None:
        sup = self.sup
        plan = replace(sup.running[name], replicas=desired)
        used = {c.spec.replica for c in sup._variant_children(name, active=True)}
        slots = [i for i in range(desired) if i not in used][:desired - current]
        error = await sup.start_and_route(
            name, plan, slots, lambda fresh: self._wait_ready(fresh, timeout_s=120.0))
        if error is None:
            sup.write_state()
        return error

    async def _wait_ready(self, children: Iterable[Child], timeout_s: float) -> str | None:
        """Poll the new servers' /ping every 20 ms: this is the cold-start path."""
        pending = list(children)
        client = self.sup._client
        deadline = time.monotonic() + timeout_s
        while pending:
            if client is not None:
                await asyncio.gather(*(c.check(client) for c in pending))
            for c in pending:
                if not c.running and c.proc is not None:
                    # Killed for its memory: say so (the kill's exit may not be collected yet).
                    oom = c.oom_message or (c.last_termination_message
                                            if c.last_termination == OOM_KILLED else None)
                    if oom:
                        return f"model server {c.name} was {OOM_KILLED}: {oom}"
                    return f"model server {c.name} exited ({c.proc.poll()}); see {c.spec.log_path}"
                if LOAD_FAILED in c.reason:  # it gave up on its model for good
                    return f"model server {c.name} is not ready: {c.reason}"
            pending = [c for c in pending if not c.ready]
            if not pending:
                return None
            if time.monotonic() >= deadline:
                return f"not ready after {timeout_s:g}s"
            await asyncio.sleep(0.02)
        return None
