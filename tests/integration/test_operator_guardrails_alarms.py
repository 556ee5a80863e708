"""Deployment guardrails on the emulator: rollbacks by alarms over the gateway's metrics.

The real kopf operator runs against the emulator; the gateway pods it scrapes are
one small local HTTP server (found through ``ClusterScaler.gateway_pods``,
patched before the operator starts: no pods run here) serving
Prometheus text the test controls. Each scrape adds 10 requests to every route
(invocations count error answers too, as the gateway's do); the green fleet of
``iris`` answers half of them with model errors, the green fleet of ``slow``
takes 2 s each, and the green fleet of ``flip`` answers like blue except on one
mirrored pair in ten (the gateway's ``kubeinfer_shadow_*`` comparison counters).
The alarm trips, all traffic goes back to blue at once, blue's Deployment is
never touched and green's is removed.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from kubeinfer_operator.scaling import cluster
from kubeinfer_operator.settings import OperatorSettings
from tests.support.kube_harness import Kube, operator_on_emulator, wait_for
from tests.support.route_json import full_table

NS = "guard-alarms"
SETTINGS = OperatorSettings(standalone=True, status_interval_s=0.2, namespaces=[],
                            runtime_image="example.test/runtime:1", s3_secret_name=None)
BUCKETS = (0.1, 0.5, 2.5)


class FakeGatewayPod:
    """``/metrics`` of one gateway pod: counters that grow by 10 requests per scrape, except
    while ``idle`` is set (no traffic: the counters stay, so no alarm can be evaluated)."""

    def __init__(self) -> None:
        self.scrapes = 0
        self.lock = threading.Lock()
        self.idle = threading.Event()
        pod = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = pod.metrics().encode() if self.path == "/metrics" else b""
                self.send_response(200 if body else 404)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def metrics(self) -> str:
        with self.lock:
            if not self.idle.is_set():
                self.scrapes += 1
            n = self.scrapes * 10
        inv = ["# TYPE kubeinfer_gateway_invocations counter"]
        err = ["# TYPE kubeinfer_gateway_errors counter"]
        lat = ["# TYPE kubeinfer_gateway_upstream_latency_seconds histogram"]
        # Mirrored pairs (both ways) between flip's fleets: green disagrees on 10%.
        cmp = ["# TYPE kubeinfer_shadow_compared counter"]
        dis = ["# TYPE kubeinfer_shadow_disagreed counter"]
        for source, peer in (("primary", "primary-green"), ("primary-green", "primary")):
            labels = f'endpoint="flip",variant="{source}",peer="{peer}"'
            cmp.append(f"kubeinfer_shadow_compared_total{{{labels}}} {n}")
            dis.append(f"kubeinfer_shadow_disagreed_total{{{labels}}} {n // 10}")
        for endpoint in ("iris", "slow", "flip"):
            for route in ("primary", "primary-green"):
                labels = f'endpoint="{endpoint}",variant="{route}"'
                green = route.endswith("-green")
                errors = n // 2 if green and endpoint == "iris" else 0
                took = 2.0 if green and endpoint == "slow" else 0.05
                inv.append(f"kubeinfer_gateway_invocations_total{{{labels}}} {n}")
                err.append(f'kubeinfer_gateway_errors_total{{{labels},code="ModelError"}} '
                           f"{errors}")
                for le in (*BUCKETS, float("inf")):
                    bound = "+Inf" if le == float("inf") else str(le)
                    lat.append(f'kubeinfer_gateway_upstream_latency_seconds_bucket{{{labels},'
                               f'le="{bound}"}} {n if took <= le else 0}')
                lat.append(f"kubeinfer_gateway_upstream_latency_seconds_count{{{labels}}} "
                           f"{n}")
                lat.append(f"kubeinfer_gateway_upstream_latency_seconds_sum{{{labels}}} "
                           f"{n * took}")
        return "\n".join(inv + err + lat + cmp + dis) + "\n"

    def __enter__(self) -> FakeGatewayPod:
        self.thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def pod() -> Iterator[FakeGatewayPod]:
    with FakeGatewayPod() as fake:
        yield fake


@pytest.fixture(scope="module")
def kube(pod: FakeGatewayPod, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kube]:
    async def discover(*_: Any) -> list[str]:
        return [pod.url]

    patch = pytest.MonkeyPatch()
    # The scaler (whose discovery the rollout guard uses) reads it when it is built.
    patch.setattr(cluster.ClusterScaler, "gateway_pods", discover)
    try:
        with operator_on_emulator(SETTINGS, tmp_path_factory.mktemp("kube")) as (client, _):
            client.create_namespace(NS)
            yield client
    finally:
        patch.undo()


def endpoint(name: str, uri: str, alarm: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "kubeinfer.io/v1alpha1", "kind": "Endpoint",
            "metadata": {"name": name},
            "spec": {"variants": [{"name": "primary", "replicas": 2, "model": {"uri": uri}}],
                     "deploymentConfig": {
                         "blueGreen": {"trafficRouting": {
                             "type": "Canary", "waitIntervalInSeconds": 600,
                             "canarySize": {"type": "CapacityPercent", "value": 50}}},
                         "autoRollback": {"alarms": [
                             {"windowSeconds": 10, "minRequests": 20, **alarm}]}}}}


def route_table(kube: Kube, name: str) -> dict[str, Any]:
    """The endpoint's entry in its route ConfigMap, read once: callers that check
    weights, routes and mirrors together must see one version of it (the operator
    can roll back between two reads)."""
    cm = kube.get("ConfigMap", NS, f"{name}-routes") or {}
    data = next(iter((cm.get("data") or {}).values()), "{}")
    found: dict[str, Any] = full_table(data).get("endpoints", {}).get(name, {})
    return found


def routes(kube: Kube, name: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = route_table(kube, name).get("variants", [])
    return found


def mirrors_of(table: dict[str, Any]) -> list[tuple[str, str, float]]:
    return [(m["source"], m["peer"], m["sampling_percentage"])
            for m in table.get("mirrors", [])]


def mirrors(kube: Kube, name: str) -> list[tuple[str, str, float]]:
    return mirrors_of(route_table(kube, name))


def weights_of(variants: list[dict[str, Any]]) -> dict[str, float]:
    return {v["name"]: v["weight"] for v in variants if v["upstreams"]}


def weights(kube: Kube, name: str) -> dict[str, float]:
    return weights_of(routes(kube, name))


def condition(kube: Kube, name: str, type_: str) -> dict[str, Any]:
    status = (kube.get("Endpoint", NS, name) or {}).get("status") or {}
    return next((c for c in status.get("conditions") or [] if c["type"] == type_), {})


def roll_back(kube: Kube, pod: FakeGatewayPod, name: str, alarm: dict[str, Any],
              mirrored: list[list[tuple[str, str, float]]] | None = None,
              ) -> tuple[dict[str, Any], str]:
    """Roll ``name`` out to a bad green; return the RolledBack condition and the Event
    (``mirrored``: the route table's mirrors as they changed)."""
    kube.create(endpoint(name, "s3://m/v1.onnx", alarm), NS)
    blue = f"{name}-primary"
    wait_for(lambda: kube.get("Deployment", NS, blue), what="blue Deployment")
    kube.make_available(NS, blue)
    kube.make_available(NS, f"{name}-gateway")
    wait_for(lambda: weights(kube, name) == {"primary": 1.0}, what="blue routed")
    before = kube.get("Deployment", NS, blue)
    assert before is not None
    # No traffic until the canary split has been seen: with traffic, the alarm trips a
    # few scrapes (a few tenths of a second) into the bake, and a poll delayed that long
    # on a loaded machine would miss the split.
    pod.idle.set()
    try:
        kube.patch("Endpoint", NS, name, {"spec": {"variants": [
            {"name": "primary", "replicas": 2, "model": {"uri": "s3://m/v2.onnx"}}]}})
        wait_for(lambda: kube.get("Deployment", NS, f"{blue}-green"), what="green fleet")
        kube.make_available(NS, f"{blue}-green")
        seen: list[dict[str, float]] = []

        def observe() -> dict[str, float]:
            """Read the route table once; record its weights (and mirrors) as they change."""
            table = route_table(kube, name)
            variants = table.get("variants", [])
            w = weights_of(variants)
            if mirrored is not None:
                m = mirrors_of(table)
                if not mirrored or mirrored[-1] != m:
                    mirrored.append(m)
            if not seen or seen[-1] != w:
                seen.append(w)
                if len(w) == 2:
                    # Green answers as the production variant; its metrics stay its own
                    # route's.
                    assert {r["name"]: r.get("production_variant") for r in variants} \
                        == {"primary": "primary", "primary-green": "primary"}
            return w

        wait_for(lambda: observe() == {"primary": 0.5, "primary-green": 0.5},
                 what="the canary split")
    finally:
        pod.idle.clear()

    def back_on_blue() -> bool:
        # The condition first: a reconcile writes the route table before the status, so
        # a table read after a True condition is the rolled-back one (read the other way
        # round, the rollback could land between the reads and seen[-1] stay the split).
        rolled_back = condition(kube, name, "RolledBack").get("status") == "True"
        observe()
        return rolled_back

    wait_for(back_on_blue, timeout=20, what="rolled back")
    # Traffic went from the canary split straight back to blue, with no step between.
    wait_for(lambda: weights(kube, name) == {"primary": 1.0}, what="all traffic on blue")
    assert {"primary": 0.5, "primary-green": 0.5} in seen
    splits = [w for w in seen if w]
    assert splits[-1] == {"primary": 1.0}
    assert all(w in ({"primary": 1.0}, {"primary": 0.5, "primary-green": 0.5}) for w in splits)
    wait_for(lambda: kube.get("Deployment", NS, f"{blue}-green") is None, what="green removed")
    after = kube.get("Deployment", NS, blue)
    assert after is not None
    # Blue served throughout: its Deployment was never changed (same spec, same generation).
    assert after["spec"] == before["spec"]
    assert after["metadata"]["generation"] == before["metadata"]["generation"]
    status = (kube.get("Endpoint", NS, name) or {}).get("status") or {}
    assert status["rollouts"][0]["phase"] == "RolledBack"
    assert status["rollouts"][0]["reason"] == "AlarmTripped"
    assert status["rollouts"][0]["trafficToGreen"] == 0
    events = wait_for(lambda: [e for e in kube.list("Event", NS)
                               if e["reason"] == "RolledBack"
                               and e["involvedObject"]["name"] == name],
                      what="RolledBack Event")
    assert events[0]["type"] == "Warning"
    return condition(kube, name, "RolledBack"), str(events[0]["message"])


def test_an_error_rate_alarm_rolls_back_to_blue_at_once(kube: Kube, pod: FakeGatewayPod) -> None:
    cond, event = roll_back(kube, pod, "iris", {"name": "green-errors", "errorRate": 0.1})
    for text in (cond["message"], event):
        assert "alarm green-errors: errorRate 0.5 vs threshold 0.1" in text
        assert "all traffic is on primary" in text
    assert cond["reason"] == "AlarmTripped"


def test_a_latency_alarm_rolls_back_to_blue_at_once(kube: Kube, pod: FakeGatewayPod) -> None:
    cond, event = roll_back(kube, pod, "slow", {"name": "green-p99", "latencyP99Ms": 500})
    for text in (cond["message"], event):
        assert "alarm green-p99: latencyP99Ms" in text and "vs threshold 500" in text


def test_a_disagreement_alarm_mirrors_blue_and_green_and_rolls_back(
        kube: Kube, pod: FakeGatewayPod) -> None:
    mirrored: list[list[tuple[str, str, float]]] = []
    cond, event = roll_back(kube, pod, "flip", {"name": "green-flips", "disagreement": 0.05,
                                                "mirrorSamplingPercentage": 50}, mirrored)
    for text in (cond["message"], event):
        assert "alarm green-flips: disagreement 0.1 vs threshold 0.05" in text
        assert "all traffic is on primary" in text
    # While the canary baked, the gateway mirrored each fleet's requests to the other.
    assert [("primary", "primary-green", 50.0), ("primary-green", "primary", 50.0)] in mirrored
    assert mirrors(kube, "flip") == []  # and stopped once rolled back
