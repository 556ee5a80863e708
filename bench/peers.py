"""Our model server against KServe's and MLServer's, side by side in one interleaved run.

The comparison docs/benchmarks.md makes with other servers, reproducible with one
command. Each peer is installed on first use into its own throwaway virtualenv
(``.venv-peers/<peer>``, from ``requirements/<peer>-bench.txt``, with uv): they pin
their own FastAPI, uvicorn and pydantic, and the same onnxruntime and numpy as ours.
Each serves the same ONNX model with onnxruntime on one thread, as its docs show a
custom model (``bench/baselines/kserve_server.py``, ``mlserver_runtime.py``), with
its defaults otherwise; ours is ``python -m kubeinfer_runtime serve --role
model-server`` with its defaults.

Per model (the small scikit-learn classifier and the MLP of bench/serving.py) and
server, all through Open Inference Protocol V2 (``POST /v2/models/m/infer``, JSON
tensors: the protocol all three speak):

* rps, p50 and p99 at c = 1, 8, 64 (wrk, one thread, ``--duration`` s each; servers
  take turns within each round and each cell is the median of ``--rounds``),
* cold start: process start to the first 200 (polled every 2 ms, as
  bench/coldstart.py does; ``--cold-trials`` interleaved trials, median),
* idle RSS: the server's processes together, after warm-up, before load.

    .venv/bin/python bench/peers.py [--rounds 3] [--duration 3] [--concurrency 1,8,64]
                                    [--models sklearn,mlp] [--peers kserve,mlserver]
                                    [--cold-trials 5] [--markdown]

Prints tables; not a test. wrk runs on the same machine: on a 2-core machine it takes
CPU from the servers, alike for all.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from examples.build_models import build_mlp, build_sklearn

from bench.coldstart import post, time_start
from bench.common import REPO, LoadResult, free_port, wrk

PEERS_DIR = REPO / ".venv-peers"
OURS = "kubeinfer model server"
KSERVE = "KServe 0.21 ModelServer"
MLSERVER = "MLServer 1.7.1"


def peer_python(peer: str) -> Path:
    """The python of ``.venv-peers/<peer>``, created and installed on first use."""
    venv = PEERS_DIR / peer
    python = venv / "bin" / "python"
    marker = venv / ".installed"
    requirements = REPO / "requirements" / f"{peer}-bench.txt"
    # Compiled to bytecode as ours is (scripts/setup): where PYTHONDONTWRITEBYTECODE is
    # set, a peer without .pyc files would compile its imports at every cold start.
    wanted = requirements.read_text() + "# --compile-bytecode\n"
    if not marker.exists() or marker.read_text() != wanted:
        print(f"Installing {peer} into {venv} (once) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run([str(REPO / ".venv" / "bin" / "uv"), "pip", "install", "-q",
                        "--compile-bytecode", "--python", str(python), "-r",
                        str(requirements)], check=True)
        marker.write_text(wanted)
    return python


@dataclass
class Launch:
    """How to start one server on ``port``: command, environment, where it logs."""

    cmd: list[str]
    env: dict[str, str]


def ours(model: Path, port: int, _: Path) -> Launch:
    return Launch([sys.executable, "-m", "kubeinfer_runtime", "serve", "--role",
                   "model-server"],
                  {"KUBEINFER_HOST": "127.0.0.1", "KUBEINFER_PORT": str(port),
                   "KUBEINFER_MODEL_URI": f"file://{model}", "KUBEINFER_MODEL_NAME": "m",
                   "KUBEINFER_LOG_LEVEL": "warning"})


def kserve(model: Path, port: int, _: Path) -> Launch:
    return Launch([str(peer_python("kserve")), str(REPO / "bench/baselines/kserve_server.py"),
                   str(port), str(free_port())], {"BENCH_MODEL": str(model)})


def mlserver(model: Path, port: int, work: Path) -> Launch:
    folder = work / f"mlserver-{port}"
    (folder / "m").mkdir(parents=True)
    (folder / "settings.json").write_text(json.dumps({
        "host": "127.0.0.1", "http_port": port, "grpc_port": free_port(),
        "metrics_port": free_port()}))
    (folder / "m" / "model-settings.json").write_text(json.dumps({
        "name": "m", "implementation": "bench.baselines.mlserver_runtime.OnnxRuntime",
        "parameters": {"uri": str(model)}}))
    mlserver_bin = peer_python("mlserver").parent / "mlserver"
    return Launch([str(mlserver_bin), "start", str(folder)],
                  {"PYTHONPATH": str(REPO)})


LAUNCHERS: dict[str, Callable[[Path, int, Path], Launch]] = {
    OURS: ours, KSERVE: kserve, MLSERVER: mlserver}


@dataclass
class Running:
    proc: subprocess.Popen[bytes]
    url: str

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def start(label: str, model: Path, work: Path, body: bytes) -> Running:
    """Start ``label``'s server and wait until it answers a V2 inference with 200."""
    port = free_port()
    launch = LAUNCHERS[label](model, port, work)
    log = open(work / f"{label.split()[0].lower()}-{port}.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(launch.cmd, env={**os.environ, **launch.env}, stdout=log,
                            stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{label} exited: see {log.name} in {work}")
        try:
            r = httpx.post(url + "/v2/models/m/infer", content=body,
                           headers={"Content-Type": "application/json"}, timeout=5)
            if r.status_code == 200:
                assert r.json()["outputs"], r.text
                return Running(proc, url)
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{label} did not answer in 120 s: see {work}")


def rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and all its descendants, MB."""
    total = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += next(int(line.split()[1]) for line in status.splitlines()
                          if line.startswith("VmRSS:"))
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, StopIteration):
            continue
    return total / 1024


def v2_body(x: np.ndarray, input_name: str) -> bytes:
    return orjson.dumps({"inputs": [{"name": input_name, "shape": list(x.shape),
                                     "datatype": "FP32", "data": x.reshape(-1).tolist()}]})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=3.0)
    ap.add_argument("--concurrency", default="1,8,64")
    ap.add_argument("--models", default="sklearn,mlp")
    ap.add_argument("--peers", default="kserve,mlserver")
    ap.add_argument("--cold-trials", type=int, default=5)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    for package in ("runtime", "operator"):  # as an installed package is (see coldstart)
        compileall.compile_dir(REPO / package, quiet=1)
    labels = [OURS] + [{"kserve": KSERVE, "mlserver": MLSERVER}[p]
                       for p in args.peers.split(",") if p]
    for peer in args.peers.split(","):  # install before measuring anything
        if peer:
            peer_python(peer)
    levels = [int(c) for c in args.concurrency.split(",")]
    rows: list[tuple[str, str, str, str]] = []
    cells: list[tuple[str, str, int, LoadResult]] = []
    with tempfile.TemporaryDirectory(prefix="kubeinfer-peers-") as tmp:
        work = Path(tmp)
        models = {
            "sklearn": (build_sklearn(work / "sklearn.onnx"),
                        np.full((1, 4), 5.0, np.float32), "X"),
            "mlp": (build_mlp(work / "mlp.onnx"),
                    np.random.default_rng(0).standard_normal((1, 256)).astype(np.float32),
                    "input"),
        }
        for model_name in args.models.split(","):
            path, x, input_name = models[model_name]
            body = v2_body(x, input_name)
            # Cold start and idle memory: fresh processes, in turns.
            colds: dict[str, list[float]] = {label: [] for label in labels}
            idle: dict[str, float] = {}
            for trial in range(args.cold_trials):
                for label in labels if trial % 2 == 0 else reversed(labels):
                    port = free_port()
                    launch = LAUNCHERS[label](path, port, work)
                    s = time_start(launch.cmd, launch.env, port,
                                   post("/v2/models/m/infer", body), work / "cold.log",
                                   ping=False, timeout=120)
                    colds[label].append(s.first_answer)
            servers = {label: start(label, path, work, body) for label in labels}
            try:
                time.sleep(1.0)
                for label, server in servers.items():
                    idle[label] = rss_mb(server.proc.pid)
                for server in servers.values():  # warm-up
                    wrk(server.url + "/v2/models/m/infer", body, "application/json", 8, 1.0)
                for c in levels:
                    runs: dict[str, list[LoadResult]] = {label: [] for label in labels}
                    for _ in range(args.rounds):
                        for label, server in servers.items():
                            runs[label].append(wrk(server.url + "/v2/models/m/infer", body,
                                                   "application/json", c, args.duration))
                    for label, results in runs.items():
                        med = sorted(results, key=lambda r: r.rps)[len(results) // 2]
                        cells.append((model_name, label, c, med))
                        print(f"{model_name:8} {label:26} c={c:<3} {med.rps:9,.0f} rps "
                              f"p50 {med.p50_ms:7.3f} ms p99 {med.p99_ms:8.3f} ms "
                              f"errors {sum(r.errors for r in results)}", flush=True)
            finally:
                for server in servers.values():
                    server.stop()
            for label in labels:
                rows.append((model_name, label, f"{statistics.median(colds[label]):.2f} s",
                             f"{idle[label]:.0f} MB"))

    header = ["model", "server", *(f"c={c} rps / p50 / p99 ms" for c in levels),
              "cold start", "idle RSS"]
    print("\n" + " | ".join(header))
    table: list[list[str]] = []
    for model_name, label, cold, rss in rows:
        line = [model_name, label]
        for c in levels:
            r = next(r for m, lb, cc, r in cells if m == model_name and lb == label and cc == c)
            line.append(f"{r.rps:,.0f} / {r.p50_ms:.2f} / {r.p99_ms:.1f}")
        table.append([*line, cold, rss])
        print(" | ".join(table[-1]))
    if args.markdown:
        print("\n| " + " | ".join(header) + " |")
        print("|---|---|" + "---:|" * (len(header) - 2))
        for line in table:
            print("| " + " | ".join(line) + " |")


if __name__ == "__main__":
    main()
