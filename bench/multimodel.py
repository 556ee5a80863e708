"""Multi-model endpoint benchmark: hit-path overhead, miss latency, hit rate vs cache size.

    .venv/bin/python bench/multimodel.py [--duration 5] [--misses 60] [--markdown]

1. Hit path: the same numbered model served by a single-model server and by a
   multi-model server (file:// prefix, model already loaded), wrk at c=1 and
   c=64. Target: <= 0.2 ms extra p50 for the multi-model server.
2. Miss path: a multi-model server on a real S3 server (SeaweedFS, started
   here) with a cache holding one model, so every request to a new model
   misses; client latency p50/p99, and the server's own split into download
   and load (+ warm-up) from ``kubeinfer_multimodel_load_seconds``.
3. Hit rate vs cache size for 1,000 models under Zipf traffic: the real
   ``ModelCache`` in-process with an instant loader (the policy, not I/O).

Speed is measured here and recorded in docs/benchmarks.md, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from examples.build_multimodel_models import build, numbered_model_bytes

from bench.common import Server, free_port, start, wrk
from kubeinfer_runtime.models.cache import ModelCache

BODY = b"[[1.0, 2.0, 3.0, 4.0]]"
TARGET = "tenant-7/model.onnx"


def _server(name: str, env: dict[str, str], log_dir: Path) -> Server:
    port = free_port()
    env = {"KUBEINFER_HOST": "127.0.0.1", "KUBEINFER_PORT": str(port),
           "KUBEINFER_LOG_LEVEL": "warning", "KUBEINFER_ENDPOINT_NAME": "bench",
           "KUBEINFER_VARIANT_NAME": "all", **env}
    cmd = [sys.executable, "-m", "kubeinfer_runtime", "serve", "--role", "model-server"]
    return start(name, cmd, env, port, "/ping", log_dir)


def hit_path(models: Path, log_dir: Path, duration: float) -> list[list[str]]:
    single = _server("single", {"KUBEINFER_MODEL_URI": f"file://{models / TARGET}"}, log_dir)
    multi = _server("multi", {"KUBEINFER_MULTI_MODEL_PREFIX": f"file://{models}/",
                              "KUBEINFER_MODEL_CACHE_DIR": str(log_dir / "cache")}, log_dir)
    header = {"X-Amzn-SageMaker-Target-Model": TARGET}
    rows = []
    try:
        assert httpx.post(multi.url + "/invocations", content=BODY, headers={
            **header, "content-type": "application/json"}).status_code == 200  # load it
        for c in (1, 64):
            a = wrk(single.url + "/invocations", BODY, "application/json", c, duration)
            b = wrk(multi.url + "/invocations", BODY, "application/json", c, duration, header)
            rows.append([f"c={c}", f"{a.rps:,.0f} / {a.p50_ms:.3f}", f"{b.rps:,.0f} / "
                         f"{b.p50_ms:.3f}", f"{(b.p50_ms - a.p50_ms):+.3f}",
                         str(a.errors + b.errors)])
    finally:
        single.stop()
        multi.stop()
    return rows


def _histogram(text: str, phase: str) -> tuple[float, float]:
    def value(kind: str) -> float:
        m = re.search(rf'^kubeinfer_multimodel_load_seconds_{kind}\{{[^}}]*phase="{phase}"'
                      rf'[^}}]*\}} (\S+)$', text, re.M)
        return float(m.group(1)) if m else 0.0
    return value("sum"), value("count")


def miss_path(log_dir: Path, count: int) -> list[list[str]]:
    from tests.support.s3 import start_s3

    s3 = start_s3(log_dir / "s3")
    client = s3.minio()
    client.make_bucket("bench")
    for i in range(count):
        data = numbered_model_bytes(i, 4096)
        client.put_object("bench", f"models/tenant-{i}/model.onnx", io.BytesIO(data), len(data))
    server = _server("multi-s3", {
        **s3.env(), "KUBEINFER_MULTI_MODEL_PREFIX": "s3://bench/models/",
        "KUBEINFER_CACHE_BYTES": "5000", "KUBEINFER_MODEL_CACHE_DIR": str(log_dir / "c2")},
        log_dir)
    lat = []
    try:
        with httpx.Client() as http:
            for i in range(count):
                t0 = time.perf_counter()
                r = http.post(server.url + "/invocations", content=BODY, headers={
                    "X-Amzn-SageMaker-Target-Model": f"tenant-{i}/model.onnx",
                    "content-type": "application/json"})
                lat.append(time.perf_counter() - t0)
                assert r.status_code == 200 and r.json()["predictions"] == [[10.0 + i]], r.text
        text = httpx.get(server.url + "/metrics").text
    finally:
        server.stop()
        s3.stop()
    lat.sort()
    d_sum, d_n = _histogram(text, "download")
    l_sum, l_n = _histogram(text, "load")
    return [[str(count), f"{statistics.median(lat) * 1e3:.1f}",
             f"{lat[int(len(lat) * 0.99)] * 1e3:.1f}",
             f"{d_sum / max(d_n, 1) * 1e3:.1f}", f"{l_sum / max(l_n, 1) * 1e3:.1f}"]]


class _InstantLoader:
    async def size(self, name: str) -> int:
        return 1

    async def load(self, name: str) -> str:
        return name

    def unload(self, name: str, value: str) -> None:
        pass


def hit_rates(models: int = 1000, requests: int = 50_000) -> list[list[str]]:
    rng = np.random.default_rng(1)
    rows = []
    for a in (0.8, 1.0, 1.2):
        p = np.arange(1, models + 1, dtype=np.float64) ** -a
        stream = rng.choice(models, size=requests, p=p / p.sum()).tolist()
        cells = [f"zipf s={a}"]
        for size in (10, 50, 100, 200, 500):
            async def replay(size: int = size, stream: list[int] = stream) -> float:
                cache: ModelCache[str] = ModelCache(_InstantLoader(), budget_bytes=size)
                for i in stream:
                    (await cache.acquire(str(i))).release()
                return cache.stats.hits / requests
            cells.append(f"{asyncio.run(replay()):.1%}")
        rows.append(cells)
    return rows


def _table(title: str, columns: list[str], rows: list[list[str]], markdown: bool) -> None:
    if markdown:
        print(f"\n**{title}**\n")
        print("| " + " | ".join(columns) + " |")
        print("|" + "---|" * len(columns))
        for r in rows:
            print("| " + " | ".join(r) + " |")
        return
    t = Table(title=title)
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*r)
    Console().print(t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--misses", type=int, default=60)
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        models = work / "models"
        build(models, 10, 4096)
        _table("Hit path: rps / p50 ms (wrk, 1 thread)",
               ["load", "single-model server", "multi-model server (hit)", "extra p50 ms",
                "errors"], hit_path(models, work, args.duration), args.markdown)
        _table("Miss path: every request loads a new model from S3 (SeaweedFS)",
               ["models", "p50 ms", "p99 ms", "mean download ms", "mean load+warm-up ms"],
               miss_path(work, args.misses), args.markdown)
        _table("Hit rate vs cache size (1,000 models, 50,000 Zipf requests)",
               ["traffic", "10", "50", "100", "200", "500"], hit_rates(), args.markdown)


if __name__ == "__main__":
    main()
