"""Run the Kubernetes emulator and the real kopf operator in background threads for tests.

* ``EmulatorThread``: ``KubeEmulator`` on a free 127.0.0.1 port, in its own
  thread and event loop (so the test's synchronous code and the operator
  reach it over real HTTP, like a cluster).
* ``write_kubeconfig``: a kubeconfig pointing at it (for kopf, our client and
  kubectl).
* ``Kube``: a tiny synchronous JSON client for test code (create, patch,
  status patches as a controller would make, waits).
* ``OperatorThread``: ``kubeinfer_operator.main.operate`` in its own thread and
  loop, started and stopped with kopf's ready/stop flags (cancelling kopf's
  task instead hangs about half the time).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import kmock
import pytest
import yaml

from tests.support.kube_emulator import KubeEmulator
from tests.support.kube_schema import load_crds

#: Seconds the emulator or the operator may take to start (see ``EmulatorThread.start``).
START_TIMEOUT_S = 90.0


class EmulatorThread:
    def __init__(self, crds: list[dict[str, Any]] | None = None) -> None:
        self.crds = load_crds() if crds is None else crds
        self.url = ""
        self.emulator: KubeEmulator | None = None
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="kube-emulator", daemon=True)

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # surfaced by start()
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with KubeEmulator(crds=self.crds) as emulator, kmock.Server(emulator) as server:
            self.emulator = emulator
            self.url = f"http://127.0.0.1:{server.port}"
            self._ready.set()
            await self._stop.wait()

    def start(self) -> EmulatorThread:
        self._thread.start()
        # Generous: a module's emulator and operator together took 14 s to start on a
        # loaded 2-core machine (schemas, kopf's start-up); only a broken start waits long.
        if not self._ready.wait(START_TIMEOUT_S) or self._error is not None:
            raise RuntimeError(f"the Kubernetes emulator did not start: {self._error!r}")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=10)


def write_kubeconfig(path: Path, url: str, namespace: str = "default") -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "emulator", "cluster": {"server": url}}],
        "users": [{"name": "tester", "user": {}}],
        "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "tester",
                                                      "namespace": namespace}}],
        "current-context": "emulator",
    }))
    return path


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition",
             interval: float = 0.05) -> Any:
    """Poll until ``predicate()`` is truthy; return its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


RESOURCES = {
    "Endpoint": "/apis/kubeinfer.io/v1alpha1/namespaces/{ns}/endpoints",
    "Deployment": "/apis/apps/v1/namespaces/{ns}/deployments",
    "HorizontalPodAutoscaler": "/apis/autoscaling/v2/namespaces/{ns}/horizontalpodautoscalers",
    "Service": "/api/v1/namespaces/{ns}/services",
    "ConfigMap": "/api/v1/namespaces/{ns}/configmaps",
    "Event": "/api/v1/namespaces/{ns}/events",
    "Secret": "/api/v1/namespaces/{ns}/secrets",
    "NetworkPolicy": "/apis/networking.k8s.io/v1/namespaces/{ns}/networkpolicies",
    "PodDisruptionBudget": "/apis/policy/v1/namespaces/{ns}/poddisruptionbudgets",
    "TransformJob": "/apis/kubeinfer.io/v1alpha1/namespaces/{ns}/transformjobs",
    "CompilationJob": "/apis/kubeinfer.io/v1alpha1/namespaces/{ns}/compilationjobs",
    "RecommendationJob": "/apis/kubeinfer.io/v1alpha1/namespaces/{ns}/recommendationjobs",
    "EdgeFleet": "/apis/kubeinfer.io/v1alpha1/namespaces/{ns}/edgefleets",
    "Job": "/apis/batch/v1/namespaces/{ns}/jobs",
    "Pod": "/api/v1/namespaces/{ns}/pods",
}


class Kube:
    """What a test (or kubectl) does to the API: plain HTTP, JSON in and out."""

    def __init__(self, url: str) -> None:
        self.http = httpx.Client(base_url=url, timeout=10.0)

    def close(self) -> None:
        self.http.close()

    def _path(self, kind: str, ns: str, name: str | None = None, sub: str | None = None) -> str:
        path = RESOURCES[kind].format(ns=ns)
        return path + (f"/{name}" if name else "") + (f"/{sub}" if sub else "")

    def create_namespace(self, name: str) -> None:
        r = self.http.post("/api/v1/namespaces", json={
            "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
        assert r.status_code == 201, r.text

    def create(self, obj: dict[str, Any], ns: str) -> httpx.Response:
        return self.http.post(self._path(obj["kind"], ns), json=obj)

    def get(self, kind: str, ns: str, name: str) -> dict[str, Any] | None:
        r = self.http.get(self._path(kind, ns, name))
        if r.status_code == 404:
            return None
        r.raise_for_status()
        body: dict[str, Any] = r.json()
        return body

    def list(self, kind: str, ns: str, labels: str | None = None) -> list[dict[str, Any]]:
        params = {"labelSelector": labels} if labels else {}
        r = self.http.get(self._path(kind, ns), params=params)
        r.raise_for_status()
        items: list[dict[str, Any]] = r.json()["items"]
        return items

    def names(self, kind: str, ns: str) -> set[str]:
        return {o["metadata"]["name"] for o in self.list(kind, ns)}

    def patch(self, kind: str, ns: str, name: str, patch: dict[str, Any],
              sub: str | None = None) -> httpx.Response:
        return self.http.patch(self._path(kind, ns, name, sub), json=patch,
                               headers={"Content-Type": "application/merge-patch+json"})

    def delete(self, kind: str, ns: str, name: str) -> httpx.Response:
        return self.http.request("DELETE", self._path(kind, ns, name),
                                 json={"propagationPolicy": "Background"})

    def make_available(self, ns: str, name: str, replicas: int | None = None) -> None:
        """Play the Deployment controller: report ``replicas`` (default: spec) available."""
        dep = self.get("Deployment", ns, name)
        assert dep is not None, f"Deployment {ns}/{name} does not exist"
        n = dep["spec"].get("replicas", 1) if replicas is None else replicas
        r = self.patch("Deployment", ns, name, {"status": {
            "observedGeneration": dep["metadata"]["generation"], "replicas": n,
            "readyReplicas": n, "availableReplicas": n, "updatedReplicas": n}}, sub="status")
        assert r.status_code == 200, r.text


class OperatorThread:
    """The real operator (``main.operate``) in a background thread with its own loop."""

    def __init__(self, settings: Any, **operate_kwargs: Any) -> None:
        self.settings = settings
        #: More keyword arguments of ``operate`` (``fleet_url``: a fake fleet server).
        self.operate_kwargs = operate_kwargs
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="kopf-operator", daemon=True)

    def _main(self) -> None:
        from kubeinfer_operator.main import operate

        try:
            asyncio.run(operate(self.settings, stop_flag=self._stop, ready_flag=self._ready,
                                **self.operate_kwargs))
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    def start(self) -> OperatorThread:
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT_S) or self._error is not None:
            raise RuntimeError(f"the operator did not start: {self._error!r}")
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=20)
        if self._thread.is_alive():
            raise RuntimeError("the operator did not stop within 20 s")


@contextmanager
def operator_on_emulator(settings: Any, kube_dir: Path,
                         **operate_kwargs: Any) -> Iterator[tuple[Kube, EmulatorThread]]:
    """The real operator with ``settings`` against a fresh emulator, KUBECONFIG set.

    What every operator test module's fixture needs. On exit both stop, and the
    emulator must have seen no request it could not serve (its ``failures``).
    """
    emulator = EmulatorThread().start()
    kubeconfig = write_kubeconfig(kube_dir / "config", emulator.url)
    env = pytest.MonkeyPatch()
    env.setenv("KUBECONFIG", str(kubeconfig))
    operator = OperatorThread(settings, **operate_kwargs).start()
    kube = Kube(emulator.url)
    try:
        yield kube, emulator
    finally:
        operator.stop()
        kube.close()
        emulator.stop()
        env.undo()
    assert emulator.emulator is not None
    assert emulator.emulator.failures == []
