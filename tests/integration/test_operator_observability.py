"""The operator's own /metrics and its Normal Events, with the real kopf operator against
the emulator: an Endpoint that becomes Ready shows in the reconcile counter, and its
namespace holds one Created and one RolloutComplete Event for it, which refreshes do not
repeat."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from kubeinfer_operator.settings import OperatorSettings
from tests.support.kube_harness import Kube, operator_on_emulator, wait_for
from tests.support.ports import free_port

REPO = Path(__file__).resolve().parents[2]
EXAMPLE: dict[str, Any] = yaml.safe_load((REPO / "examples" / "realtime-endpoint.yaml").read_text())
DEPLOYMENTS = ("iris-gateway", "iris-primary", "iris-canary")
NS = "observed"


@dataclass
class Cluster:
    kube: Kube
    metrics_url: str


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    port = free_port()
    settings = OperatorSettings(standalone=True, status_interval_s=0.3, resync_interval_s=0.3,
                                namespaces=[], runtime_image="example.test/runtime:1",
                                s3_secret_name=None, operator_metrics_port=port)
    with operator_on_emulator(settings, tmp_path_factory.mktemp("kube")) as (kube, _):
        yield Cluster(kube, f"http://127.0.0.1:{port}/metrics")


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = httpx.get(url, timeout=5)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text)
            for s in family.samples}


def reconciles(url: str, kind: str = "Endpoint", result: str = "ok") -> float:
    return scrape(url).get(("kubeinfer_operator_reconciles_total",
                            (("kind", kind), ("result", result))), 0.0)


def events_of(kube: Kube, name: str) -> list[dict[str, Any]]:
    return [e for e in kube.list("Event", NS)
            if e["involvedObject"].get("name") == name
            and e["involvedObject"].get("kind") == "Endpoint"]


def reasons(kube: Kube, name: str) -> list[str]:
    return sorted(e["reason"] for e in events_of(kube, name))


def ready(kube: Kube) -> bool:
    obj = kube.get("Endpoint", NS, "iris") or {}
    return any(c["type"] == "Ready" and c["status"] == "True"
               for c in (obj.get("status") or {}).get("conditions", []))


def test_metrics_and_events_of_an_endpoint_rollout(cluster: Cluster) -> None:
    kube, url = cluster.kube, cluster.metrics_url
    values = scrape(url)
    assert values[("kubeinfer_operator_active", ())] == 1  # standalone: always the active one
    assert ("kubeinfer_operator_pending_scale_requests", ()) in values
    kube.create_namespace(NS)
    assert kube.create(copy.deepcopy(EXAMPLE), NS).status_code == 201
    wait_for(lambda: all(kube.get("Deployment", NS, d) for d in DEPLOYMENTS), 10,
             "the three Deployments")
    wait_for(lambda: "Created" in reasons(kube, "iris"), 10, "the Created Event")
    for name in DEPLOYMENTS:
        kube.make_available(NS, name)
    wait_for(lambda: ready(kube), 10, "Ready")
    wait_for(lambda: reconciles(url) > 0, 10, "an ok Endpoint reconcile in /metrics")
    wait_for(lambda: "RolloutComplete" in reasons(kube, "iris"), 10,
             "the RolloutComplete Event")

    # A few more refreshes (the resync runs every 0.3 s) post nothing new.
    seen = reconciles(url)
    wait_for(lambda: reconciles(url) >= seen + 3, 15, "three more reconciles")
    events = events_of(kube, "iris")
    assert sorted(e["reason"] for e in events) == ["Created", "RolloutComplete"]
    assert all(e["type"] == "Normal" and e["source"]["component"] == "kubeinfer-operator"
               for e in events)
    by_reason = {e["reason"]: e for e in events}
    assert by_reason["Created"]["message"] == (
        "Created the gateway and variants primary, canary for generation 1")
    assert by_reason["RolloutComplete"]["message"].startswith("Generation 1 rolled out: ")
    values = scrape(url)
    assert values[("kubeinfer_operator_reconcile_duration_seconds_count",
                   (("kind", "Endpoint"),))] >= seen + 3
    assert values.get(("kubeinfer_operator_reconciles_total",
                       (("kind", "Endpoint"), ("result", "error"))), 0.0) == 0

    # A new generation: Updated says which variants roll, then RolloutComplete again.
    patch = {"spec": {"variants": copy.deepcopy(EXAMPLE["spec"]["variants"])}}
    patch["spec"]["variants"][1]["model"]["uri"] = "file://models/iris.onnx"
    assert kube.patch("Endpoint", NS, "iris", patch).status_code == 200
    updated = wait_for(lambda: [e for e in events_of(kube, "iris") if e["reason"] == "Updated"],
                       10, "the Updated Event")
    assert updated[0]["message"].startswith(
        "Generation 2 applied: variant canary rolling to generation 2"), updated[0]["message"]
    for name in DEPLOYMENTS:
        kube.make_available(NS, name)
    wait_for(lambda: reasons(kube, "iris").count("RolloutComplete") == 2, 10,
             "the second RolloutComplete")


def test_events_and_reconciles_of_a_compilation_job(cluster: Cluster) -> None:
    from tests.integration.test_operator_compile import (
        REPORT,
        _job,
        _job_status,
        _pod,
        compilation_job,
    )

    kube, url, ns = cluster.kube, cluster.metrics_url, "compiled"
    kube.create_namespace(ns)
    assert kube.create(compilation_job(), ns).status_code == 201

    def reasons_of() -> list[str]:
        return sorted(e["reason"] for e in kube.list("Event", ns)
                      if e["involvedObject"].get("kind") == "CompilationJob")

    job = _job(kube, ns)
    wait_for(lambda: reasons_of() == ["Started"], 10, "the Started Event")
    _pod(kube, ns, job, "x1z2q", message=REPORT.termination_message().decode())
    _job_status(kube, ns, complete=True, succeeded=1)
    wait_for(lambda: reasons_of() == ["Completed", "Started"], 10, "the Completed Event")
    completed = next(e for e in kube.list("Event", ns) if e["reason"] == "Completed")
    assert completed["type"] == "Normal"
    assert completed["message"].startswith("CompilationJob completed: tvm-tuned (tvm)")
    assert reconciles(url, "CompilationJob") > 0
