"""Guarded rollouts on Kubernetes: gather the state machine's inputs (I/O).

For each variant of an Endpoint with a ``deploymentConfig`` (or a rollout on
record), ``RolloutGuard.decide`` reads what its two fleets run (the
``kubeinfer.io/server-hash`` of each Deployment's pods, updated and available
replicas), scrapes every gateway pod's ``/metrics`` for the green route while
a step bakes (the scaler's pod discovery: ready pods listed from the API and
reached at their own IPs, never a tenant-editable Service; its timeouts and
answer size bound),
asks Prometheus for ``promQL`` alarms (through the scaler's guarded,
outbound-policy-checked client) and calls the pure ``reconcile.rollout.decide``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import aiohttp

from kubeinfer_operator.api.deployment_config import DeploymentConfig
from kubeinfer_operator.errors import ClusterError
from kubeinfer_operator.http_bounds import MAX_METRICS_BYTES, AnswerLimit
from kubeinfer_operator.reconcile import rollout as ro
from kubeinfer_operator.reconcile.rollout_alarms import (
    FleetCounters,
    FleetWindow,
    evaluate,
    parse_fleet_metrics,
    render_query,
)
from kubeinfer_operator.reconcile.status import deployment_state
from kubeinfer_operator.render import k8s_meta as meta
from kubeinfer_operator.render.plan import EndpointPlan
from kubeinfer_operator.scaling.cluster import SCRAPE_TIMEOUT_S, ClusterScaler

log = logging.getLogger(__name__)


def fleet_of(deployment: Mapping[str, Any] | None) -> ro.Fleet | None:
    """What a slot's Deployment runs: its pods' server hash, replicas rolled out, and
    its progress deadline passed (Progressing=False) as the fleet's failure."""
    if deployment is None:
        return None
    annotations = ((((deployment.get("spec") or {}).get("template") or {}).get("metadata")
                    or {}).get("annotations") or {})
    state = deployment_state(deployment)
    ready = min(state.updated, state.available) if state.observed else 0
    failure = (f"Deployment {(deployment.get('metadata') or {}).get('name')} "
               f"{state.stall_reason}" + (f": {state.stall_message}" if state.stall_message
                                          else "")) if state.stalled else None
    return ro.Fleet(annotations.get(meta.ANNOTATION_SERVER_HASH), ready, failure)


def previous_rollouts(status: Mapping[str, Any]) -> dict[str, ro.RolloutState]:
    out = {}
    for entry in status.get("rollouts") or []:
        if isinstance(entry, Mapping) and (state := ro.RolloutState.from_status(entry)):
            out[state.variant] = state
    return out


class RolloutGuard:
    def __init__(self, scaler: ClusterScaler | None) -> None:
        self.scaler = scaler
        #: (namespace, endpoint, route) -> green's samples.
        self.windows: dict[tuple[str, str, str], FleetWindow] = {}
        self._session: aiohttp.ClientSession | None = None
        self._metrics_limit = AnswerLimit(MAX_METRICS_BYTES, "Gateway metrics")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def forget(self, namespace: str, endpoint: str) -> None:
        for key in [k for k in self.windows if k[:2] == (namespace, endpoint)]:
            del self.windows[key]

    def _retain(self, plan: EndpointPlan, namespace: str) -> None:
        """Drop the windows of routes ``plan`` no longer has: a variant removed or renamed
        while its step baked would otherwise keep its window until the Endpoint goes."""
        routes = {f for v in plan.variants for f in ro.fleet_names(v.name)}
        for key in [k for k in self.windows
                    if k[:2] == (namespace, plan.name) and k[2] not in routes]:
            del self.windows[key]

    async def _fetch(self, url: str) -> str | None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT_S))
        try:
            async with self._session.get(url) as resp:
                if resp.status != 200:
                    return None
                body = await self._metrics_limit.read(resp, url)
        except (TimeoutError, aiohttp.ClientError):
            return None
        return body.decode("utf-8", "replace") if body is not None else None

    async def _scrape(self, namespace: str,
                      endpoint: str) -> dict[str, dict[str, FleetCounters] | None] | None:
        """Each ready gateway pod's counters by pod URL (None: its scrape failed); None
        when the pods could not be listed (the window skips this round)."""
        if self.scaler is None:
            return None  # no cluster scaler: no pod discovery
        try:
            urls = await self.scaler.find_gateways(namespace, endpoint)
        except ClusterError as exc:
            log.warning("Endpoint %s/%s: rollout alarms not sampled this round: %s",
                        namespace, endpoint, exc)
            return None

        async def one(url: str) -> dict[str, FleetCounters] | None:
            text = await self._fetch(url + "/metrics")
            if text is None:
                return None
            try:
                return parse_fleet_metrics(text, endpoint)
            except ValueError:
                return None

        return dict(zip(urls, await asyncio.gather(*(one(u) for u in urls)), strict=True))

    async def decide(self, plan: EndpointPlan, config: DeploymentConfig | None, namespace: str,
                     deployments: Mapping[str, Mapping[str, Any]], old_status: Mapping[str, Any],
                     now: datetime) -> dict[str, ro.Decision]:
        previous = previous_rollouts(old_status)
        self._retain(plan, namespace)
        if config is None and not previous:
            return {}
        scraped: dict[str, dict[str, FleetCounters] | None] | None = None
        sampled = False
        out: dict[str, ro.Decision] = {}
        for v in plan.variants:
            if v.shadow_sampling is not None:
                continue  # shadows take no production traffic: never rolled out
            before = previous.get(v.name)
            fleets = {f: fleet for f in ro.fleet_names(v.name)
                      if (fleet := fleet_of(deployments.get(meta.variant_object_name(
                          plan.name, f)))) is not None}
            evaluations: list[ro.AlarmEvaluation] = []
            if (config is not None and config.alarms and before is not None
                    and before.phase in (ro.Phase.BAKING, ro.Phase.TERMINATING)
                    and before.to_hash == v.server_hash):
                if not sampled and any(a.promQL is None for a in config.alarms):
                    sampled = True  # once per round, even when it found nothing
                    scraped = await self._scrape(namespace, plan.name)
                window = self.windows.setdefault((namespace, plan.name, before.green),
                                                 FleetWindow())
                if scraped is not None:
                    window.add(now.timestamp(), {pod: (c.get(before.green, FleetCounters())
                                                       if c is not None else None)
                                                 for pod, c in scraped.items()})
                for alarm in config.alarms:
                    value = None
                    if alarm.promQL is not None and self.scaler is not None and (
                            config.autoRollback and config.autoRollback.prometheusUrl):
                        value = await self.scaler.query_prometheus(
                            config.autoRollback.prometheusUrl,
                            render_query(alarm.promQL.query, plan.name, before.green,
                                         namespace),
                            namespace, "deploymentConfig.autoRollback.prometheusUrl")
                    evaluations.append(evaluate(alarm, window, since=before.step_started_at,
                                                promql_value=value))
            decision = ro.decide(variant=v.name, config=config, replicas=v.replicas,
                                 desired_hash=v.server_hash, previous=before, fleets=fleets,
                                 now=now, evaluations=evaluations)
            if decision.state is not None and decision.state.phase in ro.TERMINAL:
                self.windows.pop((namespace, plan.name, decision.state.green), None)
            if decision.state is not None or before is not None:
                out[v.name] = decision
        return out
