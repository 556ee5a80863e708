"""EdgeFleets under the real kopf operator against the Kubernetes emulator.

Nothing runs Jobs or pods here, so the tests play the Job controller and the
kubelet (a package Job's pod with the report the package command leaves in its
termination message, then the Job's Complete condition) and the Deployment
controller; a fake fleet server (a real HTTP server on 127.0.0.1) answers
``GET /v1/fleet`` with a FleetStatus, checking the status token the operator keeps
in the namespace's ``kubeinfer-runtime`` Secret. The operator must create exactly
the rendered package Jobs, then the fleet config, fleet server Deployment, Service
and PodDisruptionBudget, roll the fleet's status up into the EdgeFleet's, never
read a Secret but ``kubeinfer-runtime``, and lose everything with the EdgeFleet.
"""

from __future__ import annotations

import base64
import copy
import itertools
import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from kubeinfer_operator.api.edge_fleet import EdgeFleet
from kubeinfer_operator.k8s import kinds
from kubeinfer_operator.k8s.client import KubeClient
from kubeinfer_operator.render import edge_fleet as rf
from kubeinfer_operator.render.edge_plan import plan_fleet
from kubeinfer_operator.settings import OperatorSettings
from kubeinfer_runtime.contract.edge import (
    FleetConfig,
    FleetStatus,
    RolloutPhase,
    RolloutStatus,
    WaveStatus,
)
from tests.support.kube_harness import Kube, operator_on_emulator, wait_for
from tests.support.kube_schema import schema_errors

SETTINGS = OperatorSettings(standalone=True, status_interval_s=0.3, namespaces=[],
                            runtime_image="example.test/runtime:1",
                            compiler_image="example.test/compiler:1",
                            s3_secret_name="s3-creds")
TOKEN = "bootstrap-token-0123456789"
PUBLIC_KEY = base64.b64encode(bytes(range(32))).decode()
_ids = itertools.count()


class FakeFleetServer:
    """``GET /v1/fleet`` answering ``self.status`` to a token of ``self.tokens`` (the status
    tokens the test read from the runtime Secret), 401 otherwise."""

    def __init__(self) -> None:
        self.status: FleetStatus | None = None
        self.tokens: set[str] = set()
        self.auth: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.auth.append(self.headers.get("Authorization", ""))
                if self.path != "/v1/fleet" or outer.status is None:
                    self.send_error(404)
                    return
                if self.headers.get("Authorization") not in {f"Bearer {t}"
                                                             for t in outer.tokens}:
                    self.send_error(401)
                    return
                body = outer.status.model_dump_json().encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeFleetServer]:
    server = FakeFleetServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def kube(tmp_path_factory: pytest.TempPathFactory, fake: FakeFleetServer) -> Iterator[Kube]:
    with operator_on_emulator(SETTINGS, tmp_path_factory.mktemp("kube"),
                              fleet_url=lambda namespace, name: fake.url) as (kube, _):
        yield kube


@pytest.fixture
def secret_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the Secrets the operator reads (GET or LIST) during the test."""
    reads: list[str] = []
    get, listed = KubeClient.get, KubeClient.list

    async def spy_get(self: KubeClient, kind: kinds.Kind, namespace: str,
                      name: str) -> dict[str, Any] | None:
        if kind is kinds.SECRET:
            reads.append(name)
        return await get(self, kind, namespace, name)

    async def spy_list(self: KubeClient, kind: kinds.Kind, *args: Any,
                       **kwargs: Any) -> list[dict[str, Any]]:
        if kind is kinds.SECRET:
            reads.append("(list)")
        return await listed(self, kind, *args, **kwargs)

    monkeypatch.setattr(KubeClient, "get", spy_get)
    monkeypatch.setattr(KubeClient, "list", spy_list)
    return reads


def _status_token(kube: Kube, ns: str) -> str:
    """The fleet's status token in the runtime Secret ("" while the key is missing)."""
    secret = wait_for(lambda: kube.get("Secret", ns, SETTINGS.runtime_secret_name), 10,
                      "the runtime Secret")
    return base64.b64decode(secret.get("data", {}).get("edge-status-sensors", "")).decode()


@pytest.fixture
def ns(kube: Kube) -> str:
    name = f"ef{next(_ids)}"
    kube.create_namespace(name)
    return name


def fleet_doc(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "model": {"uri": "s3://models/mlp.onnx"},
        "targets": [{"name": "x86"}, {"name": "arm", "compile": {"target": "aarch64"}}],
        "registration": {"bootstrapTokenSecret": {"name": "boot", "key": "token"}},
        "signing": {"keySecret": {"name": "signing", "key": "key"}},
        "packages": {"uri": "s3://pkgs/edge"},
        "redis": {"url": "redis://redis:6379/0"},
        "rollout": {"waves": [{"percentage": 50, "maxFailurePercent": 10}]},
    }
    base.update(spec)
    return {"apiVersion": "kubeinfer.io/v1alpha1", "kind": "EdgeFleet",
            "metadata": {"name": "sensors"}, "spec": base}


def _secret(kube: Kube, ns: str, name: str, key: str, value: str) -> None:
    r = kube.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
                     "data": {key: base64.b64encode(value.encode()).decode()}}, ns)
    assert r.status_code == 201, r.text


def _secrets(kube: Kube, ns: str) -> None:
    _secret(kube, ns, "boot", "token", TOKEN)
    _secret(kube, ns, "signing", "key", base64.b64encode(b"k" * 32).decode())


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _status(kube: Kube, ns: str) -> dict[str, Any]:
    return (kube.get("EdgeFleet", ns, "sensors") or {}).get("status") or {}


def _condition(kube: Kube, ns: str, type_: str) -> dict[str, Any]:
    return next((c for c in _status(kube, ns).get("conditions", []) if c["type"] == type_),
                {})


def _package_jobs(kube: Kube, ns: str, n: int = 2) -> list[dict[str, Any]]:
    jobs: list[dict[str, Any]] = wait_for(
        lambda: len(j := kube.list("Job", ns, f"{rf.LABEL_EDGE_FLEET}=sensors")) == n and j,
        10, f"{n} package Jobs")
    return jobs


def _succeed(kube: Kube, ns: str, job: dict[str, Any]) -> None:
    """The Job controller and the kubelet: a pod that leaves the package report, then
    Complete."""
    meta = job["metadata"]
    labels = job["spec"]["template"]["metadata"]["labels"]
    version, target = labels[rf.LABEL_EDGE_VERSION], labels[rf.LABEL_EDGE_TARGET]
    report = {"uri": f"s3://pkgs/edge/{ns}/sensors/{version}/{target}.tar.gz",
              "sha256": ("ab" if target == "x86" else "cd") * 32, "size": 1234,
              "signature": base64.b64encode(b"s" * 64).decode(), "publicKey": PUBLIC_KEY,
              "version": version, "target": target}
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": f"{meta['name']}-abcde",
                        "labels": {**labels, "batch.kubernetes.io/job-name": meta["name"]},
                        "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job",
                                             "name": meta["name"], "uid": meta["uid"],
                                             "controller": True,
                                             "blockOwnerDeletion": True}]},
           "spec": copy.deepcopy(job["spec"]["template"]["spec"])}
    assert kube.create(pod, ns).status_code == 201
    terminated = {"exitCode": 0, "reason": "Completed", "message": json.dumps(report),
                  "finishedAt": _now(), "startedAt": _now()}
    status = {"phase": "Succeeded",
              "containerStatuses": [{"name": "package", "ready": False, "restartCount": 0,
                                     "image": "x", "imageID": "",
                                     "state": {"terminated": terminated}}]}
    assert kube.patch("Pod", ns, pod["metadata"]["name"], {"status": status},
                      sub="status").status_code == 200
    job_status = {"startTime": _now(), "completionTime": _now(), "succeeded": 1,
                  "conditions": [{"type": "SuccessCriteriaMet", "status": "True",
                                  "lastTransitionTime": _now()},
                                 {"type": "Complete", "status": "True",
                                  "lastTransitionTime": _now()}]}
    assert kube.patch("Job", ns, meta["name"], {"status": job_status},
                      sub="status").status_code == 200


def _fleet_status(version: str, phase: RolloutPhase, *, failed: int = 0) -> FleetStatus:
    wave = WaveStatus(index=0, devices=4, succeeded=4 - failed, failed=failed, pending=0,
                      successPercent=100.0 * (4 - failed) / 4,
                      failurePercent=100.0 * failed / 4)
    return FleetStatus(fleet="sensors", devices=8, byState={"Online": 7, "Offline": 1},
                       byVersion={version: 4, "": 4},
                       rollout=RolloutStatus(version=version, previousVersion=None,
                                             phase=phase, wave=0, waves=1,
                                             currentWave=wave,
                                             message="wave 0 tripped" if failed else ""))


def test_an_edge_fleet_packages_serves_and_rolls_up(kube: Kube, ns: str,
                                                    fake: FakeFleetServer,
                                                    secret_reads: list[str]) -> None:
    _secrets(kube, ns)
    created = kube.create(fleet_doc(), ns)
    assert created.status_code == 201, created.text
    uid = created.json()["metadata"]["uid"]
    plan = plan_fleet(EdgeFleet.model_validate({**fleet_doc(), "metadata": {
        "name": "sensors", "namespace": ns}}), ns)
    jobs = {j["metadata"]["name"]: j for j in _package_jobs(kube, ns)}
    assert set(jobs) == {b.job_name for b in plan.builds}
    for build in plan.builds:
        job = jobs[build.job_name]
        expected = rf.package_job(plan, build, uid=uid, settings=SETTINGS)
        assert job["spec"]["template"] == expected["spec"]["template"]
        assert job["metadata"]["ownerReferences"] == expected["metadata"]["ownerReferences"]
        assert schema_errors(kube.get("Job", ns, build.job_name) or {}) == []
    packaging = wait_for(lambda: _condition(kube, ns, "Packaged").get("reason") == "Packaging"
                         and _status(kube, ns), 10, "Packaging")
    assert packaging["phase"] == "Packaging" and packaging["desiredVersion"] == plan.version
    assert kube.get("Deployment", ns, "sensors-fleet-server") is None

    for job in jobs.values():
        _succeed(kube, ns, job)
    dep = wait_for(lambda: kube.get("Deployment", ns, "sensors-fleet-server"), 10,
                   "the fleet server Deployment")
    cm = wait_for(lambda: kube.get("ConfigMap", ns, "sensors-fleet-config"), 10, "config")
    svc = wait_for(lambda: kube.get("Service", ns, "sensors-fleet-server"), 10, "Service")
    pdb = wait_for(lambda: kube.get("PodDisruptionBudget", ns, "sensors-fleet-server"), 10,
                   "PodDisruptionBudget")
    for obj in (dep, cm, svc, pdb):
        assert schema_errors(obj) == [], obj["kind"]
        assert obj["metadata"]["ownerReferences"][0]["uid"] == uid
    config = FleetConfig.model_validate_json(cm["data"]["fleet.json"])
    assert config.current.version == plan.version and config.previous is None
    assert config.current.packages["arm"].sha256 == "cd" * 32
    assert config.publicKey == PUBLIC_KEY and config.rollout.waves[0].percentage == 50
    env = dep["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "KUBEINFER_BOOTSTRAP_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": "boot", "key": "token"}}} in env
    assert {"name": "KUBEINFER_STATUS_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": "kubeinfer-runtime",
                                           "key": "edge-status-sensors",
                                           "optional": True}}} in env
    # The status token: generated by the operator, kept in the runtime Secret (owned by the
    # EdgeFleet too, not as its controller), never written anywhere else.
    status_token = _status_token(kube, ns)
    assert len(status_token) >= 32 and status_token != TOKEN
    runtime = kube.get("Secret", ns, "kubeinfer-runtime") or {}
    assert [(r["kind"], r["uid"], r["controller"]) for r in
            runtime["metadata"]["ownerReferences"]] == [("EdgeFleet", uid, False)]
    for secret in (TOKEN, status_token):
        assert secret not in json.dumps([dep, cm, svc, kube.get("EdgeFleet", ns, "sensors")])
    # Unavailable: Ready names the Secrets the fleet server's pods read (the operator does
    # not read them itself).
    ready = wait_for(lambda: _condition(kube, ns, "Ready").get("reason") == "ServerUnavailable"
                     and _condition(kube, ns, "Ready"), 10, "ServerUnavailable")
    assert (f"check Secret {ns}/boot key token (spec.registration.bootstrapTokenSecret)"
            in ready["message"])
    packaged = wait_for(lambda: _condition(kube, ns, "Packaged").get("status") == "True"
                        and _status(kube, ns), 10, "Packaged")
    assert packaged["version"] == plan.version
    assert [p["target"] for p in packaged["current"]["packages"]] == ["x86", "arm"]

    # The fleet server comes up and reports a rollout in progress.
    fake.tokens.add(status_token)
    fake.status = _fleet_status(plan.version, RolloutPhase.PROGRESSING)
    kube.make_available(ns, "sensors-fleet-server")
    status = wait_for(lambda: (s := _status(kube, ns)).get("devices") == 8 and
                      _condition(kube, ns, "Ready").get("status") == "True" and s, 10,
                      "devices rolled up")
    assert (status["online"], status["wave"], status["phase"]) == (7, "1/1", "RollingOut")
    assert status["devicesByState"] == {"Offline": 1, "Online": 7}
    assert status["currentWave"]["successPercent"] == 100.0
    assert _condition(kube, ns, "RolloutComplete")["reason"] == "Progressing"
    assert f"Bearer {status_token}" in fake.auth
    assert f"Bearer {TOKEN}" not in fake.auth  # the bootstrap token never leaves its Secret

    # A lost status token is replaced, and the fleet server's pods roll to read it.
    hash_before = dep["spec"]["template"]["metadata"]["annotations"][
        "kubeinfer.io/runtime-secret-hash"]
    assert kube.patch("Secret", ns, "kubeinfer-runtime",
                      {"data": {"edge-status-sensors": None}}).status_code == 200
    new_token = wait_for(lambda: (t := _status_token(kube, ns)) != status_token and t, 10,
                         "a new status token")
    wait_for(lambda: (kube.get("Deployment", ns, "sensors-fleet-server") or {})["spec"][
        "template"]["metadata"]["annotations"]["kubeinfer.io/runtime-secret-hash"]
        != hash_before, 10, "the fleet server's pods rolled")
    fake.tokens.add(new_token)
    wait_for(lambda: f"Bearer {new_token}" in fake.auth, 10, "a poll with the new token")
    # The wave trips: the fleet rolled back.
    fake.status = _fleet_status(plan.version, RolloutPhase.ROLLED_BACK, failed=2)
    back = wait_for(lambda: _condition(kube, ns, "RolledBack").get("status") == "True"
                    and _condition(kube, ns, "RolledBack"), 10, "RolledBack")
    assert back["reason"] == "WaveFailed" and "wave 0 tripped" in back["message"]
    assert _status(kube, ns)["phase"] == "RolledBack"

    # A new model: a new version is packaged, the old one is kept as the rollback target.
    patched = kube.patch("EdgeFleet", ns, "sensors",
                         {"spec": {"model": {"uri": "s3://models/mlp-v2.onnx"}}})
    assert patched.status_code == 200, patched.text
    def fresh_jobs() -> list[dict[str, Any]] | None:
        listed = kube.list("Job", ns, f"{rf.LABEL_EDGE_FLEET}=sensors")
        new = [j for j in listed if j["metadata"]["name"] not in jobs]
        return new if len(new) == 2 else None

    new_jobs: list[dict[str, Any]] = wait_for(fresh_jobs, 10, "the new version's Jobs")
    # Until the new version is packaged the fleet server keeps the old one.
    assert _status(kube, ns)["version"] == plan.version
    for job in new_jobs:
        _succeed(kube, ns, job)
    rolled = wait_for(lambda: (s := _status(kube, ns)).get("previousVersion") == plan.version
                      and s, 10, "new version promoted")
    config = FleetConfig.model_validate_json(
        (kube.get("ConfigMap", ns, "sensors-fleet-config") or {})["data"]["fleet.json"])
    assert config.current.version == rolled["version"] != plan.version
    assert config.previous is not None and config.previous.version == plan.version
    # Jobs of the old version are cleaned up.
    wait_for(lambda: not (set(kube.names("Job", ns)) & set(jobs)), 10, "old Jobs deleted")

    # Deleting the EdgeFleet deletes everything it made.
    assert kube.delete("EdgeFleet", ns, "sensors").status_code == 200
    wait_for(lambda: kube.get("EdgeFleet", ns, "sensors") is None, 10, "EdgeFleet gone")
    wait_for(lambda: not kube.names("Job", ns) and not kube.names("Deployment", ns)
             and not kube.names("ConfigMap", ns) - {"kube-root-ca.crt"}
             and not kube.names("Service", ns) and not kube.names("PodDisruptionBudget", ns)
             and not kube.names("Pod", ns)
             and kube.names("Secret", ns) == {"boot", "signing"}, 10,
             "children garbage-collected")
    # Of Secrets, the operator read only its own.
    assert secret_reads and set(secret_reads) == {"kubeinfer-runtime"}


def test_missing_secrets_are_left_to_the_pods_and_named_in_status(
        kube: Kube, ns: str, secret_reads: list[str]) -> None:
    # No bootstrap-token or signing-key Secret: the operator does not look (it may read
    # the runtime Secret only); the package Jobs start, their pods would wait in
    # CreateContainerConfigError, and the status says which Secret to check.
    assert kube.create(fleet_doc(), ns).status_code == 201
    _package_jobs(kube, ns)
    packaged = wait_for(lambda: _condition(kube, ns, "Packaged").get("reason") == "Packaging"
                        and "check Secret" in _condition(kube, ns, "Packaged")["message"]
                        and _condition(kube, ns, "Packaged"), 10, "Packaging")
    assert packaged["message"].endswith(
        f"if a package Job's pod does not start (CreateContainerConfigError), check Secret "
        f"{ns}/signing key key (spec.signing.keySecret)")
    assert _status(kube, ns)["phase"] == "Packaging"
    assert set(secret_reads) == {"kubeinfer-runtime"}


def test_an_invalid_spec_is_reported_and_creates_nothing(kube: Kube, ns: str) -> None:
    _secrets(kube, ns)
    assert kube.create(fleet_doc(packages={"uri": "file:///tmp/pkgs"}), ns).status_code == 201
    ready = wait_for(lambda: _condition(kube, ns, "Ready").get("reason") == "InvalidSpec"
                     and _condition(kube, ns, "Ready"), 10, "InvalidSpec")
    assert "spec.packages.uri" in ready["message"] and "s3://bucket/prefix" in ready["message"]
    assert kube.names("Job", ns) == set()


def test_the_crd_refuses_a_bad_target(kube: Kube, ns: str) -> None:
    response = kube.create(fleet_doc(targets=[{"name": "arm",
                                               "compile": {"target": "pentium"}}]), ns)
    assert response.status_code == 422 and "target" in response.text
