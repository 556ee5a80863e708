"""The emulator behaves like an API server where the operator tests depend on it.

If these fail, the operator tests prove nothing: each checks one behaviour of
a real kube-apiserver that ``tests/support/kube_emulator.py`` reproduces.
"""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.support.kube_harness import EmulatorThread, Kube, wait_for

_ids = itertools.count()
JSON_PATCH = {"Content-Type": "application/json-patch+json"}


@pytest.fixture(scope="module")
def emulator() -> Iterator[EmulatorThread]:
    emu = EmulatorThread().start()
    yield emu
    emu.stop()
    assert emu.emulator is not None
    assert emu.emulator.failures == []


@pytest.fixture
def kube(emulator: EmulatorThread) -> Iterator[Kube]:
    k = Kube(emulator.url)
    yield k
    k.close()


@pytest.fixture
def ns(kube: Kube) -> str:
    name = f"e{next(_ids)}"
    kube.create_namespace(name)
    return name


def _configmap(name: str = "cm", **meta: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, **meta},
            "data": {"k": "v"}}


def _endpoint(weight: float = 1.0) -> dict[str, Any]:
    return {"apiVersion": "kubeinfer.io/v1alpha1", "kind": "Endpoint",
            "metadata": {"name": "ep"},
            "spec": {"variants": [{"name": "a", "weight": weight,
                                   "model": {"uri": "s3://b/k.onnx"}}]}}


def test_server_owned_metadata(kube: Kube, ns: str) -> None:
    created = kube.create(_configmap(uid="mine", resourceVersion="999"), ns)
    assert created.status_code == 201
    meta = created.json()["metadata"]
    assert meta["namespace"] == ns
    assert meta["uid"] != "mine" and len(meta["uid"]) == 36
    assert meta["resourceVersion"] != "999"
    assert meta["creationTimestamp"].endswith("Z")
    generated = kube.create(_configmap(name="", generateName="cm-"), ns).json()["metadata"]
    assert generated["name"].startswith("cm-") and len(generated["name"]) > 3
    assert kube.create(_configmap(), ns).status_code == 409
    assert kube.create(_configmap(), "no-such-namespace").status_code == 404


def test_optimistic_concurrency(kube: Kube, ns: str) -> None:
    rv = kube.create(_configmap(), ns).json()["metadata"]["resourceVersion"]
    ok = kube.patch("ConfigMap", ns, "cm", {"metadata": {"resourceVersion": rv},
                                            "data": {"k": "2"}})
    assert ok.status_code == 200
    stale = kube.patch("ConfigMap", ns, "cm", {"metadata": {"resourceVersion": rv},
                                               "data": {"k": "3"}})
    assert stale.status_code == 409
    # kopf's finalizer patches: a JSON patch whose resourceVersion test fails is a 422.
    ops = [{"op": "test", "path": "/metadata/resourceVersion", "value": rv},
           {"op": "add", "path": "/metadata/finalizers", "value": ["x"]}]
    failed = kube.http.patch(f"/api/v1/namespaces/{ns}/configmaps/cm", content=json.dumps(ops),
                             headers=JSON_PATCH)
    assert failed.status_code == 422
    assert kube.get("ConfigMap", ns, "cm")["data"] == {"k": "2"}  # type: ignore[index]


def test_noop_writes_change_nothing(kube: Kube, ns: str) -> None:
    rv = kube.create(_configmap(), ns).json()["metadata"]["resourceVersion"]
    same = kube.patch("ConfigMap", ns, "cm", {"data": {"k": "v"}})
    assert same.json()["metadata"]["resourceVersion"] == rv


def test_status_subresource_and_generation(kube: Kube, ns: str) -> None:
    created = kube.create({**_endpoint(), "status": {"url": "ignored"}}, ns).json()
    assert "status" not in created
    assert created["metadata"]["generation"] == 1
    # Defaults from the CRD schema are applied.
    assert created["spec"]["variants"][0]["replicas"] == 1
    assert created["spec"]["type"] == "RealTime"
    body = kube.patch("Endpoint", ns, "ep", {"status": {"url": "x"},
                                             "metadata": {"labels": {"a": "b"}}}).json()
    assert "status" not in body
    assert body["metadata"]["generation"] == 1  # metadata is not spec
    body = kube.patch("Endpoint", ns, "ep", {"status": {"url": "http://u"},
                                             "spec": {"type": "Other"}}, sub="status").json()
    assert body["status"] == {"url": "http://u"}
    assert body["spec"]["type"] == "RealTime"
    spec = _endpoint(weight=2.0)["spec"]
    body = kube.patch("Endpoint", ns, "ep", {"spec": spec}).json()
    assert body["metadata"]["generation"] == 2
    assert body["status"] == {"url": "http://u"}


def test_validation_like_the_api_server(kube: Kube, ns: str) -> None:
    bad = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
           "spec": {"replicas": "three", "selector": {}, "template": {}}}
    response = kube.create(bad, ns)
    assert response.status_code == 422
    assert "replicas" in response.json()["message"]
    duplicate = _endpoint()
    duplicate["spec"]["variants"] *= 2
    response = kube.create(duplicate, ns)
    assert response.status_code == 422
    assert "Duplicate value" in response.json()["message"]
    # Unknown fields of a custom resource are pruned, as on a real server.
    typo = _endpoint()
    typo["spec"]["variants"][0]["replica"] = 3
    stored = kube.create(typo, ns).json()
    assert "replica" not in stored["spec"]["variants"][0]


def test_finalizers_hold_deletion_and_owners_cascade(kube: Kube, ns: str) -> None:
    owner = kube.create({**_endpoint(), "metadata": {"name": "ep", "finalizers": ["f"]}},
                        ns).json()
    ref = {"apiVersion": "kubeinfer.io/v1alpha1", "kind": "Endpoint", "name": "ep",
           "uid": owner["metadata"]["uid"], "controller": True}
    assert kube.create(_configmap(ownerReferences=[ref]), ns).status_code == 201
    assert kube.create(_configmap(name="free"), ns).status_code == 201

    held = kube.delete("Endpoint", ns, "ep").json()
    assert held["metadata"]["deletionTimestamp"]
    assert kube.get("Endpoint", ns, "ep") is not None
    assert kube.get("ConfigMap", ns, "cm") is not None

    assert kube.patch("Endpoint", ns, "ep", {"metadata": {"finalizers": None}}).status_code == 200
    assert kube.get("Endpoint", ns, "ep") is None
    assert kube.get("ConfigMap", ns, "cm") is None  # garbage-collected
    assert kube.get("ConfigMap", ns, "free") is not None


def test_a_dependent_created_after_its_owner_is_gone_is_collected(kube: Kube, ns: str) -> None:
    """As the garbage collector does: a reconcile still in flight when its object was
    deleted may create a child after the cascade; that child must not stay."""
    owner = kube.create(_endpoint(), ns).json()
    ref = {"apiVersion": "kubeinfer.io/v1alpha1", "kind": "Endpoint", "name": "ep",
           "uid": owner["metadata"]["uid"], "controller": True}
    assert kube.delete("Endpoint", ns, "ep").status_code == 200
    assert kube.create(_configmap(ownerReferences=[ref]), ns).status_code == 201
    assert kube.create(_configmap(name="free"), ns).status_code == 201
    wait_for(lambda: kube.get("ConfigMap", ns, "cm") is None, 10, "the orphan collected")
    assert kube.get("ConfigMap", ns, "free") is not None


def test_lists_selectors_and_watch_resume(emulator: EmulatorThread, kube: Kube, ns: str) -> None:
    kube.create(_configmap(name="a", labels={"app": "x"}), ns)
    kube.create(_configmap(name="b", labels={"app": "y"}), ns)
    listing = kube.http.get(f"/api/v1/namespaces/{ns}/configmaps",
                            params={"labelSelector": "app=x"}).json()
    assert listing["kind"] == "ConfigMapList"
    assert [o["metadata"]["name"] for o in listing["items"]] == ["a"]
    since = listing["metadata"]["resourceVersion"]
    # Written after the list, before the watch starts: must not be lost.
    kube.patch("ConfigMap", ns, "a", {"data": {"k": "new"}})
    kube.patch("ConfigMap", ns, "b", {"data": {"k": "new"}})

    events: list[dict[str, Any]] = []

    def watch() -> None:
        # The server ends the watch after timeoutSeconds, counted from its start: long
        # enough for the test's DELETE after the first event even on a loaded machine
        # (at 2 s a stalled test could see the stream end first); the thread returns
        # after the second event anyway.
        with httpx.stream("GET", f"{emulator.url}/api/v1/namespaces/{ns}/configmaps",
                          params={"watch": "true", "resourceVersion": since,
                                  "labelSelector": "app=x", "timeoutSeconds": "20"},
                          timeout=30) as r:
            assert r.headers["content-type"].startswith("application/json")
            for line in r.iter_lines():
                events.append(json.loads(line))
                if len(events) == 2:
                    return

    t = threading.Thread(target=watch)
    t.start()
    wait_for(lambda: events, 10, "the replayed event")
    kube.delete("ConfigMap", ns, "a")
    t.join(10)
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
        ("MODIFIED", "a"), ("DELETED", "a")]
    assert events[0]["object"]["data"] == {"k": "new"}
