"""Smoke test: ``kubeinfer operator`` and ``kubectl`` as real processes against the emulator.

What a user does after ``helm install``: kubectl apply an example, wait for
Ready, delete it. The operator runs with kopf peering (a ClusterKopfPeering
object, as the Helm chart creates) and its liveness endpoint.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.kube_harness import EmulatorThread, Kube, wait_for, write_kubeconfig
from tests.support.ports import free_port

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "realtime-endpoint.yaml"
KUBECTL = shutil.which("kubectl")

pytestmark = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed")


@pytest.fixture
def emulator() -> Iterator[EmulatorThread]:
    emu = EmulatorThread().start()
    yield emu
    emu.stop()
    assert emu.emulator is not None
    assert emu.emulator.failures == []


def test_kubectl_apply_wait_delete_with_the_operator_process(emulator: EmulatorThread,
                                                             tmp_path: Path) -> None:
    kube = Kube(emulator.url)
    kube.create_namespace("demo")
    peering = {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering",
               "metadata": {"name": "kubeinfer-smoke"}}
    assert kube.http.post("/apis/kopf.dev/v1/clusterkopfpeerings", json=peering).status_code == 201

    health_port = free_port()
    env = {**os.environ,
           "KUBECONFIG": str(write_kubeconfig(tmp_path / "kubeconfig", emulator.url)),
           "KUBEINFER_PEERING_NAME": "kubeinfer-smoke",
           "KUBEINFER_STATUS_INTERVAL_S": "0.5",
           "KUBEINFER_LIVENESS_ENDPOINT": f"http://127.0.0.1:{health_port}/healthz",
           "KUBEINFER_NAMESPACES": ""}
    log_path = tmp_path / "operator.log"

    def kubectl(*args: str) -> subprocess.CompletedProcess[str]:
        assert KUBECTL is not None
        return subprocess.run([KUBECTL, *args], env=env, capture_output=True, text=True,
                              timeout=60)

    with open(log_path, "wb") as log:
        operator = subprocess.Popen(
            [sys.executable, "-m", "kubeinfer_operator.cli", "operator"],
            env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        def healthy() -> bool:
            assert operator.poll() is None, log_path.read_text()
            try:
                return httpx.get(f"http://127.0.0.1:{health_port}/healthz").status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, 30, "the operator's liveness endpoint")

        applied = kubectl("apply", "--validate=false", "-n", "demo", "-f", str(EXAMPLE))
        assert applied.returncode == 0, applied.stderr
        assert "endpoint.kubeinfer.io/iris created" in applied.stdout

        wait_for(lambda: len(kube.list("Deployment", "demo")) == 3, 20, "three Deployments")
        for name in ("iris-gateway", "iris-primary", "iris-canary"):
            kube.make_available("demo", name)
        waited = kubectl("wait", "--for=condition=Ready", "endpoint.kubeinfer.io/iris",
                         "-n", "demo", "--timeout=30s")
        assert waited.returncode == 0, waited.stderr
        url = kubectl("get", "endpoint.kubeinfer.io/iris", "-n", "demo",
                      "-o", "jsonpath={.status.url}")
        assert url.stdout == "http://iris-gateway.demo.svc:8080"

        deleted = kubectl("delete", "-n", "demo", "-f", str(EXAMPLE), "--timeout=30s")
        assert deleted.returncode == 0, deleted.stderr
        assert kube.get("Endpoint", "demo", "iris") is None
        for kind in ("Deployment", "Service", "ConfigMap"):
            assert kube.names(kind, "demo") == set()
    finally:
        operator.send_signal(signal.SIGTERM)
        try:
            code = operator.wait(timeout=30)
        except subprocess.TimeoutExpired:
            operator.kill()
            operator.wait()
            raise
        kube.close()
    output = log_path.read_text()
    assert code == 0, output
    assert "Traceback" not in output, output
