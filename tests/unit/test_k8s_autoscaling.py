"""Auto scaling on Kubernetes: every gateway pod's counters, CPU-only variants as HPAs.

Pure pieces (``CounterSum``, ``sum_views``, the HPA and gateway-pods renders,
the Kubernetes-only spec check) and the operator's ``ClusterScaler`` with an
injected pod discovery and fetch (no API, no HTTP here; the real HTTP path is
in tests/integration/test_operator_autoscaling.py, discovery from the API in
tests/integration/test_operator_tampered_services.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import kubernetes_validate
import pytest

from kubeinfer_operator.api.endpoint import Endpoint
from kubeinfer_operator.reconcile.autoscale_metrics import CounterSum, GatewayView, sum_views
from kubeinfer_operator.reconcile.diff import ObjectKey, diff_children
from kubeinfer_operator.reconcile.validate import InvalidSpec, validate_endpoint
from kubeinfer_operator.render import k8s_autoscaling as ka
from kubeinfer_operator.render import k8s_meta as meta
from kubeinfer_operator.render.k8s import Owner, render_endpoint
from kubeinfer_operator.render.plan import EndpointPlan, plan_endpoint
from kubeinfer_operator.scaling.cluster import ClusterScaler, GatewaysUnknown
from kubeinfer_operator.settings import OperatorSettings
from tests.support.kube_schema import schema_errors

OWNER = Owner(name="ep", namespace="ml", uid="0b6c2a3e-1111-4222-8333-944455556666")
CPU_ONLY: dict[str, Any] = {
    "minReplicas": 2, "maxReplicas": 6, "scaleInCooldown": 120, "scaleOutCooldown": 15,
    "targetTracking": [{"metric": "CPUUtilization", "target": 70}]}
INVOCATIONS = {"metric": "InvocationsPerReplica", "target": 60}


def endpoint(autoscaling: dict[str, Any] | None, *, extra: dict[str, Any] | None = None,
             more_variants: list[dict[str, Any]] | None = None) -> Endpoint:
    variant: dict[str, Any] = {"name": "main", "model": {"uri": "s3://b/m.onnx"}}
    if autoscaling is not None:
        variant["autoscaling"] = autoscaling
    return Endpoint.model_validate({
        "apiVersion": "kubeinfer.io/v1alpha1", "kind": "Endpoint", "metadata": {"name": "ep"},
        "spec": {"variants": [variant, *(more_variants or [])], **(extra or {})}})


def plan_of(autoscaling: dict[str, Any] | None, **kw: Any) -> EndpointPlan:
    return plan_endpoint(endpoint(autoscaling, **kw))


def rendered(plan: EndpointPlan, existing: tuple[str, ...] = ()) -> dict[tuple[str, str], Any]:
    return {(m["kind"], m["metadata"]["name"]): m
            for m in render_endpoint(plan, OWNER, OperatorSettings(), (), existing)}


# -- CounterSum / sum_views --------------------------------------------------------------------


def test_counter_sum_adds_increments_of_every_source() -> None:
    c = CounterSum()
    assert c.update({"a": 100.0, "b": 40.0}) == 0.0  # first sight: baselines only
    assert c.update({"a": 110.0, "b": 45.0}) == 15.0
    assert c.update({"a": 110.0, "b": 45.0}) == 15.0


def test_counter_sum_survives_restarts_and_pods_coming_and_going() -> None:
    c = CounterSum()
    c.update({"a": 1000.0, "b": 1000.0})
    # b restarted (its counter went down): a new baseline, nothing negative.
    assert c.update({"a": 1000.0, "b": 3.0}) == 0.0
    assert c.update({"a": 1000.0, "b": 5.0}) == 2.0
    # b is gone and c (a new pod with a long history) appears: no jump.
    assert c.update({"a": 1001.0, "c": 9000.0}) == 3.0
    assert c.update({"a": 1001.0, "c": 9004.0}) == 7.0
    # b comes back: a first sight again (it was forgotten), not +b's whole counter.
    assert c.update({"a": 1001.0, "b": 50.0, "c": 9004.0}) == 7.0


def test_counter_sum_keeps_a_source_whose_scrape_failed() -> None:
    c = CounterSum()
    c.update({"a": 10.0, "b": 10.0})
    # b did not answer but is still there: its last reading stays...
    assert c.update({"a": 12.0}, keep={"a", "b"}) == 2.0
    # ...so the next answer adds both rounds' increments.
    assert c.update({"a": 12.0, "b": 16.0}, keep={"a", "b"}) == 8.0
    # Not kept: forgotten, and the next reading is a baseline.
    c.update({"a": 12.0})
    assert c.update({"a": 12.0, "b": 30.0}) == 8.0


def test_sum_views_adds_gauges_and_counters_per_variant() -> None:
    out = sum_views([GatewayView({"a": 5.0}, {"a": 1.0}, 2.0),
                     GatewayView({"a": 7.0, "b": 1.0}, {"b": 3.0}, 4.0)])
    assert out == GatewayView({"a": 12.0, "b": 1.0}, {"a": 1.0, "b": 3.0}, 6.0)
    assert sum_views([]) == GatewayView({}, {}, 0.0)


# -- which variants get an HPA ------------------------------------------------------------------


@pytest.mark.parametrize(("autoscaling", "extra", "target"), [
    (CPU_ONLY, None, 70.0),
    ({**CPU_ONLY, "targetTracking": [{"metric": "CPUUtilization", "target": 80},
                                     {"metric": "CPUUtilization", "target": 50}]}, None, 50.0),
    ({**CPU_ONLY, "targetTracking": [CPU_ONLY["targetTracking"][0], INVOCATIONS]}, None, None),
    ({**CPU_ONLY, "stepScaling": [{"metric": "InvocationsPerReplica",
                                   "steps": [{"lowerBound": 1, "change": 1}]}]}, None, None),
    ({**CPU_ONLY, "scheduled": [{"cron": "* 9-17 * * *", "minReplicas": 3,
                                 "maxReplicas": 6}]}, None, None),
    ({**CPU_ONLY, "minReplicas": 0}, None, None),
    (CPU_ONLY, {"type": "Serverless"}, None),
    ({"maxReplicas": 3, "targetTracking": [INVOCATIONS]}, None, None),
    (None, None, None),
], ids=["cpu-only", "two-cpu-targets", "cpu+invocations", "cpu+steps", "cpu+schedule",
        "min-0", "serverless", "invocations", "no-autoscaling"])
def test_only_cpu_alone_becomes_an_hpa(autoscaling: dict[str, Any] | None,
                                       extra: dict[str, Any] | None,
                                       target: float | None) -> None:
    plan = plan_of(autoscaling, extra=extra)
    assert ka.hpa_cpu_target(plan, plan.variants[0]) == target
    assert ka.hpa_variants(plan) == ({"main"} if target is not None else set())
    hpas = [k for k in rendered(plan) if k[0] == "HorizontalPodAutoscaler"]
    assert hpas == ([("HorizontalPodAutoscaler", "ep-main")] if target is not None else [])


@pytest.mark.parametrize(("percent", "quantity"),
                         [(70, "700m"), (12.5, "125m"), (150, "1500m"), (0.01, "1m")])
def test_cpu_target_is_a_share_of_one_core(percent: float, quantity: str) -> None:
    assert ka.cpu_quantity(percent) == quantity


def test_hpa_manifest_is_valid_owned_and_tracks_the_target() -> None:
    plan = plan_of(CPU_ONLY)
    hpa = rendered(plan)[("HorizontalPodAutoscaler", "ep-main")]
    # The real tool, as `kubernetes-validate --strict -k 1.33.0` runs it, and the cached one.
    kubernetes_validate.validate(hpa, "1.33.0", strict=True)
    assert schema_errors(hpa) == []
    assert hpa["apiVersion"] == "autoscaling/v2"
    md = hpa["metadata"]
    assert md["namespace"] == "ml"
    assert md["ownerReferences"] == [meta.owner_reference("ep", OWNER.uid)]
    assert md["labels"] == meta.labels("ep", meta.COMPONENT_MODEL_SERVER, "main")
    assert md["annotations"][meta.ANNOTATION_APPLIED_HASH]
    spec = hpa["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                      "name": "ep-main"}
    assert (spec["minReplicas"], spec["maxReplicas"]) == (2, 6)
    assert spec["metrics"] == [{"type": "Resource", "resource": {
        "name": "cpu", "target": {"type": "AverageValue", "averageValue": "700m"}}}]
    assert spec["behavior"] == {"scaleDown": {"stabilizationWindowSeconds": 120},
                                "scaleUp": {"stabilizationWindowSeconds": 15}}


def test_hpa_stabilization_windows_stay_within_the_api_bound() -> None:
    plan = plan_of({**CPU_ONLY, "scaleInCooldown": 86400, "scaleOutCooldown": 0})
    behavior = rendered(plan)[("HorizontalPodAutoscaler", "ep-main")]["spec"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] == 3600
    assert behavior["scaleUp"]["stabilizationWindowSeconds"] == 0
    kubernetes_validate.validate(
        rendered(plan)[("HorizontalPodAutoscaler", "ep-main")], "1.33.0", strict=True)


def test_a_typo_in_the_hpa_fails_validation() -> None:
    hpa = rendered(plan_of(CPU_ONLY))[("HorizontalPodAutoscaler", "ep-main")]
    hpa["spec"]["maxReplica"] = 3
    assert any("maxReplica" in e for e in schema_errors(hpa))


def test_hpa_owned_deployment_is_created_with_replicas_then_never_given_them() -> None:
    plan = plan_of({**CPU_ONLY, "minReplicas": 3})
    new = rendered(plan)[("Deployment", "ep-main")]
    assert new["spec"]["replicas"] == 3  # a new Deployment starts inside the bounds
    existing = rendered(plan, existing=("main",))[("Deployment", "ep-main")]
    assert "replicas" not in existing["spec"]  # the HPA owns them from then on
    assert schema_errors(existing) == []
    # Our own policies keep writing replicas.
    other = plan_of({"maxReplicas": 3, "targetTracking": [INVOCATIONS]})
    assert rendered(other, existing=("main",))[("Deployment", "ep-main")]["spec"]["replicas"] == 1


def test_leaving_cpu_only_deletes_the_hpa_and_adds_the_gateway_pods_service() -> None:
    before = list(rendered(plan_of(CPU_ONLY), existing=("main",)).values())
    after = list(rendered(plan_of({"maxReplicas": 6, "targetTracking": [INVOCATIONS]}),
                          existing=("main",)).values())
    changes = diff_children(after, before, owner_uid=OWNER.uid, owner_name="ep", namespace="ml")
    assert changes.delete == [ObjectKey("HorizontalPodAutoscaler", "ep-main")]
    assert [(m["kind"], m["metadata"]["name"]) for m in changes.create] == [
        ("Service", "ep-gateway-pods")]
    # The Deployment is written with replicas again (the scaler's: replicas_for).
    [deployment] = [m for m in changes.patch if m["kind"] == "Deployment"]
    assert deployment["spec"]["replicas"] == 1
    # And the way back: the HPA is created again, the Service deleted.
    back = diff_children(before, after, owner_uid=OWNER.uid, owner_name="ep", namespace="ml")
    assert back.delete == [ObjectKey("Service", "ep-gateway-pods")]
    assert [m["kind"] for m in back.create] == ["HorizontalPodAutoscaler"]


# -- the headless gateway-pods Service -----------------------------------------------------------


@pytest.mark.parametrize(("autoscaling", "extra", "wanted"), [
    ({"maxReplicas": 3, "targetTracking": [INVOCATIONS]}, None, True),
    (None, {"type": "Serverless"}, True),
    (None, None, False),
    (CPU_ONLY, None, False),  # the HPA needs no gateway metrics
    (None, {"type": "Async", "async": {"outputPath": "s3://b/out"}}, False),
], ids=["autoscaled", "serverless", "plain", "hpa-only", "async"])
def test_gateway_pods_service_only_where_the_scaler_reads_gateways(
        autoscaling: dict[str, Any] | None, extra: dict[str, Any] | None, wanted: bool) -> None:
    plan = plan_of(autoscaling, extra=extra)
    assert ka.scrapes_gateway(plan) is wanted
    out = rendered(plan)
    assert (("Service", "ep-gateway-pods") in out) is wanted


def test_gateway_pods_service_is_headless_over_the_gateway_pods() -> None:
    out = rendered(plan_of({"maxReplicas": 3, "targetTracking": [INVOCATIONS]}))
    svc = out[("Service", "ep-gateway-pods")]
    kubernetes_validate.validate(svc, "1.33.0", strict=True)
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["selector"] == (
        out[("Deployment", "ep-gateway")]["spec"]["selector"]["matchLabels"])
    # Not "metrics": a ServiceMonitor selecting port metrics must not scrape the pods
    # twice; the scaler scrapes the pods' metrics listener through it.
    assert [p["name"] for p in svc["spec"]["ports"]] == ["scrape"]
    assert svc["spec"]["ports"][0]["targetPort"] == "metrics"
    assert svc["metadata"]["ownerReferences"] == [meta.owner_reference("ep", OWNER.uid)]


def test_gateway_pods_is_a_reserved_variant_name() -> None:
    spec = {"variants": [{"name": "gateway-pods", "model": {"uri": "s3://b/m.onnx"}}]}
    with pytest.raises(InvalidSpec) as info:
        validate_endpoint("ep", "ml", spec)
    assert "spec.variants[0].name: 'gateway-pods' is reserved" in str(info.value)


# -- CPUUtilization mixed with other policies: refused on Kubernetes only -------------------------


def test_cpu_beside_other_policies_names_the_field_and_the_fix() -> None:
    plan = plan_of({"maxReplicas": 4, "targetTracking": [INVOCATIONS, {
        "metric": "CPUUtilization", "target": 70}]}, more_variants=[
        {"name": "b", "model": {"uri": "s3://b/m.onnx"}, "autoscaling": {
            "maxReplicas": 3, "targetTracking": [{"metric": "CPUUtilization", "target": 50}],
            "stepScaling": [{"metric": "CPUUtilization",
                             "steps": [{"lowerBound": 90, "change": 2}]}]}}])
    problems = ka.autoscaling_problems(plan)
    assert len(problems) == 3
    first, second, third = problems
    assert first.startswith("spec.variants[0].autoscaling.targetTracking[1]: CPUUtilization")
    assert "other targetTracking metrics" in first
    assert "use CPUUtilization alone in targetTracking" in first
    assert "Custom PromQL query" in first
    assert second.startswith("spec.variants[1].autoscaling.targetTracking[0]:")
    assert "stepScaling" in second
    assert third.startswith("spec.variants[1].autoscaling.stepScaling[0]: CPUUtilization step")
    for p in problems:
        assert not p.endswith(".")


@pytest.mark.parametrize(("autoscaling", "extra", "why"), [
    ({**CPU_ONLY, "minReplicas": 0}, None, "minReplicas 0"),
    (CPU_ONLY, {"type": "Serverless"}, "a Serverless endpoint"),
    ({**CPU_ONLY, "scheduled": [{"cron": "* * * * *", "minReplicas": 2, "maxReplicas": 3}]},
     None, "scheduled scaling"),
])
def test_cpu_that_cannot_be_an_hpa_says_why(autoscaling: dict[str, Any],
                                            extra: dict[str, Any] | None, why: str) -> None:
    [problem] = ka.autoscaling_problems(plan_of(autoscaling, extra=extra))
    assert problem.startswith("spec.variants[0].autoscaling.targetTracking[0]:")
    assert why in problem


def test_supported_policies_have_no_problem_and_the_api_model_still_allows_mixing() -> None:
    assert ka.autoscaling_problems(plan_of(CPU_ONLY)) == []
    assert ka.autoscaling_problems(plan_of({"maxReplicas": 3,
                                            "targetTracking": [INVOCATIONS]})) == []
    assert ka.autoscaling_problems(plan_of(None)) == []
    # Local mode measures CPU itself: the shared model (and validate_endpoint) accept it.
    mixed = {"maxReplicas": 3, "targetTracking": [INVOCATIONS, {
        "metric": "CPUUtilization", "target": 70}]}
    validate_endpoint("ep", "ml", {"variants": [
        {"name": "main", "model": {"uri": "s3://b/m.onnx"}, "autoscaling": mixed}]})


# -- the scaler: every gateway pod, summed; HPA variants left alone ------------------------------


def metrics(**counts: float) -> str:
    """A gateway's /metrics body with invocations of variant ``main`` (and held=0)."""
    lines = ["# TYPE kubeinfer_gateway_invocations counter"]
    for variant, n in counts.items():
        lines.append(f'kubeinfer_gateway_invocations_total{{endpoint="ep",variant="{variant}"}} '
                     f"{n}")
    return "\n".join(lines) + "\n"


class Gateways:
    """Fake gateway pods for the scaler: discovery answers, /metrics bodies, a clock."""

    def __init__(self) -> None:
        self.bodies: dict[str, str | None] = {}
        self.hanging: set[str] = set()
        self.fetched: list[str] = []
        self.t = 0.0
        #: Whether listing the gateway pods hangs (an API server that never answers).
        self.listing_hangs = False

    async def discover(self, namespace: str, endpoint: str) -> list[str]:
        assert (namespace, endpoint) == ("ml", "ep")
        if self.listing_hangs:
            await asyncio.Event().wait()
        return sorted(self.bodies) + sorted(self.hanging)

    async def fetch(self, url: str) -> str | None:
        self.fetched.append(url)
        base = url.removesuffix("/metrics")
        if base in self.hanging:
            await asyncio.Event().wait()  # a pod that accepts and never answers
        return self.bodies.get(base)

    def scaler(self) -> ClusterScaler:
        s = ClusterScaler(monotonic=lambda: self.t)
        s.discover = self.discover
        s.scrape_timeout_s = 0.05
        return s


NOW = datetime(2026, 1, 5, 3, 0, tzinfo=UTC)  # a Monday night: no schedule in force


async def evaluate(scaler: ClusterScaler, plan: EndpointPlan, gw: Gateways, replicas: int,
                   fetch: Callable[[str], Any] | None = None) -> list[str]:
    return await scaler.evaluate(plan, "ml", {"main": replicas}, now=NOW,
                                 fetch=fetch or gw.fetch)


def invocations_plan(min_replicas: int = 1) -> EndpointPlan:
    return plan_of({"minReplicas": min_replicas, "maxReplicas": 10, "scaleOutCooldown": 0,
                    "targetTracking": [INVOCATIONS]})


async def test_the_sum_over_gateway_pods_drives_the_decision() -> None:
    gw = Gateways()
    scaler = gw.scaler()
    plan = invocations_plan()
    gw.bodies = {"http://10.0.0.1:8080": metrics(main=100), "http://10.0.0.2:8080":
                 metrics(main=100)}
    assert await evaluate(scaler, plan, gw, 1) == []
    gw.t = 30.0
    gw.bodies = {"http://10.0.0.1:8080": metrics(main=130), "http://10.0.0.2:8080":
                 metrics(main=130)}
    # 60 invocations in 30 s = 120/min on 1 replica, target 60 → 2 replicas. One
    # pod's view alone (30 in 30 s = 60/min) would be on target and scale nothing.
    [message] = await evaluate(scaler, plan, gw, 1)
    assert "Scaled out from 1 to 2" in message and "InvocationsPerReplica 120" in message
    assert sorted(gw.fetched) == sorted(f"http://10.0.0.{i}:8080/metrics"
                                        for i in (1, 1, 2, 2))


async def test_a_restarted_or_replaced_gateway_pod_makes_no_bogus_scale_out() -> None:
    gw = Gateways()
    scaler = gw.scaler()
    plan = invocations_plan(min_replicas=2)
    a, b, c = "http://10.0.0.1:8080", "http://10.0.0.2:8080", "http://10.0.0.3:8080"
    gw.bodies = {a: metrics(main=5000), b: metrics(main=5000)}
    assert await evaluate(scaler, plan, gw, 2) == []
    gw.t = 20.0
    gw.bodies = {a: metrics(main=5000), b: metrics(main=4)}  # b restarted: counter reset
    assert await evaluate(scaler, plan, gw, 2) == []
    gw.t = 40.0
    gw.bodies = {a: metrics(main=5000), c: metrics(main=9000)}  # b replaced by c
    assert await evaluate(scaler, plan, gw, 2) == []
    gw.t = 60.0
    gw.bodies = {a: metrics(main=5001), c: metrics(main=9001)}
    assert await evaluate(scaler, plan, gw, 2) == []
    mem = scaler.memory[("ml", "ep", "main")]
    assert mem.invocations.total == 2.0 and mem.desired is None
    # A naive sum of the counters (10000 → 5004 → 14000 → 14002) would have
    # seen ~9000 invocations a minute and scaled out to the maximum.


async def test_a_dead_gateway_pod_is_skipped_without_blocking_the_decision() -> None:
    gw = Gateways()
    scaler = gw.scaler()
    plan = invocations_plan()
    gw.hanging = {"http://10.0.0.9:8080"}
    gw.bodies = {"http://10.0.0.1:8080": metrics(main=0), "http://10.0.0.2:8080": None}
    await evaluate(scaler, plan, gw, 1)
    gw.t = 30.0
    gw.bodies = {"http://10.0.0.1:8080": metrics(main=90), "http://10.0.0.2:8080": None}
    [message] = await asyncio.wait_for(evaluate(scaler, plan, gw, 1), timeout=5)
    assert "Scaled out from 1 to 3" in message  # 90 in 30 s = 180/min vs target 60


async def test_no_ready_gateway_pod_means_nothing_is_scraped() -> None:
    # Nothing to fall back on: the gateway Service is the tenant's to repoint.
    gw = Gateways()
    scaler = gw.scaler()
    assert await evaluate(scaler, invocations_plan(), gw, 1) == []
    assert gw.fetched == []


async def test_a_pod_listing_that_hangs_skips_the_round_and_keeps_the_counters() -> None:
    gw = Gateways()
    scaler = gw.scaler()
    plan = invocations_plan()
    gw.bodies = {"http://10.0.0.1:8080": metrics(main=100)}
    assert await evaluate(scaler, plan, gw, 1) == []
    gw.listing_hangs = True
    gw.t = 15.0
    with pytest.raises(GatewaysUnknown, match="Endpoint ml/ep"):
        await asyncio.wait_for(evaluate(scaler, plan, gw, 1), timeout=5)
    gw.listing_hangs = False
    gw.t = 30.0
    gw.bodies = {"http://10.0.0.1:8080": metrics(main=160)}
    # The skipped round forgot no pod: all 60 invocations count (120/min vs target 60).
    [message] = await evaluate(scaler, plan, gw, 1)
    assert "Scaled out from 1 to 2" in message


async def test_held_requests_on_any_gateway_pod_wake_a_serverless_variant() -> None:
    gw = Gateways()
    scaler = gw.scaler()
    plan = plan_of(None, extra={"type": "Serverless"})
    held = 'kubeinfer_gateway_held_requests{endpoint="ep",variant="main"} 1.0\n'
    gw.bodies = {"http://10.0.0.1:8080": metrics(), "http://10.0.0.2:8080": held}
    [message] = await evaluate(scaler, plan, gw, 0)
    assert "Scaled out from 0 to 1" in message and "cold start" in message


async def test_hpa_variants_are_left_to_the_hpa() -> None:
    gw = Gateways()
    scaler = gw.scaler()
    plan = plan_of(CPU_ONLY)

    async def no_fetch(url: str) -> str | None:
        raise AssertionError(f"nothing to scrape for an HPA-only endpoint, fetched {url}")

    # A stale decision of ours from before the spec turned CPU-only is dropped.
    mem = scaler._mem(("ml", "ep", "main"))
    mem.desired = 9
    assert await evaluate(scaler, plan, gw, 4, fetch=no_fetch) == []
    reason = scaler.reason_for("ml", "ep", "main")
    assert reason is not None and "HorizontalPodAutoscaler ml/ep-main" in reason
    assert "700m" in reason
    # replicas_for keeps whatever the HPA set, even outside the spec's bounds.
    deployments = {"ep-main": {"spec": {"replicas": 5}}}
    assert scaler.replicas_for(plan, "ml", deployments).variants[0].replicas == 5
    # Back to our own policies: a fresh memory, no HPA reason.
    other = invocations_plan()
    scaler.hand_over_to_hpas(other, "ml")
    assert scaler.reason_for("ml", "ep", "main") is None
    assert scaler.replicas_for(other, "ml", deployments).variants[0].replicas == 5


def test_an_honoured_scale_request_does_not_wake_the_variant_again() -> None:
    """Pure decisions (``ScalerMemory``): one cold start per request, no 0 -> 1 -> 0 flapping."""
    from datetime import timedelta

    from kubeinfer_operator.reconcile.cluster_scaling import ScalerMemory

    plan = plan_of(None, extra={"type": "Serverless", "serverless": {"idleTimeout": 1}})
    memory = ScalerMemory()
    quiet = {"http://10.0.0.1:8080": GatewayView(invocations={}, held={}, in_flight=0.0)}
    memory.mark_requested(("ml", "ep", "main"), 0.0)
    [woke] = memory.decide_scraped(plan, "ml", {"main": 0}, quiet, {}, now=NOW, now_m=0.5)
    assert "Scaled out from 0 to 1" in woke
    [slept] = memory.decide_scraped(plan, "ml", {"main": 1}, quiet, {},
                                    now=NOW + timedelta(seconds=3), now_m=3.0)
    assert "Scaled in from 1 to 0" in slept
    # 4 s after the request (still "fresh" for 10 s) and nothing held: stays at zero.
    assert memory.decide_scraped(plan, "ml", {"main": 0}, quiet, {},
                                 now=NOW + timedelta(seconds=4), now_m=4.0) == []


# -- shadows: their own autoscaling, on the copies they are offered ---------------------------


def shadow_plan(autoscaling: dict[str, Any] | None, extra: dict[str, Any] | None = None,
                replicas: int = 1) -> EndpointPlan:
    shadow: dict[str, Any] = {"name": "cand", "model": {"uri": "s3://b/c.onnx"},
                              "replicas": replicas, "samplingPercentage": 100}
    if autoscaling is not None:
        shadow["autoscaling"] = autoscaling
    return plan_of(None, extra={"shadowVariants": [shadow], **(extra or {})})


def copies(sent: float, dropped: float = 0.0) -> str:
    labels = 'endpoint="ep",variant="main",peer="cand"'
    return (metrics(main=5000) + "# TYPE kubeinfer_shadow_copies counter\n"
            f'kubeinfer_shadow_copies_total{{{labels},result="sent"}} {sent}\n'
            f'kubeinfer_shadow_copies_total{{{labels},result="dropped"}} {dropped}\n')


async def test_a_shadow_scales_on_the_copies_it_is_offered_dropped_ones_included() -> None:
    gw = Gateways()
    scaler = gw.scaler()
    plan = shadow_plan({"minReplicas": 1, "maxReplicas": 5, "scaleOutCooldown": 0,
                        "targetTracking": [INVOCATIONS]})
    assert ka.scrapes_gateway(plan)
    current = {"main": 1, "cand": 1}

    async def evaluate_both() -> list[str]:
        return await scaler.evaluate(plan, "ml", current, now=NOW, fetch=gw.fetch)

    gw.bodies = {"http://10.0.0.1:8080": copies(sent=100)}
    assert await evaluate_both() == []
    gw.t = 30.0
    # 60 copies offered in 30 s (50 answered, 10 dropped on a full queue) = 120/min on one
    # replica, target 60: two replicas. Production's own invocations did not move.
    gw.bodies = {"http://10.0.0.1:8080": copies(sent=150, dropped=10)}
    [message] = await evaluate_both()
    assert message.startswith("Variant cand: Scaled out from 1 to 2"), message
    assert "InvocationsPerReplica 120" in message
    assert scaler.replicas_for(plan, "ml", {}).variants[1].replicas == 2
    assert ("ml", "ep", "main") not in scaler.memory  # production has no policy


async def test_a_shadow_of_a_serverless_endpoint_is_never_scaled_to_zero() -> None:
    gw = Gateways()
    scaler = gw.scaler()
    fixed = shadow_plan(None, {"type": "Serverless"}, replicas=2)
    scaled = shadow_plan({"minReplicas": 1, "maxReplicas": 3, "scaleInCooldown": 0,
                          "targetTracking": [INVOCATIONS]}, {"type": "Serverless"})
    for plan in (fixed, scaled):
        assert plan.scales_to_zero(plan.variants[0])
        assert not plan.scales_to_zero(plan.variants[1])
        assert plan.variants[1].replicas == (2 if plan is fixed else 1)
    # A fixed shadow's replicas follow the spec, not the Deployment's (an edit applies).
    deployments = {"ep-cand": {"spec": {"replicas": 7}}}
    assert scaler.replicas_for(fixed, "ml", deployments).variants[1].replicas == 2
    # Idle for minutes: production goes to zero, the shadow stays at its minimum.
    for t in range(0, 1200, 30):
        gw.t = float(t)
        gw.bodies = {"http://10.0.0.1:8080": copies(sent=0)}
        await scaler.evaluate(scaled, "ml", {"main": 1, "cand": 1}, now=NOW, fetch=gw.fetch)
    main = scaler.memory[("ml", "ep", "main")]
    assert main.desired == 0
    cand = scaler.memory.get(("ml", "ep", "cand"))
    assert cand is None or cand.desired in (None, 1)


def test_a_cpu_only_shadow_becomes_an_hpa_and_problems_name_the_shadow_field() -> None:
    plan = shadow_plan(CPU_ONLY, {"type": "Serverless"})
    assert ka.hpa_variants(plan) == {"cand"}  # a shadow never scales to zero: an HPA can
    assert ("HorizontalPodAutoscaler", "ep-cand") in rendered(plan)
    mixed = shadow_plan({**CPU_ONLY, "stepScaling": [
        {"metric": "CPUUtilization", "steps": [{"lowerBound": 1, "change": 1}]}]})
    problems = ka.autoscaling_problems(mixed)
    assert [p.split(":")[0] for p in problems] == [
        "spec.shadowVariants[0].autoscaling.targetTracking[0]",
        "spec.shadowVariants[0].autoscaling.stepScaling[0]"], problems


@pytest.mark.parametrize("autoscaling", [
    {"minReplicas": 0, "maxReplicas": 3, "targetTracking": [INVOCATIONS]},
    {"minReplicas": 1, "maxReplicas": 3, "targetTracking": [INVOCATIONS],
     "scheduled": [{"cron": "* 0-6 * * *", "minReplicas": 0, "maxReplicas": 1}]},
])
def test_a_shadow_cannot_scale_to_zero(autoscaling: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="cannot scale a shadow to zero"):
        shadow_plan(autoscaling)


def test_gateway_views_count_the_copies_each_shadow_was_offered() -> None:
    from kubeinfer_operator.reconcile.autoscale_metrics import parse_gateway_metrics

    text = copies(sent=7, dropped=3) + (
        'kubeinfer_shadow_copies_total{endpoint="ep",variant="other",peer="cand",'
        'result="failed"} 2\n'
        'kubeinfer_shadow_copies_total{endpoint="ep2",variant="main",peer="cand",'
        'result="sent"} 100\n')
    view = parse_gateway_metrics(text, "ep")
    assert view.copies == {"cand": 12.0}
    assert view.offered("cand", shadow=True) == 12.0
    assert view.offered("main", shadow=False) == 5000.0
    assert sum_views([view, view]).copies == {"cand": 24.0}


# -- autoscaled variants under deploymentConfig -------------------------------------------------

GUARDED = {"deploymentConfig": {"blueGreen": {"trafficRouting": {
    "type": "Canary", "waitIntervalInSeconds": 10,
    "canarySize": {"type": "CapacityPercent", "value": 50}}}}}


def guarded_plan() -> EndpointPlan:
    return plan_of({"minReplicas": 1, "maxReplicas": 10, "scaleOutCooldown": 0,
                    "targetTracking": [INVOCATIONS]}, extra=GUARDED)


async def test_a_guarded_variant_scales_on_both_fleets_and_holds_while_it_rolls() -> None:
    gw = Gateways()
    scaler = gw.scaler()
    plan = guarded_plan()
    assert plan.guarded and plan.routes_of(plan.variants[0]) == ("main", "main-green")

    def both(blue: float, green: float) -> str:
        return metrics(main=blue) + (
            f'kubeinfer_gateway_invocations_total{{endpoint="ep",variant="main-green"}} '
            f"{green}\n")

    async def evaluate_held(held: frozenset[str]) -> list[str]:
        return await scaler.evaluate(plan, "ml", {"main": 1}, now=NOW, fetch=gw.fetch,
                                     held=held)

    gw.bodies = {"http://10.0.0.1:8080": both(100, 0)}
    assert await evaluate_held(frozenset()) == []
    # Rolling out: 60 + 60 requests in 30 s on the two fleets = 240/min, but held.
    gw.t = 30.0
    gw.bodies = {"http://10.0.0.1:8080": both(160, 60)}
    assert await evaluate_held(frozenset({"main"})) == []
    assert scaler.memory[("ml", "ep", "main")].desired is None
    # The rollout is over (green serves): the same window now decides, both series summed.
    gw.t = 45.0
    gw.bodies = {"http://10.0.0.1:8080": both(160, 120)}
    [message] = await evaluate_held(frozenset())
    assert "Scaled out from 1 to 4" in message, message  # 180 in 45 s = 240/min, target 60


def test_a_guarded_variant_keeps_the_replicas_of_the_fleet_that_serves() -> None:
    scaler = ClusterScaler(monotonic=lambda: 0.0)
    plan = guarded_plan()
    # After a rollout the green slot serves (blue removed), scaled to 6 meanwhile: a new
    # spec or an operator restart must not fall back to the spec's starting replicas.
    deployments = {"ep-main-green": {"spec": {"replicas": 6}}}
    assert scaler.replicas_for(plan, "ml", deployments).variants[0].replicas == 6
    both = {"ep-main": {"spec": {"replicas": 3}}, "ep-main-green": {"spec": {"replicas": 2}}}
    assert scaler.replicas_for(plan, "ml", both).variants[0].replicas == 3


def test_cpu_alone_under_deployment_config_is_not_an_hpa_and_says_why() -> None:
    plan = plan_of(CPU_ONLY, extra=GUARDED)
    assert ka.hpa_variants(plan) == set()
    [problem] = ka.autoscaling_problems(plan)
    assert problem.startswith("spec.variants[0].autoscaling.targetTracking[0]")
    assert "deploymentConfig" in problem
