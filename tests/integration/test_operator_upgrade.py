"""Staged upgrades: a new runtime image rolls a few Endpoints at a time.

The real operator runs against the emulator twice: first with runtime image v1
until five Endpoints are Ready, then (the operator upgraded) with v2 and
``max_concurrent_upgrades=2``. Only two Endpoints roll at once; the rest keep v1,
say why in an ``UpgradeQueued`` Event, and roll as slots free, which happens
only when a rolling Endpoint's Deployments report the rollout done. The test
plays the Deployment controller.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubeinfer_operator.settings import OperatorSettings
from tests.support.kube_harness import (
    EmulatorThread,
    Kube,
    OperatorThread,
    wait_for,
    write_kubeconfig,
)

REPO = Path(__file__).resolve().parents[2]
EXAMPLE: dict[str, Any] = yaml.safe_load((REPO / "examples" / "realtime-endpoint.yaml").read_text())
V1, V2 = "example.test/runtime:1", "example.test/runtime:2"
NAMES = [f"e{i}" for i in range(5)]
#: Deployments of one Endpoint: one per variant, and the gateway.
CHILDREN = len(EXAMPLE["spec"]["variants"]) + 1
NS = "upgrade"


def settings(image: str, limit: int) -> OperatorSettings:
    return OperatorSettings(standalone=True, status_interval_s=0.3, namespaces=[],
                            runtime_image=image, s3_secret_name=None,
                            max_concurrent_upgrades=limit)


def deployments(kube: Kube, name: str) -> list[dict[str, Any]]:
    return [d for d in kube.list("Deployment", NS)
            if d["metadata"].get("labels", {}).get("kubeinfer.io/endpoint") == name]


def images(kube: Kube, name: str) -> set[str]:
    return {c["image"] for d in deployments(kube, name)
            for c in d["spec"]["template"]["spec"]["containers"]}


def on(kube: Kube, image: str) -> set[str]:
    return {n for n in NAMES if images(kube, n) == {image}}


def roll_out(kube: Kube, name: str) -> None:
    for d in deployments(kube, name):
        kube.make_available(NS, d["metadata"]["name"])


def ready(kube: Kube, name: str) -> bool:
    obj = kube.get("Endpoint", NS, name) or {}
    return any(c["type"] == "Ready" and c["status"] == "True"
               and c.get("observedGeneration") == obj["metadata"].get("generation")
               for c in (obj.get("status") or {}).get("conditions", []))


def queued_events(kube: Kube) -> set[str]:
    events = kube.http.get(f"/api/v1/namespaces/{NS}/events").json().get("items", [])
    return {e["involvedObject"]["name"] for e in events if e.get("reason") == "UpgradeQueued"}


def test_a_new_runtime_image_rolls_two_endpoints_at_a_time(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    emulator = EmulatorThread().start()
    monkeypatch.setenv("KUBECONFIG", str(write_kubeconfig(tmp_path / "config", emulator.url)))
    kube = Kube(emulator.url)
    try:
        kube.create_namespace(NS)
        first = OperatorThread(settings(V1, 0)).start()
        try:
            for name in NAMES:
                obj = copy.deepcopy(EXAMPLE)
                obj["metadata"] = {"name": name}
                assert kube.create(obj, NS).status_code == 201
            # Every child, not only the first: the operator creates an Endpoint's
            # Deployments one after another, and this test plays the Deployment
            # controller once, so one created after roll_out would never be Ready.
            wait_for(lambda: all(len(deployments(kube, n)) == CHILDREN for n in NAMES)
                     and on(kube, V1) == set(NAMES), 30, "every Endpoint's Deployments on v1")
            for name in NAMES:
                roll_out(kube, name)
            wait_for(lambda: all(ready(kube, n) for n in NAMES), 30, "every Endpoint Ready")
        finally:
            first.stop()

        upgraded = OperatorThread(settings(V2, 2)).start()
        try:
            wait_for(lambda: len(queued_events(kube)) == 3 and len(on(kube, V2)) == 2, 30,
                     "two Endpoints rolling to v2 and three queued")
            rolling = on(kube, V2)
            assert on(kube, V1) == set(NAMES) - rolling
            assert queued_events(kube) == set(NAMES) - rolling
            done: set[str] = set()
            while len(done) < len(NAMES):
                # A slot frees only when its Endpoint's rollout is done.
                assert len(on(kube, V2) - done) <= 2
                batch = sorted(on(kube, V2) - done)
                assert batch, "no Endpoint is rolling"
                for name in batch:
                    roll_out(kube, name)
                    wait_for(lambda n=name: ready(kube, n), 30, f"{name} Ready on v2")
                done |= set(batch)
                want = min(len(NAMES), len(done) + 2)
                wait_for(lambda w=want: len(on(kube, V2)) >= w, 30,
                         f"{want} Endpoints on v2")
            assert on(kube, V2) == set(NAMES)
        finally:
            upgraded.stop()
    finally:
        kube.close()
        emulator.stop()
    assert emulator.emulator is not None
    assert emulator.emulator.failures == []
