"""Serverless cold start in local mode: request arrival → first response, split in parts.

Runs a ``type: Serverless`` endpoint serving the bench MLP with ``kubeinfer up``
(real supervisor, gateway and model-server processes), waits until the variant
has scaled to zero, then times one request through the gateway. Repeated
``--trials`` times. Each trial is split with the processes' own metrics:

* **model load**: the new model server's ``kubeinfer_model_load_seconds``
  (onnxruntime session creation + warm-up);
* **first inference**: the gateway's upstream round trip of that request
  (``kubeinfer_gateway_upstream_latency_seconds``);
* **process start**: the rest: the activator's scale request, the supervisor
  spawning Python, importing the runtime, uvicorn binding its port, readiness
  detection (20 ms polls) and the gateway routing to it.

Model servers come from the supervisor's fork server (the runtime already
imported); ``--no-prefork`` measures plain process starts instead.

Usage: ``python -m bench.coldstart [--trials 5] [--no-prefork]``. Prints a table; not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from examples.build_models import build_mlp
from prometheus_client.parser import text_string_to_metric_families

SPEC = """\
apiVersion: kubeinfer.io/v1alpha1
kind: Endpoint
metadata:
  name: cold
spec:
  type: Serverless
  serverless:
    maxConcurrency: 4
    idleTimeout: 1
  variants:
    - name: mlp
      model:
        uri: file://{model}
"""


def metric_sum(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def state(home: Path) -> dict[str, object]:
    doc: dict[str, object] = json.loads((home / "local" / "cold" / "state.json").read_text())
    return doc


def servers(home: Path) -> list[dict[str, object]]:
    procs = state(home)["processes"]
    assert isinstance(procs, list)
    return [p for p in procs if p["name"] != "gateway"]


def wait(pred: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if pred():  # type: ignore[operator]
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {what}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--no-prefork", action="store_true",
                        help="start model servers as fresh processes (no fork server)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kubeinfer-coldstart-"))
    home = work / "home"
    model = build_mlp(work / "mlp.onnx")
    spec = work / "cold.yaml"
    spec.write_text(SPEC.format(model=model))
    env = {**os.environ, "KUBEINFER_HOME": str(home), "KUBEINFER_AUTOSCALE_INTERVAL_S": "0.2",
           "KUBEINFER_LOCAL_PREFORK": "0" if args.no_prefork else "1"}
    cli = [sys.executable, "-m", "kubeinfer_operator.cli"]
    subprocess.run([*cli, "up", "-d", "-f", str(spec), "--timeout", "60"], env=env, check=True,
                   capture_output=True)
    rows: list[tuple[float, float, float, float]] = []
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, 256], "datatype": "FP32",
                                   "data": np.random.default_rng(0).random(256).tolist()}]})
    try:
        url = str(state(home)["url"])
        if not args.no_prefork:
            log = home / "local" / "cold" / "logs" / "prefork.log"
            wait(lambda: "prefork: ready" in log.read_text(), 60, "the fork server")
        with httpx.Client(timeout=60) as client:
            for _ in range(args.trials):
                wait(lambda: not servers(home), 30, "scale to zero")
                before = client.get(url + "/metrics").text
                started = time.perf_counter()
                r = client.post(url + "/endpoints/cold/invocations", content=body,
                                headers={"Content-Type": "application/json"})
                total = time.perf_counter() - started
                r.raise_for_status()
                after = client.get(url + "/metrics").text
                upstream = (metric_sum(after, "kubeinfer_gateway_upstream_latency_seconds_sum")
                            - metric_sum(before, "kubeinfer_gateway_upstream_latency_seconds_sum"))
                [server] = servers(home)
                text = client.get(f"http://127.0.0.1:{server['port']}/metrics").text
                load = metric_sum(text, "kubeinfer_model_load_seconds_sum", phase="load")
                load += metric_sum(text, "kubeinfer_model_load_seconds_sum", phase="download")
                rows.append((total, total - load - upstream, load, upstream))
    finally:
        subprocess.run([*cli, "down", "cold"], env=env, capture_output=True)
    how = "fresh processes" if args.no_prefork else "fork server"
    print(f"Cold start of the bench MLP ({model.stat().st_size // 1024} KiB ONNX), "
          f"{len(rows)} trials, local mode ({how}), {os.cpu_count()} CPUs")
    print(f"{'trial':>5} {'total ms':>9} {'process start ms':>17} {'model load ms':>14} "
          f"{'first inference ms':>19}")
    for i, (total, proc, load, infer) in enumerate(rows, 1):
        print(f"{i:>5} {total * 1e3:>9.0f} {proc * 1e3:>17.0f} {load * 1e3:>14.0f} "
              f"{infer * 1e3:>19.1f}")
    med = [statistics.median(col) for col in zip(*rows, strict=True)]
    print(f"{'p50':>5} {med[0] * 1e3:>9.0f} {med[1] * 1e3:>17.0f} {med[2] * 1e3:>14.0f} "
          f"{med[3] * 1e3:>19.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
