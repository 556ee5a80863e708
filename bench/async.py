"""Async inference benchmark: sustained throughput and end-to-end latency, 1/2/4 workers.

Everything real: redis-server, SeaweedFS S3 (inputs and outputs are objects),
the gateway, N async workers (``--role async-worker``), a webhook receiver.
For each worker count it submits ``--requests`` InvokeEndpointAsync calls as
fast as one client goes and measures

  * throughput: requests / (last notification - first submit), i.e. the
    sustained completion rate while a backlog exists;
  * end-to-end latency: submit -> success notification received (queueing
    included, so it grows with the backlog; p50 and p99).

The same model served real-time (gateway -> model server, wrk) is the
comparison: what synchronous serving gives for the same work.

    .venv/bin/python bench/async.py [--requests 1000] [--workers 1,2,4]
        [--concurrency 4] [--markdown]

Never run as a test: speed is measured, not asserted.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from examples.build_models import build_sklearn
from tests.support.async_stack import AsyncStack, worker_env
from tests.support.redis_server import start_redis
from tests.support.s3 import start_s3
from tests.support.webhook import WebhookReceiver

from bench.common import free_port, start, wrk
from kubeinfer_runtime.contract import AsyncRoute, EndpointRoute, RouteTable, VariantRoute

BUCKET = "bench-async"
ROWS = {"instances": [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]}


def _submit(url: str, n: int, input_uri: str, prefix: str, sent: dict[str, float]) -> None:
    with httpx.Client(base_url=url, trust_env=False) as client:
        for i in range(n):
            rid = f"{prefix}-{i:05d}"
            sent[rid] = time.monotonic()
            r = client.post("/endpoints/iris/async-invocations", headers={
                "X-Amzn-SageMaker-InputLocation": input_uri,
                "X-Amzn-SageMaker-Inference-Id": rid})
            r.raise_for_status()


def run_async(workdir: Path, redis_url: str, s3: object, model: Path, workers: int,
              requests: int, concurrency: int) -> dict[str, float]:
    hooks = WebhookReceiver()
    queue = f"bench-{workers}"
    route = AsyncRoute(queue=queue, output_path=f"s3://{BUCKET}/out-{workers}",
                       failure_path=f"s3://{BUCKET}/failed-{workers}")
    env = worker_env(model_path=model, redis_url=redis_url, route=route,
                     s3_env=s3.env(), endpoint="iris",  # type: ignore[attr-defined]
                     success_url=hooks.url + "/ok", error_url=hooks.url + "/error",
                     max_concurrency=str(concurrency), log_level="warning")
    stack = AsyncStack("iris", route, workdir / queue, env)
    try:
        for _ in range(workers):
            stack.start_worker(wait=False)
        gateway = stack.start_gateway(redis_url)
        stack.wait_workers()
        sent: dict[str, float] = {}
        submitter = threading.Thread(target=_submit, args=(
            gateway.url, requests, f"s3://{BUCKET}/in.json", queue, sent))
        submitter.start()
        deadline = time.monotonic() + 600
        while len(hooks.snapshot()) < requests and time.monotonic() < deadline:
            time.sleep(0.05)
        submitter.join()
        notes = hooks.snapshot()
    finally:
        stack.stop()
        hooks.close()
    done = {n["inferenceId"]: n["_at"] for n in notes if n["invocationStatus"] == "Completed"}
    latencies = sorted((done[i] - sent[i]) * 1000 for i in done if i in sent)
    span = max(done.values()) - min(sent.values())
    return {"rps": len(done) / span, "p50": statistics.median(latencies),
            "p99": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
            "done": len(done)}


def run_realtime(workdir: Path, model: Path, duration: float,
                 connections: int) -> dict[str, float]:
    port = free_port()
    server = start("model-server", [sys.executable, "-m", "kubeinfer_runtime", "serve",
                                    "--role", "model-server"],
                   {"KUBEINFER_MODEL_URI": f"file://{model}", "KUBEINFER_HOST": "127.0.0.1",
                    "KUBEINFER_PORT": str(port), "KUBEINFER_LOG_LEVEL": "warning"},
                   port, "/ping", workdir)
    routes = workdir / "routes.json"
    RouteTable(revision=1, endpoints={"iris": EndpointRoute(name="iris", variants=[
        VariantRoute(name="main", weight=1, upstreams=[server.url])])}).write_atomic(routes)
    gport = free_port()
    gateway = start("gateway", [sys.executable, "-m", "kubeinfer_runtime", "serve", "--role",
                                "gateway"],
                    {"KUBEINFER_ROUTE_TABLE_PATH": str(routes), "KUBEINFER_HOST": "127.0.0.1",
                     "KUBEINFER_PORT": str(gport), "KUBEINFER_LOG_LEVEL": "warning"},
                    gport, "/ping", workdir)
    try:
        time.sleep(1.5)  # the gateway's first health round
        r = wrk(gateway.url + "/endpoints/iris/invocations", json.dumps(ROWS).encode(),
                "application/json", connections, duration)
    finally:
        gateway.stop()
        server.stop()
    return {"rps": r.rps, "p50": r.p50_ms, "p99": r.p99_ms}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--concurrency", type=int, default=4,
                    help="maxConcurrentInvocationsPerReplica of each worker")
    ap.add_argument("--duration", type=float, default=5.0, help="real-time wrk seconds")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    counts = [int(x) for x in args.workers.split(",")]
    rows: list[tuple[str, dict[str, float]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = work / "iris.onnx"
        build_sklearn(model)
        redis = start_redis(work / "redis")
        s3 = start_s3(work / "s3")
        try:
            client = s3.minio()
            client.make_bucket(BUCKET)
            data = json.dumps(ROWS).encode()
            client.put_object(BUCKET, "in.json", io.BytesIO(data), len(data))
            for n in counts:
                rows.append((f"async, {n} worker(s) x {args.concurrency}",
                             run_async(work, redis.url, s3, model, n, args.requests,
                                       args.concurrency)))
            for c in (1, 8):
                rows.append((f"real-time via gateway, wrk c={c}",
                             run_realtime(work, model, args.duration, c)))
        finally:
            s3.stop()
            redis.stop()
    if args.markdown:
        print("| setup | req/s | p50 ms | p99 ms |\n|---|---|---|---|")
        for name, r in rows:
            print(f"| {name} | {r['rps']:.0f} | {r['p50']:.1f} | {r['p99']:.1f} |")
        return 0
    table = Table(title=f"Async inference, {args.requests} requests per run (iris, S3 I/O)")
    for col in ("setup", "req/s", "p50 ms", "p99 ms"):
        table.add_column(col)
    for name, r in rows:
        table.add_row(name, f"{r['rps']:.0f}", f"{r['p50']:.1f}", f"{r['p99']:.1f}")
    Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
