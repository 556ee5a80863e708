"""HA: two ``kubeinfer operator`` processes share one peering object; one acts.

The chart runs ``operator.replicas: 2+`` as an active replica and standbys (kopf
peering, a distinct priority per process). Here both are real processes against
the emulator: the standby reconciles nothing and its scaler refuses scale
requests with 503 while the active replica lives; once the active one is killed
(SIGKILL: no goodbye in the peering object) the standby takes over within the
issue's 15 s and reconciles an Endpoint created after the kill.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kubeinfer_operator.render.k8s_secrets import scaler_token
from tests.support.kube_harness import EmulatorThread, Kube, wait_for, write_kubeconfig
from tests.support.ports import free_port

PEERING = "kubeinfer-ha"
SIGNING_KEY = "ha-test-signing-key"
#: The issue's bound on a standby's takeover after the active replica dies.
TAKEOVER_S = 15.0


def endpoint(name: str) -> dict[str, Any]:
    return {"apiVersion": "kubeinfer.io/v1alpha1", "kind": "Endpoint",
            "metadata": {"name": name},
            "spec": {"type": "Serverless", "serverless": {"maxConcurrency": 2},
                     "variants": [{"name": "main",
                                   "model": {"uri": "file:///models/iris.onnx"}}]}}


@pytest.fixture
def emulator() -> Iterator[EmulatorThread]:
    emu = EmulatorThread().start()
    yield emu
    emu.stop()


class Replica:
    """One operator process with its own health and scaler ports."""

    def __init__(self, name: str, priority: int, kubeconfig: Path, log_dir: Path) -> None:
        self.name = name
        self.health = free_port()
        self.scaler = free_port()
        self.metrics = free_port()
        self.log_path = log_dir / f"{name}.log"
        env = {**os.environ, "KUBECONFIG": str(kubeconfig), "POD_ID": name,
               "KUBEINFER_PEERING_NAME": PEERING,
               "KUBEINFER_PEERING_PRIORITY": str(priority),
               "KUBEINFER_PEERING_LIFETIME_S": "5",
               "KUBEINFER_STATUS_INTERVAL_S": "0.5",
               "KUBEINFER_SCALER_PORT": str(self.scaler),
               "KUBEINFER_OPERATOR_METRICS_PORT": str(self.metrics),
               "KUBEINFER_SCALER_SIGNING_KEY": SIGNING_KEY,
               "KUBEINFER_LIVENESS_ENDPOINT": f"http://127.0.0.1:{self.health}/healthz",
               "KUBEINFER_NAMESPACES": ""}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kubeinfer_operator.cli", "operator"],
                env=env, stdout=log, stderr=subprocess.STDOUT)

    def healthy(self) -> bool:
        assert self.proc.poll() is None, self.log_path.read_text()
        try:
            return httpx.get(f"http://127.0.0.1:{self.health}/healthz").status_code == 200
        except httpx.HTTPError:
            return False

    def scale(self, namespace: str, endpoint: str) -> int:
        token = scaler_token(SIGNING_KEY.encode(), namespace)
        response = httpx.post(f"http://127.0.0.1:{self.scaler}/scale",
                              headers={"Authorization": f"Bearer {token}"},
                              json={"namespace": namespace, "endpoint": endpoint,
                                    "variant": "main", "waiting": 1})
        return response.status_code

    def active(self) -> float | None:
        """The replica's ``kubeinfer_operator_active`` gauge (None: not served yet)."""
        try:
            text = httpx.get(f"http://127.0.0.1:{self.metrics}/metrics").text
        except httpx.HTTPError:
            return None
        for line in text.splitlines():
            if line.startswith("kubeinfer_operator_active "):
                return float(line.split()[1])
        return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def test_standby_stays_idle_then_takes_over_when_the_active_replica_dies(
        emulator: EmulatorThread, tmp_path: Path) -> None:
    kube = Kube(emulator.url)
    kube.create_namespace("demo")
    peering = {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering",
               "metadata": {"name": PEERING}}
    assert kube.http.post("/apis/kopf.dev/v1/clusterkopfpeerings", json=peering).status_code == 201
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", emulator.url)

    def peers() -> dict[str, Any]:
        body = kube.http.get(f"/apis/kopf.dev/v1/clusterkopfpeerings/{PEERING}").json()
        return {k: v for k, v in (body.get("status") or {}).items() if v}

    active = Replica("op-active", 200, kubeconfig, tmp_path)
    standby = Replica("op-standby", 100, kubeconfig, tmp_path)
    try:
        wait_for(lambda: active.healthy() and standby.healthy(), 60, "both replicas' /healthz")
        wait_for(lambda: set(peers()) == {"op-active", "op-standby"}, 30,
                 "both replicas' heartbeats in the peering object")

        assert kube.create(endpoint("first"), "demo").status_code == 201
        wait_for(lambda: "first-gateway" in kube.names("Deployment", "demo"), 30,
                 "the active replica to reconcile the first Endpoint")
        # Only the active replica answers scale requests; the standby sends gateways on.
        wait_for(lambda: active.scale("demo", "first") == 202, 30,
                 "the active scaler to accept a scale request")
        # The standby's role is read every 2 s and cached for 1 s: a reading from before
        # the active replica's first heartbeat still says "active" for up to a second
        # (the standby answered 404 then). Its gauge shows when it has read the role
        # again; only then is its scaler a standby's.
        wait_for(lambda: (active.active(), standby.active()) == (1.0, 0.0), 30,
                 "the active gauge: 1 on the active replica, 0 on the standby")
        assert standby.scale("demo", "first") == 503

        active.proc.send_signal(signal.SIGKILL)
        active.proc.wait(timeout=10)
        killed = time.monotonic()
        assert kube.create(endpoint("second"), "demo").status_code == 201
        wait_for(lambda: "second-gateway" in kube.names("Deployment", "demo"), TAKEOVER_S,
                 "the standby to take over and reconcile the second Endpoint")
        took = time.monotonic() - killed
        # Its scaler follows within a second (it caches its role that long); gateways
        # repeat their requests every second anyway.
        wait_for(lambda: standby.scale("demo", "second") == 202, 5,
                 "the former standby's scaler to accept scale requests")
        wait_for(lambda: standby.active() == 1.0, 10, "the former standby's active gauge")
        print(f"standby reconciled {took:.1f} s after the active replica was killed")
    finally:
        active.stop()
        standby.stop()
        kube.close()
    for replica in (active, standby):
        assert "Traceback" not in replica.log_path.read_text(), replica.log_path.read_text()
    # The standby was paused by kopf until the kill, and the active one never was.
    assert "Resuming operations after the pause" in standby.log_path.read_text()
    assert "Pausing" not in active.log_path.read_text()
