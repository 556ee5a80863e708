"""The operator's scaler and rollout guard keep bounded memory per Endpoint.

* They forget variants an Endpoint no longer has: before, their per-variant memory
  (metrics windows, counters, alarm windows) was dropped only when the Endpoint was
  deleted, so an Endpoint whose author renamed its variants kept one entry per name.
* A baking step's alarm window keeps a bounded number of latency histogram bounds:
  a pod labelled like the gateway (any namespace editor can make one) could serve
  new bounds on every scrape, each remembered for as long as the step bakes.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime
from typing import Any

import pytest

from kubeinfer_operator.api.endpoint import Endpoint
from kubeinfer_operator.reconcile.cluster_scaling import ScalerMemory
from kubeinfer_operator.reconcile.rollout_alarms import (
    MAX_BUCKETS,
    FleetCounters,
    FleetWindow,
    parse_fleet_metrics,
)
from kubeinfer_operator.render.plan import EndpointPlan, plan_endpoint
from kubeinfer_operator.scaling.rollouts import RolloutGuard

AUTOSCALING: dict[str, Any] = {
    "minReplicas": 1, "maxReplicas": 4,
    "targetTracking": [{"metric": "InvocationsPerReplica", "target": 60}]}


def plan(*variants: str) -> EndpointPlan:
    return plan_endpoint(Endpoint.model_validate({
        "apiVersion": "kubeinfer.io/v1alpha1", "kind": "Endpoint", "metadata": {"name": "ep"},
        "spec": {"variants": [{"name": v, "model": {"uri": "s3://b/m.onnx"},
                               "autoscaling": AUTOSCALING} for v in variants]}}))


def test_scaler_memory_keeps_only_the_variants_of_the_plan() -> None:
    memory = ScalerMemory()
    now = datetime(2026, 1, 1, tzinfo=UTC)
    for n in range(20):  # the author renames the variant twenty times
        current = plan(f"v{n}")
        memory.hand_over_to_hpas(current, "ml")  # every sync does, before deciding
        memory.decide_scraped(current, "ml", {f"v{n}": 1}, {}, {}, now=now, now_m=float(n))
        memory.mark_requested(("other", "ep", f"v{n}"), float(n))  # another namespace's
    memory.hand_over_to_hpas(plan("v19"), "ml")
    assert [k for k in memory.memory if k[0] == "ml"] == [("ml", "ep", "v19")]
    assert len([k for k in memory.memory if k[0] == "other"]) == 20  # not this Endpoint's


async def test_rollout_windows_keep_only_the_routes_of_the_plan() -> None:
    guard = RolloutGuard(None)
    for n in range(20):
        guard.windows[("ml", "ep", f"v{n}-green")] = FleetWindow()
    guard.windows[("other", "ep", "v0-green")] = FleetWindow()
    await guard.decide(plan("v19"), None, "ml", {}, {}, datetime(2026, 1, 1, tzinfo=UTC))
    assert set(guard.windows) == {("ml", "ep", "v19-green"), ("other", "ep", "v0-green")}


def _buckets(bounds: list[float]) -> str:
    return "".join('kubeinfer_gateway_upstream_latency_seconds_bucket{endpoint="ep",'
                   f'variant="v-green",le="{le}"}} 1\n' for le in bounds)


def test_a_scrape_with_more_bounds_than_a_gateway_writes_is_not_a_gateways() -> None:
    honest = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, float("inf")]
    assert len(parse_fleet_metrics(_buckets(honest), "ep")["v-green"].buckets) == len(honest)
    with pytest.raises(ValueError, match="histogram buckets"):
        parse_fleet_metrics(_buckets([i / 1e6 for i in range(MAX_BUCKETS + 1)]), "ep")


def test_a_window_keeps_a_bounded_number_of_bounds_whatever_pods_send() -> None:
    rng = random.Random(7)
    window = FleetWindow()
    for round_ in range(50):  # every round, two pods send as many new bounds as allowed
        pods = {f"http://10.0.0.{p}:9090": FleetCounters(buckets=tuple(sorted(
            (rng.random(), 1.0) for _ in range(MAX_BUCKETS)))) for p in range(2)}
        window.add(float(round_), pods)
    assert len([k for k in window._sums if k.startswith("le=")]) == MAX_BUCKETS
    assert all(len(c.buckets) <= MAX_BUCKETS for _, c in window.samples)
