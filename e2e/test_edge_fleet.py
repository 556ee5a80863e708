"""examples/edge-fleet.yaml on kind: package Job, fleet server, three real agents, a new version.

Needs what run.sh deploys from e2e/manifests/async-deps.yaml (the SeaweedFS store,
for the model and the packages, and Redis, for the fleet server's state) and
``runtime.s3.secretName`` (which gives the package Job and the fleet server the
store's credentials); skipped without them. The example is applied with the
iris model (built by the same script the image build runs) uploaded to a bucket
of this test's own, its packages under it, one x86-64 target shipped as ONNX
(no compile), a Redis database of its own, short heartbeats and one wave
(the device labelled ring=early first), the rest as written.

Then: the two Secrets are created (a bootstrap token, a base64 ed25519 key of
32 random bytes); ``Packaged`` and ``Ready``; the status names the public key
of that signing key; three agents (``python -m kubeinfer_runtime edge agent``)
run in this process's machine against a port-forward of the fleet server
Service; the status counts 3 devices and ``RolloutComplete``; each agent's
local ``/invocations`` answers as onnxruntime does in the test process. A new
``model.uri`` (iris-v2) is a new version: packaged, rolled out, served by all
three agents with iris-v2's answers, the old version the rollback target.
Deleting the EdgeFleet takes its Deployment, Service, ConfigMap,
PodDisruptionBudget, package Jobs and their pods with it.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pytest
import yaml

from e2e.cluster import (
    DEPS_NAMESPACE,
    EXAMPLES,
    FULLNAME,
    GC_TIMEOUT_S,
    READY_TIMEOUT_S,
    RELEASE_NAMESPACE,
    S3_PORT,
    S3_SECRET,
    S3_SERVICE,
    STATUS_INTERVAL_S,
    _section,
    condition,
    free_port,
    kubectl,
    kubectl_json,
    object_store_credentials,
    port_forward,
    requires_cluster,
    wait_for,
)
from e2e.inference import assert_predictions, s3_client, sample_and_expected
from e2e.test_transform_job import _bucket

pytestmark = requires_cluster

EXAMPLE = "edge-fleet.yaml"
TARGET = "x86-gateway"
DEVICES = ("dev-0", "dev-1", "dev-2")
#: The device the rollout's one wave takes first (the others are its tail).
EARLY = "dev-0"
HEARTBEAT_S = 2
#: The fleet's own database in the Redis of e2e/manifests (async endpoints use 0).
REDIS_DB = 3
LABEL_EDGE_FLEET = "kubeinfer.io/edge-fleet"
#: An image pull and a package Job (no compile: the model is only signed and shipped).
PACKAGED_WITHIN_S = 600
BUCKET_WITHIN_S = 120
#: Registration, three installs (download, model server start, warm-up) and an operator
#: refresh of the fleet status.
ROLLED_OUT_WITHIN_S = 3 * STATUS_INTERVAL_S + 240
#: A new version: its package Job, the ConfigMap reaching the fleet server's pods (kubelet
#: refreshes a mounted ConfigMap within about a minute), the wave, the installs.
NEW_VERSION_WITHIN_S = PACKAGED_WITHIN_S + 120 + ROLLED_OUT_WITHIN_S
AGENT_LISTEN_WITHIN_S = 60
#: Straight to the local agents, whatever HTTP(S)_PROXY the environment sets.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def resource(name: str) -> str:
    return f"edgefleets.kubeinfer.io/{name}"


@dataclass
class Agent:
    device: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"


def diagnostics(namespace: str, name: str, agents: list[Agent]) -> str:
    selector = f"{LABEL_EDGE_FLEET}={name}"
    return "\n".join([
        f"=== diagnostics of {resource(name)} in namespace {namespace}",
        _section("EdgeFleet", "-n", namespace, "get", resource(name), "-o", "yaml"),
        _section("objects", "-n", namespace, "get",
                 "deployments,services,configmaps,jobs,pods,poddisruptionbudgets", "-o", "wide"),
        _section("events", "-n", namespace, "get", "events", "--sort-by=.lastTimestamp"),
        _section("package logs", "-n", namespace, "logs", "-l",
                 f"{selector},app.kubernetes.io/component=edge-packager", "--all-containers",
                 "--prefix", "--tail=60"),
        _section("fleet server logs", "-n", namespace, "logs", "-l",
                 f"{selector},app.kubernetes.io/component=fleet-server", "--all-containers",
                 "--prefix", "--tail=80"),
        _section("operator log", "-n", RELEASE_NAMESPACE, "logs",
                 f"deployment/{FULLNAME}-operator", "--tail=80"),
        *(f"--- agent {a.device} (exit code {a.proc.poll()})\n{a.tail()}" for a in agents),
    ])


def get_fleet(namespace: str, name: str) -> dict[str, Any]:
    obj: dict[str, Any] = kubectl_json("-n", namespace, "get", resource(name))
    return obj


def _true(obj: dict[str, Any], type_: str) -> bool:
    c = condition(obj, type_)
    return bool(c and c.get("status") == "True"
                and c.get("observedGeneration") == obj["metadata"]["generation"])


def rolled_out(namespace: str, name: str, version: str) -> dict[str, Any] | None:
    """The EdgeFleet once every device runs ``version`` and the rollout is complete."""
    obj = get_fleet(namespace, name)
    status = obj.get("status") or {}
    if status.get("version") != version or not _true(obj, "RolloutComplete"):
        return None
    if status.get("devices") != len(DEVICES) or status.get("online") != len(DEVICES):
        return None
    if status.get("devicesByVersion") != {version: len(DEVICES)}:
        return None
    return obj


def packaged_after(namespace: str, name: str, old: str) -> dict[str, Any] | None:
    """The EdgeFleet once a version other than ``old`` is packaged for its generation."""
    obj = get_fleet(namespace, name)
    version = (obj.get("status") or {}).get("version")
    return obj if version and version != old and _true(obj, "Packaged") else None


def package_jobs(namespace: str, name: str) -> list[str]:
    items = kubectl_json("-n", namespace, "get", "jobs", "-l",
                         f"{LABEL_EDGE_FLEET}={name}")["items"]
    return sorted(str(j["metadata"]["name"]) for j in items)


def _get(url: str) -> tuple[int, bytes]:
    try:
        with _DIRECT.open(url, timeout=10) as r:
            return int(r.status), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


def serving(agent: Agent) -> str | None:
    """The version an agent serves (its /ping), or None (nothing yet, or not listening)."""
    if agent.proc.poll() is not None:
        raise AssertionError(f"agent {agent.device} exited with {agent.proc.returncode}:\n"
                             f"{agent.tail()}")
    code, body = _get(agent.url + "/ping")
    return str(json.loads(body)["version"]) if code == 200 else None


def listening(agent: Agent) -> bool:
    """The agent answers /ping (503 until its first version is installed)."""
    return serving(agent) is not None or _get(agent.url + "/ping")[0] == 503


def invoke(agent: Agent, body: bytes) -> tuple[str, Any]:
    """(the version that answered, the decoded answer) of the agent's local /invocations."""
    request = urllib.request.Request(agent.url + "/invocations", data=body, method="POST",
                                     headers={"content-type": "application/json"})
    try:
        with _DIRECT.open(request, timeout=30) as r:
            return str(r.headers.get("x-kubeinfer-edge-version", "")), json.loads(r.read())
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"agent {agent.device}: /invocations answered {exc.code}: "
                             f"{exc.read()[:500]!r}") from None


@contextmanager
def agents_running(server: str, token: str, public_key: str,
                   directory: Path) -> Iterator[list[Agent]]:
    """The three agents, as a device runs them, stopped (SIGTERM) when the block ends."""
    agents: list[Agent] = []
    try:
        for device in DEVICES:
            port = free_port()
            log = directory / f"{device}.log"
            labels = "site=e2e" + (",ring=early" if device == EARLY else "")
            with open(log, "wb") as out:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "kubeinfer_runtime", "edge", "agent",
                     "--server", server, "--device-id", device, "--target", TARGET,
                     "--state-dir", str(directory / device), "--labels", labels,
                     "--listen", f"127.0.0.1:{port}", "--public-key", public_key],
                    stdout=out, stderr=subprocess.STDOUT,
                    # The token through the environment: it stays out of the process list.
                    env={**os.environ, "KUBEINFER_EDGE_BOOTSTRAP_TOKEN": token})
            agent = Agent(device, proc, port, log)
            agents.append(agent)
            wait_for(partial(listening, agent), AGENT_LISTEN_WITHIN_S,
                     f"agent {device} listening", interval=0.5)
        yield agents
    finally:
        for agent in agents:
            if agent.proc.poll() is None:
                agent.proc.terminate()
        for agent in agents:
            try:
                agent.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                agent.proc.kill()
                agent.proc.wait()


def owned(namespace: str, uid: str) -> list[str]:
    """Objects owned by ``uid``, and the pods of its Jobs."""
    items = kubectl_json("-n", namespace, "get",
                         "deployments,services,configmaps,jobs,poddisruptionbudgets,pods")["items"]
    owners = {uid} | {o["metadata"]["uid"] for o in items
                      if any(r.get("uid") == uid
                             for r in o["metadata"].get("ownerReferences", []))}
    return [f"{o['kind']}/{o['metadata']['name']}" for o in items
            if any(r.get("uid") in owners for r in o["metadata"].get("ownerReferences", []))]


def labelled(namespace: str, name: str) -> list[str]:
    items = kubectl_json("-n", namespace, "get", "deployments,services,configmaps,jobs", "-l",
                         f"{LABEL_EDGE_FLEET}={name}")["items"]
    return [f"{o['kind']}/{o['metadata']['name']}" for o in items]


def check_answers(agents: list[Agent], version: str, body: bytes,
                  expected: dict[str, np.ndarray]) -> None:
    for agent in agents:
        answered_by, got = invoke(agent, body)
        assert answered_by == version, (agent.device, answered_by, version)
        assert_predictions(got, expected, f"agent {agent.device} ({version})")


@pytest.mark.timeout(BUCKET_WITHIN_S + PACKAGED_WITHIN_S + READY_TIMEOUT_S
                     + ROLLED_OUT_WITHIN_S + NEW_VERSION_WITHIN_S + GC_TIMEOUT_S + 300)
def test_edge_fleet_rolls_versions_out_to_agents(namespace: str, models_dir: Path,
                                                 tmp_path: Path) -> None:
    if DEPS_NAMESPACE is None or S3_SECRET is None:
        pytest.skip("an EdgeFleet's model and packages live in an object store and its "
                    "fleet server's state in Redis: run e2e/run.sh with KUBEINFER_E2E_ASYNC=1 "
                    "(the default), which deploys both")
    doc: dict[str, Any] = yaml.safe_load((EXAMPLES / EXAMPLE).read_text())
    name = doc["metadata"]["name"]
    bucket = f"kubeinfer-{namespace}"
    spec = doc["spec"]
    v1_model, v2_model = models_dir / "iris.onnx", models_dir / "iris-v2.onnx"
    spec["model"] = {"uri": f"s3://{bucket}/models/{v1_model.name}"}
    spec["targets"] = [{"name": TARGET}]
    spec["packages"] = {"uri": f"s3://{bucket}/packages/"}
    spec["redis"] = {"url": f"redis://redis.{DEPS_NAMESPACE}.svc:6379/{REDIS_DB}"}
    spec["heartbeatIntervalSeconds"] = HEARTBEAT_S
    spec["rollout"] = {"waves": [{"deviceSelector": {"ring": "early"}, "bakeSeconds": 0,
                                  "maxFailurePercent": 0}],
                       "onFailure": "Rollback", "deviceDeploymentTimeoutSeconds": 300}
    # No capture: its destination would be one more bucket; the capture buffer is tested
    # with a real agent in tests/integration/test_edge_agent.py.
    spec["dataCapture"] = {"samplingPercentage": 0}
    spec["server"].pop("resources", None)  # the operator's defaults fit kind
    from kubeinfer_operator.api.edge_fleet import EdgeFleet
    from kubeinfer_operator.reconcile.edge_validate import validate_edge_fleet
    from kubeinfer_operator.render.edge_plan import package_job_name
    from kubeinfer_runtime.edge import signing

    EdgeFleet.model_validate(doc)  # the adjusted copy is still valid
    validate_edge_fleet(name, namespace, spec)  # and runs on Kubernetes
    manifest = tmp_path / f"{name}.yaml"
    manifest.write_text(yaml.safe_dump(doc, sort_keys=False))
    registration = spec["registration"]["bootstrapTokenSecret"]
    key_ref = spec["signing"]["keySecret"]
    token = secrets.token_hex(24)
    signing_key = base64.b64encode(os.urandom(32)).decode()
    v1_body, v1_expected = sample_and_expected(v1_model)
    v2_body, v2_expected = sample_and_expected(v2_model)
    key, secret = object_store_credentials()
    agents: list[Agent] = []

    try:
        kubectl("-n", namespace, "create", "secret", "generic", registration["name"],
                f"--from-literal={registration['key']}={token}")
        kubectl("-n", namespace, "create", "secret", "generic", key_ref["name"],
                f"--from-literal={key_ref['key']}={signing_key}")
        with port_forward(DEPS_NAMESPACE, S3_SERVICE, S3_PORT) as s3_port:
            s3 = s3_client(s3_port, key, secret)
            wait_for(lambda: _bucket(s3, bucket), BUCKET_WITHIN_S, f"bucket {bucket}")
            for model in (v1_model, v2_model):
                s3.put_object(Bucket=bucket, Key=f"models/{model.name}",
                              Body=model.read_bytes())

        kubectl("-n", namespace, "apply", "-f", str(manifest))
        kubectl("-n", namespace, "wait", "--for=condition=Packaged", resource(name),
                f"--timeout={PACKAGED_WITHIN_S}s", timeout=PACKAGED_WITHIN_S + 30)
        kubectl("-n", namespace, "wait", "--for=condition=Ready", resource(name),
                f"--timeout={READY_TIMEOUT_S}s", timeout=READY_TIMEOUT_S + 30)
        obj = get_fleet(namespace, name)
        status = obj["status"]
        v1 = status["version"]
        # None fields are merge-patch nulls: absent from the stored status, not null.
        assert status["desiredVersion"] == v1 and status.get("previousVersion") is None, status
        assert status["current"]["publicKey"] == signing.public_of(signing_key), status
        assert [p["target"] for p in status["current"]["packages"]] == [TARGET], status
        assert status["current"]["packages"][0]["uri"].startswith(
            f"s3://{bucket}/packages/{namespace}/{name}/"), status
        assert package_jobs(namespace, name) == [package_job_name(name, v1, TARGET)]
        service = urlparse(status["fleetServer"])
        assert service.hostname and service.port, status["fleetServer"]

        with ExitStack() as stack:
            local = stack.enter_context(
                port_forward(namespace, service.hostname.split(".")[0], service.port))
            agents = stack.enter_context(agents_running(
                f"http://127.0.0.1:{local}", token, status["current"]["publicKey"], tmp_path))

            # The first version goes to every device at once.
            obj = wait_for(lambda: rolled_out(namespace, name, v1), ROLLED_OUT_WITHIN_S,
                           f"3 devices running {v1} and RolloutComplete")
            assert obj["status"]["phase"] == "Complete", obj["status"]
            for agent in agents:
                assert serving(agent) == v1, agent.device
            check_answers(agents, v1, v1_body, v1_expected)
            table = kubectl("-n", namespace, "get", "kef", name).splitlines()
            assert table[0].split() == ["NAME", "VERSION", "DEVICES", "ONLINE", "WAVE",
                                        "AGE"], table
            assert table[1].split()[:2] == [name, v1], table

            # A new model.uri is a new version: packaged, rolled out (the ring=early device
            # first), served by every agent; the old version is the rollback target.
            kubectl("-n", namespace, "patch", resource(name), "--type=merge", "-p", json.dumps(
                {"spec": {"model": {"uri": f"s3://{bucket}/models/{v2_model.name}"}}}))
            obj = wait_for(lambda: packaged_after(namespace, name, v1), PACKAGED_WITHIN_S,
                           "the new version packaged")
            v2 = obj["status"]["version"]
            assert v2 != v1 and obj["status"]["desiredVersion"] == v2, obj["status"]
            assert obj["status"]["previousVersion"] == v1, obj["status"]
            obj = wait_for(lambda: rolled_out(namespace, name, v2), NEW_VERSION_WITHIN_S,
                           f"3 devices running {v2} and RolloutComplete")
            assert obj["status"]["phase"] == "Complete", obj["status"]
            assert obj["status"]["wave"] == "1/1", obj["status"]
            assert not _true(obj, "RolledBack"), obj["status"]
            wait_for(lambda: all(serving(a) == v2 for a in agents), 60,
                     f"every agent serving {v2}", interval=1)
            check_answers(agents, v2, v2_body, v2_expected)
            # The old version's package Job went with the spec that wanted it.
            assert package_jobs(namespace, name) == [package_job_name(name, v2, TARGET)]

        # Deleting the EdgeFleet takes every object of it.
        uid = obj["metadata"]["uid"]
        children = owned(namespace, uid)
        for kind, child in (("Deployment", f"{name}-fleet-server"),
                            ("Service", f"{name}-fleet-server"),
                            ("ConfigMap", f"{name}-fleet-config"),
                            ("PodDisruptionBudget", f"{name}-fleet-server")):
            assert f"{kind}/{child}" in children, children
        assert f"Job/{package_job_name(name, v2, TARGET)}" in children, children
        kubectl("-n", namespace, "delete", resource(name), "--wait",
                f"--timeout={GC_TIMEOUT_S}s", timeout=GC_TIMEOUT_S + 30)
        wait_for(lambda: not owned(namespace, uid) and not labelled(namespace, name),
                 GC_TIMEOUT_S, f"the objects of {resource(name)} to be garbage-collected")
    except BaseException as exc:
        if isinstance(exc, Exception):
            exc.add_note(diagnostics(namespace, name, agents))
        raise
