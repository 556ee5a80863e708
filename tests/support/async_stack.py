"""Start an async endpoint as real processes: a gateway and N async workers.

Used by the async integration tests and ``bench/async.py``: the route table is
written the way the operator renders it, the workers get the env the plan
renders (``AsyncWorkerSettings``), Redis and S3 are real servers.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from kubeinfer_runtime.contract import AsyncRoute, EndpointRoute, RouteTable, VariantRoute
from tests.support.orphans import die_with_parent
from tests.support.ports import http_ok, reserve_port, wait_until
from tests.support.procs import RuntimeProcess, start_runtime


def write_routes(path: Path, name: str, route: AsyncRoute) -> None:
    table = RouteTable(revision=1, endpoints={name: EndpointRoute(
        name=name, type="Async", variants=[VariantRoute(name="main", weight=1.0)],
        async_config=route)})
    table.write_atomic(path)


@dataclass
class AsyncStack:
    name: str
    route: AsyncRoute
    workdir: Path
    worker_env: dict[str, str]
    gateway: RuntimeProcess | None = None
    workers: list[RuntimeProcess] = field(default_factory=list)
    #: Ports held for workers started without waiting (``ports.reserve_port``), until they
    #: answer (``wait_workers``) or the stack stops.
    held: list[socket.socket] = field(default_factory=list)

    def start_gateway(self, redis_url: str) -> RuntimeProcess:
        routes = self.workdir / "routes.json"
        write_routes(routes, self.name, self.route)
        self.gateway = start_runtime("gateway", {
            "KUBEINFER_ROUTE_TABLE_PATH": str(routes), "KUBEINFER_REDIS_URL": redis_url,
            "KUBEINFER_ROUTE_RELOAD_INTERVAL_S": "0.2"}, self.workdir / "logs")
        return self.gateway

    def start_worker(self, *, wait: bool = True) -> RuntimeProcess:
        """One more worker; ``wait`` for its /ping (model loaded, Redis reachable)."""
        reservation = reserve_port()
        port = int(reservation.getsockname()[1])
        log_dir = self.workdir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"worker-{port}.log"
        env = {**os.environ, **self.worker_env, "KUBEINFER_HOST": "127.0.0.1",
               "KUBEINFER_PORT": str(port)}
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "kubeinfer_runtime", "serve", "--role", "async-worker"],
                env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
        worker = RuntimeProcess(proc, port, log_path)
        self.workers.append(worker)
        if not wait:
            self.held.append(reservation)
            return worker

        def up() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"async worker exited {proc.returncode}:\n{worker.log()}")
            return http_ok(worker.url + "/ping")

        try:
            wait_until(up, 30.0, f"async worker on port {port}")
        finally:
            reservation.close()
        return worker

    def wait_workers(self, timeout: float = 60.0) -> None:
        """Wait until every worker answers /ping (started with ``wait=False``)."""
        for worker in self.workers:
            def up(w: RuntimeProcess = worker) -> bool:
                if w.proc.poll() is not None:
                    raise RuntimeError(f"async worker exited {w.proc.returncode}:\n{w.log()}")
                return http_ok(w.url + "/ping")

            wait_until(up, timeout, f"async worker on port {worker.port}")
        self._release()

    def _release(self) -> None:
        for reservation in self.held:
            reservation.close()
        self.held = []

    def submit(self, inputs: list[str], ids: list[str]) -> None:
        """Queue one request per id (input ``inputs[i % len]``) from one keep-alive client;
        every one must be accepted (202)."""
        import httpx

        assert self.gateway is not None
        with httpx.Client(base_url=self.gateway.url, trust_env=False) as client:
            for i, rid in enumerate(ids):
                r = client.post(f"/endpoints/{self.name}/async-invocations", headers={
                    "X-Amzn-SageMaker-InputLocation": inputs[i % len(inputs)],
                    "X-Amzn-SageMaker-Inference-Id": rid})
                assert r.status_code == 202, r.text

    def kill_worker(self, worker: RuntimeProcess) -> None:
        worker.proc.send_signal(signal.SIGKILL)
        worker.proc.wait()
        self.workers.remove(worker)

    def stop(self) -> None:
        self._release()
        for w in self.workers:
            w.stop()
        self.workers = []
        if self.gateway is not None:
            self.gateway.stop()
            self.gateway = None


def worker_env(*, model_path: Path, redis_url: str, route: AsyncRoute, s3_env: dict[str, str],
               endpoint: str, success_url: str | None = None, error_url: str | None = None,
               **extra: str) -> dict[str, str]:
    env = {
        "KUBEINFER_MODEL_URI": f"file://{model_path}",
        "KUBEINFER_MODEL_NAME": "main",
        "KUBEINFER_ENDPOINT_NAME": endpoint,
        "KUBEINFER_VARIANT_NAME": "main",
        "KUBEINFER_REDIS_URL": redis_url,
        "KUBEINFER_QUEUE": route.queue,
        "KUBEINFER_OUTPUT_PATH": route.output_path,
        "KUBEINFER_FAILURE_PATH": route.failure_path,
        "KUBEINFER_INPUT_PATHS": ",".join(route.input_paths),
        **s3_env,
    }
    if success_url:
        env["KUBEINFER_SUCCESS_URL"] = success_url
    if error_url:
        env["KUBEINFER_ERROR_URL"] = error_url
    env.update({f"KUBEINFER_{k.upper()}": v for k, v in extra.items()})
    return env
