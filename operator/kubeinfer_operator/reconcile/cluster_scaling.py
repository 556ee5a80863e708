"""The cluster scaler's memory and decisions: PURE (clocks are arguments).

``scaling.cluster.ClusterScaler`` does the I/O (the scale-request server,
scraping gateway pods, Prometheus queries, Redis backlogs); everything it
decides with what it read lives here, so the decisions are unit-testable
without sockets and ``handlers/`` stays thin. State kept between rounds per
(namespace, endpoint, variant): the metrics window, summed gateway counters,
the policy's cooldown state, the last decision and its reason.

Who writes replicas: for scaled variants the scaler's decision
(:meth:`ScalerMemory.replicas_for`) wins over the spec, and without a decision
yet the Deployment's current replicas are kept, so a new spec never undoes
the scaler; a variant an HPA scales keeps whatever the HPA set.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from kubeinfer_operator.reconcile import autoscale
from kubeinfer_operator.reconcile.async_scaling import BacklogState, decide
from kubeinfer_operator.reconcile.autoscale_metrics import (
    CounterSum,
    GatewayView,
    MetricWindow,
    sum_views,
)
from kubeinfer_operator.reconcile.events import REASON_SCALED, EventSpec, event_manifest
from kubeinfer_operator.render import k8s_autoscaling
from kubeinfer_operator.render import k8s_meta as meta
from kubeinfer_operator.render.k8s_secrets import scaler_token
from kubeinfer_operator.render.plan import EndpointPlan

log = logging.getLogger(__name__)

#: Metrics window of the policies on Kubernetes (SageMaker evaluates per minute).
WINDOW_S = 60.0
#: A scale request keeps a variant at zero replicas "waiting" this long.
REQUEST_FRESH_S = 10.0

Key = tuple[str, str, str]  # namespace, endpoint, variant

#: Which policy changed replicas (the ``reason`` of ``kubeinfer_operator_scale_decisions_total``;
#: a small fixed set, unlike the decision's free-text reason).
POLICY_AUTOSCALING = "autoscaling"
POLICY_SERVERLESS = "serverless"
POLICY_ASYNC_BACKLOG = "async_backlog"


@dataclass(frozen=True)
class ScaleChange:
    """A replica change the scaler decided, as metrics count it."""

    #: ``from_zero`` (a cold start), ``to_zero``, ``up`` or ``down``.
    direction: str
    #: One of the ``POLICY_*`` values.
    policy: str


def scale_direction(current: int, desired: int) -> str:
    if current == 0:
        return "from_zero"
    if desired == 0:
        return "to_zero"
    return "up" if desired > current else "down"


def authorized_scale(token: str, signing_key: bytes, namespace: str) -> bool:
    """Whether ``token`` is the one issued to gateways of ``namespace`` (constant time).

    Issued tokens are ASCII; any other token (a header's undecodable bytes arrive
    as surrogates, which cannot even be encoded) is simply not one of them.
    """
    if not token.isascii():
        return False
    expected = scaler_token(signing_key, namespace)
    return hmac.compare_digest(token.encode(), expected.encode())


def scaling_event(namespace: str, endpoint: str, uid: str, message: str,
                  now: datetime) -> dict[str, Any]:
    """A core/v1 Event on the Endpoint (``kubectl describe kie NAME`` shows it)."""
    return event_manifest(api_version="kubeinfer.io/v1alpha1", kind="Endpoint",
                          namespace=namespace, name=endpoint, uid=uid,
                          event=EventSpec(REASON_SCALED, message), now=now)


@dataclass
class VariantMemory:
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


def custom_metric_variants(plan: EndpointPlan) -> list[tuple[str, str, str, list[str]]]:
    """(field path, variant, prometheusUrl, PromQL queries) the gateway-scaled variants
    (and shadows) need."""
    hpa = k8s_autoscaling.hpa_variants(plan)
    out = []
    for v in plan.variants:
        policy = v.autoscaling
        if policy is None or not policy.prometheus_url or v.name in hpa:
            continue
        queries = [k[len("custom:"):] for k in policy.metric_keys() if k.startswith("custom:")]
        if queries:
            out.append((plan.field_path(v.name), v.name, policy.prometheus_url, queries))
    return out


class ScalerMemory:
    """What the cluster scaler remembers and decides; no I/O."""

    def __init__(self) -> None:
        #: Scaled Endpoints the operator reconciles, and their variants: a scale
        #: request for anything else is refused at once, and leaves nothing behind.
        self.known: dict[tuple[str, str], frozenset[str]] = {}
        self.memory: dict[Key, VariantMemory] = {}
        #: The async backlog policy's memory per (namespace, endpoint), between rounds.
        self.backlog_states: dict[tuple[str, str], BacklogState] = {}
        #: Told of every replica change decided (the operator's metrics); None: nobody.
        self.on_change: Callable[[ScaleChange], None] | None = None

    def _changed(self, current: int, desired: int, policy: str) -> None:
        if self.on_change is not None:
            self.on_change(ScaleChange(scale_direction(current, desired), policy))

    def register(self, namespace: str, endpoint: str, variants: frozenset[str] | None) -> None:
        """Record which variants of an Endpoint scale requests may name (None: none)."""
        if variants:
            self.known[(namespace, endpoint)] = variants
        else:
            self.known.pop((namespace, endpoint), None)

    def forget(self, namespace: str, endpoint: str) -> None:
        """A deleted Endpoint: nothing about it stays in memory."""
        self.known.pop((namespace, endpoint), None)
        self.backlog_states.pop((namespace, endpoint), None)
        for k in [k for k in self.memory if k[:2] == (namespace, endpoint)]:
            del self.memory[k]

    def mark_requested(self, key: Key, now_m: float) -> None:
        self._mem(key).requested_at = now_m

    def _mem(self, key: Key) -> VariantMemory:
        mem = self.memory.get(key)
        if mem is None:
            mem = self.memory[key] = VariantMemory()
        return mem

    def decide_scraped(self, plan: EndpointPlan, namespace: str, current: Mapping[str, int],
                       views: Mapping[str, GatewayView | None],
                       custom: Mapping[str, Mapping[str, float | None]], *,
                       now: datetime, now_m: float,
                       held: Collection[str] = ()) -> list[str]:
        """Decide every gateway-scaled variant from what the gateway pods and Prometheus
        said; returns the change messages.

        ``views``: each gateway pod's view by URL (None: its scrape failed);
        ``custom``: per variant, ``custom:<query>`` → value; ``now_m``: the
        monotonic clock the metrics window runs on; ``held``: variants whose guarded
        rollout runs (their metrics are read, their replicas left to the rollout, as
        SageMaker holds auto scaling during an update).
        """
        answered = {url: v for url, v in views.items() if v is not None}
        summed = sum_views(answered.values())
        hpa = k8s_autoscaling.hpa_variants(plan)
        messages = []
        for variant in plan.variants:
            shadow = variant.shadow_sampling is not None
            serverless = plan.serverless_policy if plan.scales_to_zero(variant) else None
            if (serverless is None and variant.autoscaling is None) or variant.name in hpa:
                continue  # fixed replicas (a shadow without autoscaling too), or an HPA's
            mem = self._mem((namespace, plan.name, variant.name))
            replicas = current.get(variant.name, variant.replicas)
            # A pod that answered without the variant's series counts 0 (restarted).
            routes = plan.routes_of(variant)
            invocations = mem.invocations.update(
                {url: v.offered(variant.name, shadow, routes) for url, v in answered.items()},
                keep=views.keys())
            mem.window.add(now_m, invocations, {})
            if mem.last_invocations is not None and invocations != mem.last_invocations:
                mem.last_activity = now_m
            mem.last_invocations = invocations
            waiting = not shadow and (summed.held.get(variant.name, 0.0) > 0 or (
                mem.requested_at is not None and now_m - mem.requested_at < REQUEST_FRESH_S
                and replicas == 0))
            if waiting:  # per variant; in-flight is per endpoint (see local.scaler)
                mem.last_activity = now_m
            if variant.name in held:
                continue
            values: dict[str, float | None] = {
                autoscale.Metric.INVOCATIONS_PER_REPLICA.value:
                    mem.window.invocations_per_replica_per_minute(replicas)}
            values.update(custom.get(variant.name, {}))
            policy = variant.autoscaling
            # Schedules read the wall clock (now); cooldowns, the stabilization window
            # and idleness run on now_m, so an NTP step cannot freeze or release them.
            if serverless is not None:
                decision = autoscale.decide_serverless(serverless, policy, replicas, values,
                                                       mem.state, mem.last_activity, waiting,
                                                       now, t=now_m)
            else:
                assert policy is not None
                decision = autoscale.decide(policy, replicas, values, mem.state, now, t=now_m)
            mem.state = decision.state
            if replicas == 0 and decision.desired > 0:
                # The request is honoured: a gateway still holding requests asks again
                # (every second), so an old one must not wake the variant after an idle
                # scale-in (that flapped 0 -> 1 -> 0 for REQUEST_FRESH_S).
                mem.requested_at = None
            if decision.desired != replicas:
                # Remembered only when the scaler changes something: until then
                # the Deployment's own replicas are the truth (replicas_for).
                mem.desired = decision.desired
                mem.reason = decision.reason
                message = f"Variant {variant.name}: {decision.reason}"
                log.info("Endpoint %s/%s: %s", namespace, plan.name, message)
                messages.append(message)
                self._changed(replicas, decision.desired, POLICY_SERVERLESS
                              if serverless is not None else POLICY_AUTOSCALING)
        return messages

    def decide_backlog(self, plan: EndpointPlan, namespace: str, current: Mapping[str, int],
                       backlog_total: int, now_m: float) -> list[str]:
        """Decide the worker replicas of an async ``plan`` from its queue backlog."""
        cfg = plan.async_config
        if cfg is None or not plan.variants:
            return []
        variant = plan.variants[0]  # Async endpoints have exactly one variant
        key = (namespace, plan.name)
        replicas = current.get(variant.name, variant.replicas)
        d = decide(cfg.policy, replicas, backlog_total,
                   self.backlog_states.get(key, BacklogState()), now_m)
        self.backlog_states[key] = d.state
        mem = self._mem((namespace, plan.name, variant.name))
        mem.desired = d.desired
        if d.desired == replicas:
            return []
        mem.reason = d.reason
        message = f"Variant {variant.name}: {d.reason}"
        log.info("Endpoint %s/%s: %s", namespace, plan.name, message)
        self._changed(replicas, d.desired, POLICY_ASYNC_BACKLOG)
        return [message]

    def retain(self, plan: EndpointPlan, namespace: str) -> None:
        """Forget the variants ``plan`` no longer has (removed or renamed in the spec).

        Memory is otherwise dropped only with the Endpoint (``forget``): an Endpoint
        whose author renames its variants now and then would keep a window and
        counters per name it ever had for as long as it lives.
        """
        names = {v.name for v in plan.variants}
        for key in [k for k in self.memory
                    if k[:2] == (namespace, plan.name) and k[2] not in names]:
            del self.memory[key]

    def hand_over_to_hpas(self, plan: EndpointPlan, namespace: str) -> None:
        """Forget our decisions for variants an HPA scales; :meth:`reason_for` then says so.

        ``sync`` calls it before :meth:`replicas_for`, so a variant whose spec just
        turned CPU-only never gets a stale decision of ours, and if it comes
        back to our policies they start from the Deployment's replicas.
        """
        self.retain(plan, namespace)
        for variant in plan.variants:
            reason = k8s_autoscaling.hpa_reason(plan.name, namespace, plan, variant)
            key = (namespace, plan.name, variant.name)
            mem = self.memory.get(key)
            if reason is not None and (mem is None or mem.reason != reason):
                self.memory[key] = VariantMemory(reason=reason, by_hpa=True)
            elif reason is None and mem is not None and mem.by_hpa:
                del self.memory[key]  # back to our policies: a fresh start

    def replicas_for(self, plan: EndpointPlan, namespace: str,
                     deployments: Mapping[str, Mapping[str, Any]]) -> EndpointPlan:
        """``plan`` with the scaler's replicas for scaled variants.

        A variant an HPA scales keeps its Deployment's replicas as they are
        (render leaves them out of the manifest anyway).
        """
        hpa = k8s_autoscaling.hpa_variants(plan)
        variants = []
        for v in plan.variants:
            scaled = (plan.scales_to_zero(v) or v.autoscaling is not None
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
                # The fleet serving a guarded variant may be its green slot (slots
                # alternate); while both run, the larger one is the variant's size.
                counts = []
                for route in plan.routes_of(v):
                    existing = deployments.get(meta.variant_object_name(plan.name, route))
                    spec = (existing or {}).get("spec") or {}
                    if isinstance(spec.get("replicas"), int):
                        counts.append(int(spec["replicas"]))
                if counts:
                    n = max(counts)
                    if v.autoscaling is not None:
                        n = min(max(n, v.autoscaling.min_replicas), v.autoscaling.max_replicas)
                    v = replace(v, replicas=n)
            variants.append(v)
        return replace(plan, variants=tuple(variants))

    def reason_for(self, namespace: str, endpoint: str, variant: str) -> str | None:
        mem = self.memory.get((namespace, endpoint, variant))
        return mem.reason if mem is not None and mem.reason else None
