"""Auto scaling in local mode: the replica timeline of one variant under a step load.

Runs an endpoint with a target-tracking policy (InvocationsPerReplica, target
300 per minute, 1 to 4 replicas, short cooldowns) with ``kubeinfer up``, then
drives a step load through the gateway: idle, ``--rps`` requests per second for
``--seconds``, idle again. Prints, every half second, the offered load and the
variant's replicas (wanted / ready), then the scaling events with their
reasons. Usage: ``python -m bench.autoscale [--rps 20 --seconds 20]``. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from examples.build_models import build_sklearn

SPEC = """\
apiVersion: kubeinfer.io/v1alpha1
kind: Endpoint
metadata:
  name: auto
spec:
  variants:
    - name: main
      model:
        uri: file://{model}
      autoscaling:
        minReplicas: 1
        maxReplicas: 4
        targetTracking:
          - metric: InvocationsPerReplica
            target: 300
        scaleOutCooldown: 3
        scaleInCooldown: 6
"""
BODY = json.dumps({"instances": [[5.1, 3.5, 1.4, 0.2]]})


def read_state(home: Path) -> dict[str, object]:
    doc: dict[str, object] = json.loads((home / "local" / "auto" / "state.json").read_text())
    return doc


def drive(url: str, rate: list[float], stop: threading.Event) -> None:
    with httpx.Client(timeout=10) as client:
        while not stop.is_set():
            if rate[0] <= 0:
                time.sleep(0.05)
                continue
            started = time.monotonic()
            client.post(f"{url}/endpoints/auto/invocations", content=BODY,
                        headers={"Content-Type": "application/json"})
            time.sleep(max(0.0, 1 / rate[0] - (time.monotonic() - started)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rps", type=float, default=20.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--idle", type=float, default=15.0, help="idle seconds after the step")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kubeinfer-autoscale-"))
    home = work / "home"
    spec = work / "auto.yaml"
    spec.write_text(SPEC.format(model=build_sklearn(work / "iris.onnx")))
    env = {**os.environ, "KUBEINFER_HOME": str(home), "KUBEINFER_AUTOSCALE_INTERVAL_S": "0.5",
           "KUBEINFER_AUTOSCALE_WINDOW_S": "3"}
    cli = [sys.executable, "-m", "kubeinfer_operator.cli"]
    subprocess.run([*cli, "up", "-d", "-f", str(spec), "--timeout", "60"], env=env, check=True,
                   capture_output=True)
    rate = [0.0]
    stop = threading.Event()
    try:
        url = str(read_state(home)["url"])
        worker = threading.Thread(target=drive, args=(url, rate, stop))
        worker.start()
        start = time.monotonic()
        phases = [(2.0, 0.0), (args.seconds, args.rps), (args.idle, 0.0)]
        print(f"{'t s':>6} {'load rps':>9} {'replicas':>9} {'ready':>6}")
        for length, rps in phases:
            rate[0] = rps
            end = time.monotonic() + length
            while time.monotonic() < end:
                variant = read_state(home)["variants"][0]  # type: ignore[index]
                print(f"{time.monotonic() - start:>6.1f} {rps:>9.0f} "
                      f"{variant['replicas']:>9} {variant['ready']:>6}")
                time.sleep(0.5)
        stop.set()
        worker.join()
        t0 = time.time() - (time.monotonic() - start)
        print("\nScaling events:")
        for line in (home / "local" / "auto" / "events.jsonl").read_text().splitlines():
            doc = json.loads(line)
            if "Scaled" in doc["message"]:
                print(f"  t={doc['time'] - t0:5.1f}s  {doc['message']}")
    finally:
        stop.set()
        subprocess.run([*cli, "down", "auto"], env=env, capture_output=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
