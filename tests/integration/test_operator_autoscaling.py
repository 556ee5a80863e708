"""Auto scaling on Kubernetes: HPAs for CPU-only variants, every gateway pod scraped.

* The real kopf operator on the Kubernetes emulator: a variant scaled on
  CPUUtilization alone gets an owned ``autoscaling/v2`` HPA and the operator
  never writes the replicas the HPA sets; turning the policy into
  InvocationsPerReplica deletes the HPA and brings the headless gateway-pods
  Service; CPUUtilization mixed with another policy is ``InvalidSpec``. No
  HPA controller runs here: the test plays it by patching the Deployment.
* The scaler over real HTTP: two fake gateway pods (aiohttp on 127.0.0.1) plus
  a pod that never answers and one that refuses connections, found by an
  injected discovery (no pods run here): the sum of the live
  pods' counters drives the decision, a restarted pod's counter reset does not
  scale out, the dead pods cost at most the scrape timeout.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from aiohttp import web

from kubeinfer_operator.api.endpoint import Endpoint
from kubeinfer_operator.render.k8s import Owner, render_endpoint
from kubeinfer_operator.render.plan import plan_endpoint
from kubeinfer_operator.scaling.cluster import ClusterScaler
from kubeinfer_operator.settings import OperatorSettings
from tests.support.kube_harness import (
    Kube,
    operator_on_emulator,
    wait_for,
)
from tests.support.ports import free_port

HPA = "HorizontalPodAutoscaler"
CPU_ONLY: dict[str, Any] = {"minReplicas": 2, "maxReplicas": 5, "scaleInCooldown": 90,
                             "targetTracking": [{"metric": "CPUUtilization", "target": 70}]}
INVOCATIONS = {"metric": "InvocationsPerReplica", "target": 60}


def endpoint(name: str, autoscaling: dict[str, Any],
             env: list[dict[str, str]] | None = None) -> dict[str, Any]:
    return {"apiVersion": "kubeinfer.io/v1alpha1", "kind": "Endpoint", "metadata": {"name": name},
            "spec": {"variants": [{"name": "main", "model": {"uri": "s3://b/iris.onnx"},
                                   "env": env or [], "autoscaling": autoscaling}]}}


SETTINGS = OperatorSettings(standalone=True, status_interval_s=0.3, namespaces=[],
                            runtime_image="example.test/runtime:1")


@pytest.fixture(scope="module")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kube]:
    with operator_on_emulator(SETTINGS, tmp_path_factory.mktemp("kube")) as (client, _):
        yield client


def applied_hash(obj: dict[str, Any] | None) -> str | None:
    value = ((obj or {}).get("metadata") or {}).get("annotations", {}).get(
        "kubeinfer.io/applied-hash")
    return value if isinstance(value, str) else None


def ready_condition(kube: Kube, ns: str, name: str) -> dict[str, Any]:
    ep = kube.get("Endpoint", ns, name) or {}
    conds = {c["type"]: c for c in (ep.get("status") or {}).get("conditions", [])}
    return dict(conds.get("Ready") or {})


def test_cpu_only_variant_gets_an_hpa_that_owns_the_replicas(kube: Kube) -> None:
    ns = "hpa"
    kube.create_namespace(ns)
    assert kube.create(endpoint("cpu", CPU_ONLY), ns).status_code == 201
    hpa = wait_for(lambda: kube.get(HPA, ns, "cpu-main"), what="the variant's HPA")
    ep = kube.get("Endpoint", ns, "cpu")
    assert ep is not None
    assert hpa["metadata"]["ownerReferences"] == [{
        "apiVersion": "kubeinfer.io/v1alpha1", "kind": "Endpoint", "name": "cpu",
        "uid": ep["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}]
    assert hpa["metadata"]["labels"]["kubeinfer.io/variant"] == "main"
    spec = hpa["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                      "name": "cpu-main"}
    assert (spec["minReplicas"], spec["maxReplicas"]) == (2, 5)
    assert spec["metrics"][0]["resource"]["target"] == {"type": "AverageValue",
                                                        "averageValue": "700m"}
    assert spec["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 90
    # Created at the starting count inside the bounds; no gateway scraping needed.
    dep = wait_for(lambda: kube.get("Deployment", ns, "cpu-main"), what="variant Deployment")
    assert dep["spec"]["replicas"] == 2
    assert "cpu-gateway-pods" not in kube.names("Service", ns)

    # With no spec change, the next reconcile (at once: the Deployment's own event
    # triggers it) re-applies the Deployment once, from now on without spec.replicas
    # (they belong to the HPA).
    doc = endpoint("cpu", CPU_ONLY)
    doc["metadata"]["namespace"] = ns
    plan = plan_endpoint(Endpoint.model_validate(doc), generation=1)
    without_replicas = next(
        m for m in render_endpoint(plan, Owner("cpu", ns, ep["metadata"]["uid"]), SETTINGS,
                                   set(), {"main"})
        if m["kind"] == "Deployment" and m["metadata"]["name"] == "cpu-main")
    assert "replicas" not in without_replicas["spec"]
    wait_for(lambda: applied_hash(kube.get("Deployment", ns, "cpu-main"))
             == applied_hash(without_replicas), what="the Deployment re-applied without replicas")
    # The HPA scales to 4; a spec change re-renders the Deployment and must keep the 4.
    kube.patch("Deployment", ns, "cpu-main", {"spec": {"replicas": 4}})
    before = applied_hash(kube.get("Deployment", ns, "cpu-main"))
    kube.patch("Endpoint", ns, "cpu", {"spec": endpoint(
        "cpu", CPU_ONLY, env=[{"name": "X", "value": "1"}])["spec"]})
    wait_for(lambda: applied_hash(kube.get("Deployment", ns, "cpu-main")) != before,
             what="the Deployment re-rendered for the new env")
    assert (kube.get("Deployment", ns, "cpu-main") or {})["spec"]["replicas"] == 4

    def last_scaling() -> str:
        status = (kube.get("Endpoint", ns, "cpu") or {}).get("status") or {}
        return str(((status.get("variants") or [{}])[0]).get("lastScaling") or "")

    assert "HorizontalPodAutoscaler hpa/cpu-main" in wait_for(last_scaling,
                                                              what="lastScaling")

    # Our own policy instead: the HPA goes, the gateway pods get scraped, and the
    # replicas the HPA left (4, inside the new bounds) are kept.
    kube.patch("Endpoint", ns, "cpu", {"spec": endpoint(
        "cpu", {"minReplicas": 1, "maxReplicas": 5, "targetTracking": [INVOCATIONS]})["spec"]})
    wait_for(lambda: kube.get(HPA, ns, "cpu-main") is None, what="the HPA deleted")
    wait_for(lambda: "cpu-gateway-pods" in kube.names("Service", ns),
             what="the headless gateway-pods Service")
    pods = kube.get("Service", ns, "cpu-gateway-pods")
    assert pods is not None and pods["spec"]["clusterIP"] == "None"
    assert (kube.get("Deployment", ns, "cpu-main") or {})["spec"]["replicas"] == 4
    wait_for(lambda: "HorizontalPodAutoscaler" not in last_scaling(),
             what="lastScaling no longer naming the HPA")


def test_cpu_mixed_with_another_policy_is_invalid_on_kubernetes(kube: Kube) -> None:
    ns = "mixed"
    kube.create_namespace(ns)
    mixed = {"maxReplicas": 3, "targetTracking": [INVOCATIONS, {"metric": "CPUUtilization",
                                                                 "target": 70}]}
    assert kube.create(endpoint("mix", mixed), ns).status_code == 201
    cond = wait_for(lambda: ready_condition(kube, ns, "mix"), what="a Ready condition")
    assert cond["status"] == "False" and cond["reason"] == "InvalidSpec"
    message = cond["message"]
    assert "spec.variants[0].autoscaling.targetTracking[1]" in message
    assert "use CPUUtilization alone" in message and "Custom PromQL" in message
    assert kube.list("Deployment", ns) == [] and kube.list(HPA, ns) == []

    # Fixed (CPU alone): deployed, with its HPA.
    kube.patch("Endpoint", ns, "mix", {"spec": endpoint("mix", {
        "maxReplicas": 3, "targetTracking": [{"metric": "CPUUtilization",
                                              "target": 70}]})["spec"]})
    wait_for(lambda: kube.get(HPA, ns, "mix-main"), what="the HPA once the spec is fixed")
    wait_for(lambda: ready_condition(kube, ns, "mix").get("reason") != "InvalidSpec",
             what="InvalidSpec cleared")


def test_a_shadow_scales_with_its_own_policy(kube: Kube) -> None:
    """A shadow's autoscaling on Kubernetes: CPU alone is an HPA on the shadow's
    Deployment; our own policy brings the gateway-pods Service the scaler reads the
    copies from; CPU mixed with another policy is InvalidSpec naming the shadow."""
    ns = "shadow-scaling"
    kube.create_namespace(ns)

    def shadowed(autoscaling: dict[str, Any]) -> dict[str, Any]:
        return {"apiVersion": "kubeinfer.io/v1alpha1", "kind": "Endpoint",
                "metadata": {"name": "sh"},
                "spec": {"variants": [{"name": "main", "model": {"uri": "s3://b/iris.onnx"}}],
                         "shadowVariants": [{"name": "cand", "samplingPercentage": 50,
                                             "model": {"uri": "s3://b/iris2.onnx"},
                                             "autoscaling": autoscaling}]}}

    assert kube.create(shadowed(CPU_ONLY), ns).status_code == 201
    hpa = wait_for(lambda: kube.get(HPA, ns, "sh-cand"), what="the shadow's HPA")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "sh-cand"
    assert kube.get(HPA, ns, "sh-main") is None  # production has no policy
    dep = wait_for(lambda: kube.get("Deployment", ns, "sh-cand"), what="shadow Deployment")
    assert dep["spec"]["replicas"] == 2  # minReplicas

    kube.patch("Endpoint", ns, "sh", {"spec": shadowed(
        {"minReplicas": 1, "maxReplicas": 4, "targetTracking": [INVOCATIONS]})["spec"]})
    wait_for(lambda: kube.get(HPA, ns, "sh-cand") is None, what="the HPA deleted")
    wait_for(lambda: "sh-gateway-pods" in kube.names("Service", ns),
             what="the gateway-pods Service the scaler reads copies from")

    kube.patch("Endpoint", ns, "sh", {"spec": shadowed(
        {"maxReplicas": 3, "targetTracking": [INVOCATIONS, {"metric": "CPUUtilization",
                                                            "target": 70}]})["spec"]})
    cond = wait_for(lambda: (c := ready_condition(kube, ns, "sh")).get("reason")
                    == "InvalidSpec" and c, what="InvalidSpec")
    assert "spec.shadowVariants[0].autoscaling.targetTracking[1]" in cond["message"]


# -- the scaler scraping every gateway pod over HTTP --------------------------------------------


class FakeGateway:
    """A gateway pod's /metrics: invocations of variant ``main`` of endpoint ``ep``."""

    def __init__(self) -> None:
        self.invocations = 0.0
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def _metrics(self, _: web.Request) -> web.Response:
        return web.Response(text=(
            "# TYPE kubeinfer_gateway_invocations counter\n"
            f'kubeinfer_gateway_invocations_total{{endpoint="ep",variant="main"}} '
            f"{self.invocations}\n"))

    async def start(self) -> FakeGateway:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def pods() -> AsyncIterator[tuple[FakeGateway, FakeGateway, str, str]]:
    """Two live gateway pods, one that accepts and never answers, one that is gone."""
    a, b = await FakeGateway().start(), await FakeGateway().start()

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client gives up and closes
        writer.close()

    silent = await asyncio.start_server(hang, "127.0.0.1", 0)
    silent_url = f"http://127.0.0.1:{silent.sockets[0].getsockname()[1]}"
    gone_url = f"http://127.0.0.1:{free_port()}"
    try:
        yield a, b, silent_url, gone_url
    finally:
        silent.close()
        await a.stop()
        await b.stop()


async def test_scaler_sums_every_gateway_pod_over_http(
        pods: tuple[FakeGateway, FakeGateway, str, str]) -> None:
    a, b, silent_url, gone_url = pods
    plan = plan_endpoint(Endpoint.model_validate(
        {"apiVersion": "kubeinfer.io/v1alpha1", "kind": "Endpoint", "metadata": {"name": "ep"},
         "spec": {"variants": [{"name": "main", "model": {"uri": "s3://b/m.onnx"},
                                "autoscaling": {"minReplicas": 2, "maxReplicas": 10,
                                                "scaleOutCooldown": 0,
                                                "targetTracking": [INVOCATIONS]}}]}}))
    clock = [0.0]
    scaler = ClusterScaler(monotonic=lambda: clock[0])
    # The silent pod costs this much per round; the live ones must answer within it even on
    # a loaded machine (0.2 s was missed once on a slow 2-core CI run: a round without
    # pod a or b changes the window and the decision).
    scaler.scrape_timeout_s = 1.0
    asked: list[str] = []

    async def discover(namespace: str, endpoint: str) -> list[str]:
        asked.append(f"{namespace}/{endpoint}")
        return [a.url, b.url, silent_url, gone_url]

    scaler.discover = discover
    now = datetime(2026, 1, 5, 3, 0, tzinfo=UTC)

    async def evaluate(replicas: int) -> list[str]:
        return await asyncio.wait_for(scaler.evaluate(
            plan, "ml", {"main": replicas}, now=now), timeout=10)

    try:
        a.invocations, b.invocations = 5000.0, 7000.0
        assert await evaluate(2) == []
        # b restarts (its counter starts again near 0), a serves little: no scale-out.
        clock[0] = 30.0
        a.invocations, b.invocations = 5010.0, 3.0
        assert await evaluate(2) == []
        clock[0] = 60.0
        a.invocations, b.invocations = 5020.0, 13.0
        assert await evaluate(2) == []  # 30 in 60 s = 15/replica/min, under target 60
        # A burst on both pods: 2 x 450 in 30 s. Per window (0..90 s): 930/90 s =
        # 620/min over 2 replicas = 310/replica/min vs 60 → ceil(2 * 5.17) = 11 → max 10.
        clock[0] = 90.0
        a.invocations, b.invocations = 5470.0, 463.0
        [message] = await evaluate(2)
        assert "Scaled out from 2 to 10" in message, message
        assert asked == ["ml/ep"] * 4
        assert scaler.memory[("ml", "ep", "main")].invocations.total == 930.0
    finally:
        await scaler.close()

