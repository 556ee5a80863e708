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
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from examples.build_models import build_sklearn

from bench.local_autoscale import StepLoad, autoscaled_endpoint, scale_events

AUTOSCALING = {
    "minReplicas": 1,
    "maxReplicas": 4,
    "targetTracking": [{"metric": "InvocationsPerReplica", "target": 300}],
    "scaleOutCooldown": 3,
    "scaleInCooldown": 6,
}


def read_state(home: Path) -> dict[str, object]:
    doc: dict[str, object] = json.loads((home / "local" / "auto" / "state.json").read_text())
    return doc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rps", type=float, default=20.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--idle", type=float, default=15.0, help="idle seconds after the step")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kubeinfer-autoscale-"))
    home = work / "home"
    spec = work / "auto.yaml"
    spec.write_text(autoscaled_endpoint("auto", build_sklearn(work / "iris.onnx"), AUTOSCALING))
    env = {**os.environ, "KUBEINFER_HOME": str(home), "KUBEINFER_AUTOSCALE_INTERVAL_S": "0.5",
           "KUBEINFER_AUTOSCALE_WINDOW_S": "3"}
    cli = [sys.executable, "-m", "kubeinfer_operator.cli"]
    subprocess.run([*cli, "up", "-d", "-f", str(spec), "--timeout", "60"], env=env, check=True,
                   capture_output=True)
    try:
        url = str(read_state(home)["url"])
        start = time.monotonic()
        phases = [(2.0, 0.0), (args.seconds, args.rps), (args.idle, 0.0)]
        print(f"{'t s':>6} {'load rps':>9} {'replicas':>9} {'ready':>6}")
        with StepLoad(url, "auto") as load:
            for length, rps in phases:
                load.rate = rps
                end = time.monotonic() + length
                while time.monotonic() < end:
                    variant = read_state(home)["variants"][0]  # type: ignore[index]
                    print(f"{time.monotonic() - start:>6.1f} {rps:>9.0f} "
                          f"{variant['replicas']:>9} {variant['ready']:>6}")
                    time.sleep(0.5)
        t0 = time.time() - (time.monotonic() - start)
        print("\nScaling events:")
        for at, message in scale_events(home, "auto"):
            print(f"  t={at - t0:5.1f}s  {message}")
    finally:
        subprocess.run([*cli, "down", "auto"], env=env, capture_output=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
