"""Inference Recommender repeatability: the same 5-candidate search, three times.

    .venv/bin/python bench/recommend.py [--runs 3] [--candidates FILE] [--markdown]

Runs ``kubeinfer recommend`` on the bench MLP (examples/recommend-endpoint.yaml,
examples/recommend-candidates.yaml: five candidates, successive halving) ``--runs``
times, one after another on a quiet machine, and prints each run's winner and its
max throughput, then whether every run picked the same winner and the spread of
the winner's max throughput ((max - min) / mean; the target is < 10%). Never run
as a test: speed is measured, not asserted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from examples.build_models import build_mlp

from bench.common import REPO


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--candidates", type=Path,
                   default=REPO / "examples" / "recommend-candidates.yaml")
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args()
    model = REPO / "examples" / "models" / "mlp.onnx"
    if not model.exists():
        build_mlp(model)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            t0 = time.monotonic()
            proc = subprocess.run(
                [sys.executable, "-m", "kubeinfer_operator.cli", "recommend", "-f",
                 str(REPO / "examples" / "recommend-endpoint.yaml"), "--candidates",
                 str(args.candidates), "--json", "--out", str(Path(tmp) / f"ep{i}.yaml")],
                capture_output=True, text=True, check=False)
            if proc.returncode not in (0, 3):
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            report = json.loads(proc.stdout)
            best = report["recommended"]
            mx = next((r["maxThroughput"] for r in report["results"] if r["name"] == best), 0)
            rows.append((i + 1, best, mx, time.monotonic() - t0))
    winners = {r[1] for r in rows}
    tputs = [r[2] for r in rows]
    spread = (max(tputs) - min(tputs)) / statistics.mean(tputs) if any(tputs) else float("nan")
    if args.markdown:
        print("| run | winner | max throughput (req/s) | seconds |\n|---|---|---|---|")
        for r in rows:
            print(f"| {r[0]} | {r[1]} | {r[2]:.0f} | {r[3]:.0f} |")
    else:
        t = Table(title="kubeinfer recommend, repeated")
        for col in ("run", "winner", "max req/s", "seconds"):
            t.add_column(col)
        for r in rows:
            t.add_row(str(r[0]), str(r[1]), f"{r[2]:.0f}", f"{r[3]:.0f}")
        Console().print(t)
    print(f"same winner: {len(winners) == 1} ({', '.join(map(str, winners))}); "
          f"winner's max throughput spread: {spread:.1%} (target < 10%)")
    return 0 if len(winners) == 1 and spread < 0.10 else 2


if __name__ == "__main__":
    sys.exit(main())
