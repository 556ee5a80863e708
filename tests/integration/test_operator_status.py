"""Status a GitOps pipeline can trust, with the real kopf operator against the emulator.

Ready means the spec you applied is rolled out, not that old pods still answer:
a stuck rollout keeps Ready False (``kubectl wait`` times out) and reports the
Deployment's own reason, and kstatus (Flux, kpt) reads the same verdict. The
tests play the Deployment controller by patching Deployment status.
"""

from __future__ import annotations

import copy
import itertools
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubeinfer_operator.settings import OperatorSettings
from tests.support import kstatus
from tests.support.kube_harness import Kube, operator_on_emulator, wait_for

REPO = Path(__file__).resolve().parents[2]
EXAMPLE: dict[str, Any] = yaml.safe_load((REPO / "examples" / "realtime-endpoint.yaml").read_text())
SETTINGS = OperatorSettings(standalone=True, status_interval_s=0.3, namespaces=[],
                            runtime_image="example.test/runtime:1", s3_secret_name=None)
KUBECTL = shutil.which("kubectl")
DEPLOYMENTS = ("iris-gateway", "iris-primary", "iris-canary")
STUCK_MESSAGE = 'ReplicaSet "iris-canary-7c9f" has timed out progressing.'
_ids = itertools.count()


@dataclass
class Cluster:
    kube: Kube
    kubeconfig: Path


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    kube_dir = tmp_path_factory.mktemp("kube")
    with operator_on_emulator(SETTINGS, kube_dir) as (kube, _):
        yield Cluster(kube, kube_dir / "config")


@pytest.fixture
def kube(cluster: Cluster) -> Kube:
    return cluster.kube


@pytest.fixture
def ns(kube: Kube) -> str:
    name = f"s{next(_ids)}"
    kube.create_namespace(name)
    return name


def _conditions(kube: Kube, ns: str, name: str = "iris") -> dict[str, dict[str, Any]]:
    obj = kube.get("Endpoint", ns, name) or {}
    return {c["type"]: c for c in (obj.get("status") or {}).get("conditions", [])}


def _wait_ready(kube: Kube, ns: str, status: str, *, reason: str | None = None,
                generation: int | None = None, timeout: float = 10.0) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        c = _conditions(kube, ns).get("Ready", {})
        ok = (c.get("status") == status and (reason is None or c.get("reason") == reason)
              and (generation is None or c.get("observedGeneration") == generation))
        return c if ok else None

    found: dict[str, Any] = wait_for(check, timeout, f"Ready={status} {reason or ''} in {ns}")
    return found


def _deployed(kube: Kube, ns: str) -> None:
    assert kube.create(copy.deepcopy(EXAMPLE), ns).status_code == 201
    wait_for(lambda: all(kube.get("Deployment", ns, d) for d in DEPLOYMENTS), 10,
             "three Deployments")
    for name in DEPLOYMENTS:
        kube.make_available(ns, name)
    _wait_ready(kube, ns, "True", generation=1)


def _change_canary_model(kube: Kube, ns: str) -> int:
    """Give the canary a new model; return the canary Deployment's new generation."""
    before = kube.get("Deployment", ns, "iris-canary")
    assert before is not None
    variants = copy.deepcopy(EXAMPLE["spec"]["variants"])
    variants[1]["model"]["uri"] = "s3://models/iris-v3.onnx"
    assert kube.patch("Endpoint", ns, "iris", {"spec": {"variants": variants}}).status_code == 200
    rolled = wait_for(lambda: (d := kube.get("Deployment", ns, "iris-canary")) and d["metadata"][
        "generation"] > before["metadata"]["generation"] and d, 10, "the canary re-templated")
    generation: int = rolled["metadata"]["generation"]
    return generation


def _report_stuck(kube: Kube, ns: str, generation: int) -> None:
    """The Deployment controller gave up: 0 of 1 new pods available, the old one still up."""
    r = kube.patch("Deployment", ns, "iris-canary", {"status": {
        "observedGeneration": generation, "replicas": 2, "updatedReplicas": 1,
        "readyReplicas": 1, "availableReplicas": 1, "unavailableReplicas": 1,
        "conditions": [{"type": "Progressing", "status": "False",
                        "reason": "ProgressDeadlineExceeded", "message": STUCK_MESSAGE,
                        "lastUpdateTime": "2026-01-01T00:10:00Z",
                        "lastTransitionTime": "2026-01-01T00:10:00Z"}]}}, sub="status")
    assert r.status_code == 200, r.text


def _stays(predicate: Any, seconds: float, what: str) -> None:
    """Assert ``predicate()`` holds at every poll for ``seconds`` and at least 6 polls (a
    window, not a sleep; on a loaded machine six polls can take longer than ``seconds``,
    and the window then lasts as long as they take)."""
    deadline = time.monotonic() + seconds
    polls = 0
    while time.monotonic() < deadline or polls < 6:
        assert predicate(), f"{what} stopped holding after {polls} polls"
        polls += 1
        time.sleep(0.05)


def test_a_model_change_is_not_ready_until_its_rollout_is_done(kube: Kube, ns: str) -> None:
    _deployed(kube, ns)
    generation = _change_canary_model(kube, ns)
    # The old canary pod still answers, but the new model is not serving yet.
    ready = _wait_ready(kube, ns, "False", reason="VariantsUnavailable", generation=2)
    assert "canary" in ready["message"]
    c = _conditions(kube, ns)
    assert (c["Progressing"]["status"], c["Progressing"]["reason"]) == ("True", "RollingOut")
    assert c["VariantReady-canary"]["reason"] == "RollingOut"
    assert kstatus.compute(kube.get("Endpoint", ns, "iris") or {}).status == kstatus.IN_PROGRESS

    # Half-way: the new pod exists, not yet available.
    r = kube.patch("Deployment", ns, "iris-canary", {"status": {
        "observedGeneration": generation, "replicas": 2, "updatedReplicas": 1,
        "availableReplicas": 1, "readyReplicas": 1}}, sub="status")
    assert r.status_code == 200
    _stays(lambda: _conditions(kube, ns)["Ready"]["status"] == "False", 0.8,
           "Ready=False while the new pod is not available")

    kube.make_available(ns, "iris-canary")
    _wait_ready(kube, ns, "True", reason="AllVariantsReady", generation=2)
    c = _conditions(kube, ns)
    assert (c["Progressing"]["status"], c["Progressing"]["reason"]) == (
        "False", "RolloutComplete")
    assert kstatus.compute(kube.get("Endpoint", ns, "iris") or {}).status == kstatus.CURRENT


def test_a_stuck_rollout_keeps_ready_false_and_kubectl_wait_times_out(
        cluster: Cluster, kube: Kube, ns: str) -> None:
    _deployed(kube, ns)
    generation = _change_canary_model(kube, ns)
    _report_stuck(kube, ns, generation)

    ready = _wait_ready(kube, ns, "False", reason="ProgressDeadlineExceeded", generation=2)
    c = _conditions(kube, ns)
    canary = c["VariantReady-canary"]
    assert (canary["status"], canary["reason"]) == ("False", "ProgressDeadlineExceeded")
    assert canary["message"].startswith(
        f'Deployment {ns}/iris-canary: ReplicaSet "iris-canary-7c9f" has timed out progressing;')
    assert ready["message"] == "Variant canary: " + canary["message"]
    assert (c["Stalled"]["status"], c["Reconciling"]["status"], c["Progressing"]["status"]) == (
        "True", "False", "False")
    verdict = kstatus.compute(kube.get("Endpoint", ns, "iris") or {})
    assert verdict.status == kstatus.FAILED
    assert "has timed out progressing" in verdict.message

    if KUBECTL is not None:
        started = time.monotonic()
        waited = subprocess.run(
            [KUBECTL, "--kubeconfig", str(cluster.kubeconfig), "wait", "-n", ns,
             "--for=condition=Ready", "endpoint.kubeinfer.io/iris", "--timeout=2s"],
            capture_output=True, text=True, timeout=60)
        assert waited.returncode != 0, waited.stdout
        assert "timed out" in waited.stderr
        assert time.monotonic() - started >= 2.0
    # Over the same window, as a GitOps tool polling status would see it.
    _stays(lambda: _conditions(kube, ns)["Ready"]["status"] == "False", 2.0,
           "Ready=False for a stuck rollout")

    # The model is fixed (here: the pods come up after all): Ready at generation 2.
    r = kube.patch("Deployment", ns, "iris-canary", {"status": {"conditions": [
        {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable",
         "message": "done", "lastUpdateTime": "2026-01-01T00:11:00Z",
         "lastTransitionTime": "2026-01-01T00:11:00Z"}]}}, sub="status")
    assert r.status_code == 200
    kube.make_available(ns, "iris-canary")
    _wait_ready(kube, ns, "True", generation=2)
    assert _conditions(kube, ns)["Stalled"]["status"] == "False"


def test_async_without_a_queue_is_invalid_on_a_cluster(kube: Kube, ns: str) -> None:
    # This operator has no Redis URL (the chart's runtime.redis.url is unset).
    doc = yaml.safe_load((REPO / "examples" / "async-endpoint.yaml").read_text())
    doc["spec"]["async"].update(outputPath="s3://async/out", failurePath="s3://async/failed")
    assert kube.create(doc, ns).status_code == 201
    ready = wait_for(lambda: (c := _conditions(kube, ns, "iris-async").get("Ready", {})).get(
        "reason") == "InvalidSpec" and c, 10, "InvalidSpec for async without Redis")
    assert ready["status"] == "False"
    assert ready["message"].startswith(f"Endpoint {ns}/iris-async is invalid: spec.async: no "
                                       "queue is configured for async endpoints on this cluster")
    assert "set the Helm value runtime.redis.url" in ready["message"]
    assert _conditions(kube, ns, "iris-async")["Stalled"]["status"] == "True"
    assert kube.list("Deployment", ns) == []
    events = wait_for(lambda: [e for e in kube.list("Event", ns)
                               if e["involvedObject"]["name"] == "iris-async"], 10, "an event")
    assert any(e["reason"] == "InvalidSpec" and "runtime.redis.url" in e["message"]
               for e in events)
