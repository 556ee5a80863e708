"""A namespace editor repoints the Services the operator renders: the operator's calls
do not follow.

The operator scrapes every gateway pod's ``/metrics`` (scaling) and polls the fleet
server's ``GET /v1/fleet`` with the fleet's status token. Both sit behind Services in
the tenant's namespace (``<endpoint>-gateway-pods``, ``<fleet>-fleet-server``), which
anyone with ``edit`` there can patch into ``type: ExternalName`` pointing at a host of
their choosing. Here the real kopf operator runs against the emulator with a stand-in
for cluster DNS (``tests.support.cluster_dns``: Service names resolve as CoreDNS would
resolve them, ``attacker.example`` to 127.0.0.2), so an operator that called a Service
by its name would really reach the "attacker": a recording HTTP server on 127.0.0.2, on
the same ports as the legitimate pods' stand-in on 127.0.0.1. The test plays the
kubelet (a Running, Ready pod with podIP 127.0.0.1 for the gateway and for the fleet
server) and the namespace editor (the patch), then checks that:

* the operator keeps reaching the pods at their own address, and the attacker gets no
  request (so no status token, and none of its numbers is read);
* the operator resolves no Service name;
* the Service is restored as rendered (type ClusterIP, no externalName).
"""

from __future__ import annotations

import base64
import copy
import itertools
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from kubeinfer_operator.render import edge_fleet as rf
from kubeinfer_operator.settings import OperatorSettings
from kubeinfer_runtime.contract.edge import FleetStatus
from tests.support.cluster_dns import ClusterDns
from tests.support.kube_harness import (
    EmulatorThread,
    Kube,
    OperatorThread,
    wait_for,
    write_kubeconfig,
)

LEGIT_IP, ATTACKER_IP = "127.0.0.1", "127.0.0.2"
ATTACKER_HOST = "attacker.example"
#: What the legitimate fleet server and the attacker answer (the attacker's is forged).
LEGIT_DEVICES, FORGED_DEVICES = 3, 999
_ids = itertools.count()


@dataclass
class Recorded:
    port: int
    path: str
    authorization: str


@dataclass
class Host:
    """HTTP servers on one loopback IP, one per port, recording every request: a gateway
    pod's ``GET /metrics`` and a fleet server's ``GET /v1/fleet``."""

    ip: str
    devices: int
    requests: list[Recorded] = field(default_factory=list)
    servers: list[ThreadingHTTPServer] = field(default_factory=list)

    def listen(self, port: int) -> int:
        host, bound = self, [port]

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                host.requests.append(Recorded(bound[0], self.path,
                                              self.headers.get("Authorization", "")))
                if self.path == "/metrics":
                    body = ('kubeinfer_gateway_invocations_total{endpoint="ep",'
                            f'variant="main"}} {host.devices}\n').encode()
                    kind = "text/plain; version=0.0.4"
                elif self.path == "/v1/fleet":
                    body = FleetStatus(fleet="sensors", devices=host.devices,
                                       byState={"Online": host.devices}, byVersion={},
                                       rollout=None).model_dump_json().encode()
                    kind = "application/json"
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: Any) -> None:
                pass

        server = ThreadingHTTPServer((self.ip, port), Handler)
        bound[0] = server.server_port
        self.servers.append(server)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return bound[0]

    def seen(self, path: str) -> list[Recorded]:
        return [r for r in list(self.requests) if r.path == path]

    def close(self) -> None:
        for server in self.servers:
            server.shutdown()
            server.server_close()


def _paired_hosts() -> tuple[Host, Host, int, int]:
    """The legitimate pods' host and the attacker's, listening on the same two ports
    (the gateways' metrics port and the fleet server's port): a connection differs only
    in the IP it went to."""
    for _ in range(20):
        attacker, legit = Host(ATTACKER_IP, FORGED_DEVICES), Host(LEGIT_IP, LEGIT_DEVICES)
        try:
            ports = [attacker.listen(0), attacker.listen(0)]
            for port in ports:
                legit.listen(port)
        except OSError:  # taken on 127.0.0.1 by something else: another pair
            attacker.close()
            legit.close()
            continue
        return legit, attacker, ports[0], ports[1]
    raise RuntimeError("no pair of ports free on both 127.0.0.1 and 127.0.0.2")


@dataclass
class World:
    kube: Kube
    dns: ClusterDns
    legit: Host
    attacker: Host
    settings: OperatorSettings


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    legit, attacker, metrics_port, runtime_port = _paired_hosts()
    settings = OperatorSettings(standalone=True, status_interval_s=0.3, namespaces=[],
                                resync_interval_s=2.0, metrics_port=metrics_port,
                                runtime_port=runtime_port,
                                runtime_image="example.test/runtime:1",
                                compiler_image="example.test/compiler:1")
    emulator = EmulatorThread().start()
    dns = ClusterDns(emulator.url, hosts={ATTACKER_HOST: ATTACKER_IP})
    kubeconfig = write_kubeconfig(Path(tmp_path_factory.mktemp("kube")) / "config",
                                  emulator.url)
    env = pytest.MonkeyPatch()
    env.setenv("KUBECONFIG", str(kubeconfig))
    kube = Kube(emulator.url)
    try:
        with dns.installed():
            # No fleet_url: the operator finds the fleet server itself, as in a cluster.
            operator = OperatorThread(settings).start()
            try:
                yield World(kube, dns, legit, attacker, settings)
            finally:
                operator.stop()
    finally:
        kube.close()
        dns.close()
        emulator.stop()
        env.undo()
        legit.close()
        attacker.close()
    assert emulator.emulator is not None and emulator.emulator.failures == []


@pytest.fixture
def ns(world: World) -> str:
    name = f"tamper{next(_ids)}"
    world.kube.create_namespace(name)
    return name


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _run_pod(kube: Kube, ns: str, deployment: dict[str, Any]) -> None:
    """The Deployment controller and the kubelet: one Running, Ready pod of
    ``deployment`` at ``LEGIT_IP``."""
    template = deployment["spec"]["template"]
    name = f"{deployment['metadata']['name']}-5d8f-abcde"
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "labels": dict(template["metadata"]["labels"])},
           "spec": copy.deepcopy(template["spec"])}
    r = kube.create(pod, ns)
    assert r.status_code == 201, r.text
    status = {"phase": "Running", "podIP": LEGIT_IP, "podIPs": [{"ip": LEGIT_IP}],
              "conditions": [{"type": "Ready", "status": "True",
                              "lastTransitionTime": _now()}]}
    r = kube.patch("Pod", ns, name, {"status": status}, sub="status")
    assert r.status_code == 200, r.text


def _repoint(kube: Kube, ns: str, service: str) -> None:
    """What ``kubectl patch svc`` by a namespace editor leaves (the API server drops the
    clusterIP of a Service turned ExternalName)."""
    r = kube.patch("Service", ns, service, {"spec": {
        "type": "ExternalName", "externalName": ATTACKER_HOST, "clusterIP": None}})
    assert r.status_code == 200, r.text
    svc = kube.get("Service", ns, service) or {}
    assert svc["spec"]["type"] == "ExternalName"


def _restored(kube: Kube, ns: str, service: str) -> dict[str, Any] | None:
    svc = kube.get("Service", ns, service) or {}
    spec = svc.get("spec") or {}
    return svc if spec.get("type") == "ClusterIP" and "externalName" not in spec else None


def _after(host: Host, path: str, count: int, what: str) -> None:
    """Wait for ``count`` more requests to ``path`` on ``host`` than it has had so far."""
    before = len(host.seen(path))
    wait_for(lambda: len(host.seen(path)) >= before + count, 20, what)


def test_a_repointed_gateway_pods_service_diverts_no_scrape(world: World, ns: str) -> None:
    kube = world.kube
    doc = {"apiVersion": "kubeinfer.io/v1alpha1", "kind": "Endpoint", "metadata": {"name": "ep"},
           "spec": {"variants": [{"name": "main", "model": {"uri": "s3://b/iris.onnx"},
                                  "autoscaling": {"minReplicas": 1, "maxReplicas": 3,
                                                  "targetTracking": [{
                                                      "metric": "InvocationsPerReplica",
                                                      "target": 60}]}}]}}
    assert kube.create(doc, ns).status_code == 201
    wait_for(lambda: kube.get("Service", ns, "ep-gateway-pods"), 20, "the gateway-pods Service")
    _run_pod(kube, ns, wait_for(lambda: kube.get("Deployment", ns, "ep-gateway"), 20,
                                "the gateway Deployment"))
    _after(world.legit, "/metrics", 2, "scrapes of the gateway pod at its own IP")

    _repoint(kube, ns, "ep-gateway-pods")
    # Several scaler rounds (every 0.3 s) before the next full reconcile (every 2 s).
    _after(world.legit, "/metrics", 3, "scrapes after the Service was repointed")
    assert world.attacker.seen("/metrics") == []
    assert not [n for n in world.dns.asked if n.endswith(f".{ns}.svc")]
    svc = wait_for(lambda: _restored(kube, ns, "ep-gateway-pods"), 20,
                   "the gateway-pods Service restored")
    assert svc["spec"]["clusterIP"] == "None"
    assert world.attacker.seen("/metrics") == []


def _secret(kube: Kube, ns: str, name: str, key: str, value: str) -> None:
    r = kube.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
                     "data": {key: base64.b64encode(value.encode()).decode()}}, ns)
    assert r.status_code == 201, r.text


def _package(kube: Kube, ns: str) -> None:
    """The Job controller and the kubelet: the fleet's one package Job succeeds with its
    report in the pod's termination message."""
    job = wait_for(lambda: next(iter(kube.list("Job", ns, f"{rf.LABEL_EDGE_FLEET}=sensors")),
                                None), 20, "the package Job")
    md, labels = job["metadata"], job["spec"]["template"]["metadata"]["labels"]
    version = labels[rf.LABEL_EDGE_VERSION]
    report = {"uri": f"s3://pkgs/edge/{ns}/sensors/{version}/x86.tar.gz", "sha256": "ab" * 32,
              "size": 1234, "signature": base64.b64encode(b"s" * 64).decode(),
              "publicKey": base64.b64encode(bytes(range(32))).decode(), "version": version,
              "target": "x86"}
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": f"{md['name']}-abcde",
                        "labels": {**labels, "batch.kubernetes.io/job-name": md["name"]}},
           "spec": copy.deepcopy(job["spec"]["template"]["spec"])}
    assert kube.create(pod, ns).status_code == 201
    terminated = {"exitCode": 0, "reason": "Completed", "message": json.dumps(report),
                  "finishedAt": _now(), "startedAt": _now()}
    assert kube.patch("Pod", ns, pod["metadata"]["name"], {"status": {
        "phase": "Succeeded", "containerStatuses": [{
            "name": rf.PACKAGE_CONTAINER, "ready": False, "restartCount": 0, "image": "x",
            "imageID": "", "state": {"terminated": terminated}}]}},
        sub="status").status_code == 200
    assert kube.patch("Job", ns, md["name"], {"status": {
        "startTime": _now(), "completionTime": _now(), "succeeded": 1,
        "conditions": [{"type": "SuccessCriteriaMet", "status": "True",
                        "lastTransitionTime": _now()},
                       {"type": "Complete", "status": "True", "lastTransitionTime": _now()}]}},
        sub="status").status_code == 200


def _status_token(kube: Kube, ns: str) -> str:
    secret = kube.get("Secret", ns, "kubeinfer-runtime") or {}
    return base64.b64decode(secret["data"]["edge-status-sensors"]).decode()


def test_a_repointed_fleet_server_service_gets_no_status_token(world: World, ns: str) -> None:
    kube = world.kube
    _secret(kube, ns, "boot", "token", "bootstrap-token-0123456789")
    _secret(kube, ns, "signing", "key", base64.b64encode(b"k" * 32).decode())
    doc = {"apiVersion": "kubeinfer.io/v1alpha1", "kind": "EdgeFleet",
           "metadata": {"name": "sensors"},
           "spec": {"model": {"uri": "s3://models/mlp.onnx"}, "targets": [{"name": "x86"}],
                    "registration": {"bootstrapTokenSecret": {"name": "boot", "key": "token"}},
                    "signing": {"keySecret": {"name": "signing", "key": "key"}},
                    "packages": {"uri": "s3://pkgs/edge"},
                    "redis": {"url": "redis://redis:6379/0"},
                    "rollout": {"waves": [{"percentage": 50, "maxFailurePercent": 10}]}}}
    assert kube.create(doc, ns).status_code == 201
    _package(kube, ns)
    wait_for(lambda: kube.get("Service", ns, "sensors-fleet-server"), 20,
             "the fleet server Service")
    _run_pod(kube, ns, wait_for(lambda: kube.get("Deployment", ns, "sensors-fleet-server"),
                                20, "the fleet server Deployment"))
    _after(world.legit, "/v1/fleet", 1, "a poll of the fleet server pod at its own IP")
    token = _status_token(kube, ns)
    assert {r.authorization for r in world.legit.seen("/v1/fleet")} == {f"Bearer {token}"}
    wait_for(lambda: ((kube.get("EdgeFleet", ns, "sensors") or {}).get("status") or {}).get(
        "devices") == LEGIT_DEVICES, 20, "the fleet's status read from its pod")

    _repoint(kube, ns, "sensors-fleet-server")
    _after(world.legit, "/v1/fleet", 3, "polls after the Service was repointed")
    assert world.attacker.seen("/v1/fleet") == []  # so never the status token either
    assert not [n for n in world.dns.asked if n.endswith(f".{ns}.svc")]
    wait_for(lambda: _restored(kube, ns, "sensors-fleet-server"), 20,
             "the fleet server Service restored")
    status = (kube.get("EdgeFleet", ns, "sensors") or {}).get("status") or {}
    assert status.get("devices") == LEGIT_DEVICES  # never the attacker's numbers
    assert world.attacker.seen("/v1/fleet") == []
