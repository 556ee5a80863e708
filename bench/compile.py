"""Compile (SageMaker Neo) benchmark: every candidate vs onnxruntime fp32, then served rps.

For each model (the bench MLP 256->512->512->10, a small convnet on 3x32x32
images) this runs the real compiler (``kubeinfer-runtime compile``, native
target, batch sizes 1 and 64, a MetaSchedule budget per batch size) and prints
what it measured, side by side: onnxruntime fp32, every candidate, the chosen
artifact, and the ratio. The MLP is compiled again with quantization allowed,
at the default top-1 gate (99%) and at a looser one (``--min-top1``), reusing
the tuning cache. Then each chosen artifact is served by a real model server
(model format ``compiled``) next to the ONNX model itself (format ``onnx``) and
both are driven with wrk at c=64 (batch-1 JSON requests), in interleaved
rounds; the median round is reported.

    python bench/compile.py [--tune 60] [--measure 1] [--markdown]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from examples.build_models import build_convnet, build_mlp

from bench.common import REPO, LoadResult, Server, free_port, start, wrk
from kubeinfer_runtime.contract.compile import CandidateName, CompileReport


@dataclass
class Run:
    label: str
    model: str
    path: Path
    report: CompileReport
    seconds: float


def compile_run(label: str, model: str, path: Path, out: Path, cache: Path, args: list[str],
                console: Console) -> Run:
    console.log(f"compiling {label}: {' '.join(args)}")
    t0 = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "kubeinfer_runtime", "compile", str(path), "--out", str(out),
         "--batch", "64", "--cache-dir", str(cache), *args],
        env={**os.environ, "KUBEINFER_WORK_DIR": str(out.parent / "work")},
        capture_output=True, text=True, check=False, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"compile {label} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    report = CompileReport.model_validate_json((out / "report.json").read_bytes())
    return Run(label, model, path, report, time.monotonic() - t0)


def serve(name: str, uri: str, fmt: str, log_dir: Path) -> Server:
    port = free_port()
    return start(name, [sys.executable, "-m", "kubeinfer_runtime", "serve", "--role",
                        "model-server"],
                 {"KUBEINFER_MODEL_URI": uri, "KUBEINFER_MODEL_FORMAT": fmt,
                  "KUBEINFER_HOST": "127.0.0.1", "KUBEINFER_PORT": str(port),
                  "KUBEINFER_LOG_LEVEL": "warning"}, port, "/ping", log_dir, timeout=120)


def served_rps(run: Run, body: bytes, log_dir: Path, rounds: int, duration: float
               ) -> tuple[LoadResult, LoadResult, list[float]]:
    """(ONNX model, compiled artifact) at c=64, median rounds, and the paired ratios."""
    servers = {"onnx": serve(f"{run.label}-onnx", f"file://{run.path}", "onnx", log_dir),
               "compiled": serve(f"{run.label}-compiled", run.report.artifact_dir_uri,
                                 "compiled", log_dir)}
    try:
        for s in servers.values():
            wrk(s.url + "/invocations", body, "application/json", 8, 1.0)
        runs: dict[str, list[LoadResult]] = {k: [] for k in servers}
        for _ in range(rounds):
            for k, s in servers.items():
                runs[k].append(wrk(s.url + "/invocations", body, "application/json", 64,
                                   duration))
    finally:
        for s in servers.values():
            s.stop()
    ratios = [c.rps / o.rps for o, c in zip(runs["onnx"], runs["compiled"], strict=True)]

    def median(results: list[LoadResult]) -> LoadResult:
        return sorted(results, key=lambda r: r.rps)[len(results) // 2]

    return median(runs["onnx"]), median(runs["compiled"]), ratios


def candidates_table(runs: list[Run], tune: float) -> Table:
    table = Table(title=f"Compile candidates (native target, tuning budget {tune:.0f} s per "
                        "batch size, 1 thread)")
    for col in ("model", "batch", "candidate", "p50 ms", "p99 ms", "vs ORT fp32",
                "max-abs-diff", "top-1", "chosen"):
        table.add_column(col, justify="left" if col in ("model", "candidate", "chosen")
                         else "right")
    for run in runs:
        base = next(c for c in run.report.candidates if c.name is CandidateName.ORT_FP32)
        for b in run.report.batch_sizes:
            for c in run.report.candidates:
                p50 = c.p50_ms.get(b)
                ratio = "" if p50 is None or b not in base.p50_ms else \
                    f"{base.p50_ms[b] / p50:.2f}x"
                table.add_row(run.label, str(b), c.name.value,
                              "" if p50 is None else f"{p50:.3f}",
                              "" if c.p99_ms.get(b) is None else f"{c.p99_ms[b]:.3f}", ratio,
                              "" if c.max_abs_diff is None else f"{c.max_abs_diff:.2g}",
                              "" if c.top1_agreement is None else f"{c.top1_agreement:.1%}",
                              "chosen" if c.chosen else c.note[:60])
            # The artifact itself, on its own line: what a variant serving it gets.
            chosen = next((c for c in run.report.candidates if c.chosen), None)
            if chosen is not None and chosen.p50_ms.get(b) is not None and b in base.p50_ms:
                table.add_row(run.label, str(b), f"=> artifact ({chosen.name.value})",
                              f"{chosen.p50_ms[b]:.3f}", f"{chosen.p99_ms.get(b, 0):.3f}",
                              f"{base.p50_ms[b] / chosen.p50_ms[b]:.2f}x", "", "", "",
                              style="bold", end_section=True)
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tune", type=float, default=60.0,
                    help="MetaSchedule budget per batch size, seconds")
    ap.add_argument("--measure", type=float, default=1.0,
                    help="timing per candidate and batch size, seconds")
    ap.add_argument("--min-top1", type=float, default=0.97,
                    help="the looser top-1 gate of the extra quantized MLP run")
    ap.add_argument("--models", default="mlp,convnet")
    ap.add_argument("--duration", type=float, default=3.0, help="seconds per wrk run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    console = Console()
    if not console.is_terminal:  # a pipe or a log file: no width to fit, keep rows whole
        console = Console(width=180)
    console.log(f"load average before: {os.getloadavg()}")
    common = ["--tune", f"{args.tune:g}", "--measure", f"{args.measure:g}"]
    runs: list[Run] = []
    served: list[tuple[Run, LoadResult, LoadResult, list[float]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        builders = {"mlp": lambda: build_mlp(d / "mlp.onnx"),
                    "convnet": lambda: build_convnet(d / "convnet.onnx")}
        for name in args.models.split(","):
            path = builders[name]()
            cache = d / f"cache-{name}"
            runs.append(compile_run(name, name, path, d / f"out-{name}", cache, common,
                                    console))
            runs.append(compile_run(f"{name} +int8", name, path, d / f"out-{name}-q", cache,
                                    [*common, "--allow-quantization"], console))
            if name == "mlp":
                runs.append(compile_run(
                    f"{name} +int8 top-1 {args.min_top1:.0%}", name, path,
                    d / f"out-{name}-q2", cache,
                    [*common, "--allow-quantization", "--min-top1", str(args.min_top1)],
                    console))
        console.print(candidates_table(runs, args.tune))
        for run in runs:
            x = np.random.default_rng(0).standard_normal(
                (1, 256) if run.model == "mlp" else (1, 3, 32, 32)).astype(np.float32)
            body = orjson.dumps({"instances": x.tolist()})
            onnx_r, comp_r, ratios = served_rps(run, body, d, args.rounds, args.duration)
            served.append((run, onnx_r, comp_r, ratios))
            console.log(f"{run.label}: onnx {onnx_r.rps:,.0f} rps, compiled "
                        f"({run.report.chosen.value if run.report.chosen else '?'}) "
                        f"{comp_r.rps:,.0f} rps")
    console.log(f"load average after: {os.getloadavg()}")

    summary = Table(title=f"Chosen artifacts (c=64 through the model server: wrk, "
                          f"{args.rounds} interleaved rounds)")
    for col in ("run", "chosen", "speedup vs ORT fp32", "tuning trials", "compile s",
                "ONNX rps", "compiled rps", "ratio (median paired)"):
        summary.add_column(col, justify="left" if col in ("run", "chosen") else "right")
    rps = {id(r): (o, c, q) for r, o, c, q in served}
    lines = []
    for run in runs:
        r = run.report
        o, c, q = rps.get(id(run), (None, None, None))
        cells = [run.label, r.chosen.value if r.chosen else "?",
                 "" if r.speedup is None else f"{r.speedup:.2f}x", str(r.tuning_trials),
                 f"{run.seconds:.0f}", "" if o is None else f"{o.rps:,.0f}",
                 "" if c is None else f"{c.rps:,.0f}",
                 "" if not q else f"{statistics.median(q):.2f}x"]
        summary.add_row(*cells)
        lines.append(cells)
    console.print(summary)
    for run in runs:
        console.print(f"{run.label}: {run.report.reason}", highlight=False)

    if args.markdown:
        print("\n| model | batch | candidate | p50 ms | p99 ms | vs ORT fp32 | max-abs-diff "
              "| top-1 | chosen |")
        print("|---|---:|---|---:|---:|---:|---:|---:|---|")
        for run in runs:
            base = next(x for x in run.report.candidates if x.name is CandidateName.ORT_FP32)
            for b in run.report.batch_sizes:
                for cand in run.report.candidates:
                    p50 = cand.p50_ms.get(b)
                    ratio = "" if p50 is None else f"{base.p50_ms[b] / p50:.2f}x"
                    p99 = cand.p99_ms.get(b)
                    diff, top1 = cand.max_abs_diff, cand.top1_agreement
                    cells = [run.label, str(b), cand.name.value,
                             "" if p50 is None else f"{p50:.3f}",
                             "" if p99 is None else f"{p99:.3f}", ratio,
                             "" if diff is None else f"{diff:.2g}",
                             "" if top1 is None else f"{top1:.1%}",
                             "**chosen**" if cand.chosen else cand.note[:60]]
                    print("| " + " | ".join(cells) + " |")
        print("\n| run | chosen | speedup vs ORT fp32 | tuning trials | compile s | ONNX rps "
              "| compiled rps | ratio |")
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        for cells in lines:
            print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
