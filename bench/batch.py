"""Batch Transform benchmark: our TransformJob against the in-process limit and Ray Data.

One run, side by side, on the same data (CSV rows on local disk):

* **loop** — a hand-written in-process onnxruntime loop: read the object in
  the same batches a MultiRecord job sends (records fitting ``maxPayloadInMB``,
  6 MB), parse them with ``numpy.loadtxt``, infer, encode the first output as
  CSV, write. It does nothing a job does not, so it is the limit.
* **ours, 1 worker / 2 workers** — ``kubeinfer up -f job.yaml`` on a
  TransformJob of ``instanceCount`` 1 and 2: the real CLI, planner, worker
  processes and finalizer, wall clock from start to exit.
* **Ray Data** — ``read_text`` → ``map_batches`` (an onnxruntime callable class,
  the same batch size) → ``write``, in a virtualenv this script creates
  (``.venv-ray`` from requirements/ray-bench.txt), when ``ray`` installs.

Models: iris (scikit-learn logistic regression, 4 features) and the MLP
256-512-512-10. Then the small-objects case: each model's rows cut into 10,000
objects (SageMaker never batches records of different objects into one
request) against the same rows in one object, through the loop and our job.
Each run's outputs are compared with the loop's.

    .venv/bin/python bench/batch.py [--rows 1000000] [--objects 10000] [--models iris,mlp]
                                   [--objects-models iris,mlp] [--no-ray] [--markdown]

Every process gets one onnxruntime thread per worker (the loop and each of our
workers alike), so "1 worker vs the loop" compares the same compute. Never a
test: speed is measured, not asserted.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import orjson
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from examples.build_models import build_mlp, build_sklearn

from bench.common import REPO

PAYLOAD_BYTES = 6 * 1024 * 1024
RAY_VENV = REPO / ".venv-ray"
RAY_REQUIREMENTS = REPO / "requirements/ray-bench.txt"


@dataclass(frozen=True)
class Model:
    name: str
    features: int
    build: Callable[[Path], Path]


MODELS = {
    "iris": Model("iris", 4, build_sklearn),
    "mlp": Model("mlp 256-512-512-10", 256, build_mlp),
}


@dataclass
class Result:
    case: str
    model: str
    runner: str
    rows: int
    #: End to end: the command from start to exit (process starts, model load, planning).
    wall: float
    #: Processing only: the loop's own time in its process; our workers' time on their
    #: shards (the slowest worker's); None where the runner does not say.
    work: float | None = None
    note: str = ""


# -- data ----------------------------------------------------------------------------------


def csv_rows(arr: np.ndarray) -> bytes:
    """Rows as CSV, floats in their shortest round-trip form (orjson), newline-terminated."""
    js = orjson.dumps(arr, option=orjson.OPT_SERIALIZE_NUMPY)
    return js[2:-2].replace(b"],[", b"\n") + b"\n"


def write_rows(path: Path, rows: int, features: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        block = max(1, 2_000_000 // features)
        for start in range(0, rows, block):
            n = min(block, rows - start)
            x = rng.normal(4.0, 1.5, size=(n, features)).astype(np.float32)
            f.write(csv_rows(np.round(x, 3)))


def split_objects(src: Path, dest: Path, objects: int) -> None:
    """``src``'s lines cut into ``objects`` files of (nearly) equal row counts."""
    lines = src.read_bytes().splitlines(keepends=True)
    dest.mkdir(parents=True, exist_ok=True)
    per, extra = divmod(len(lines), objects)
    at = 0
    for i in range(objects):
        n = per + (1 if i < extra else 0)
        (dest / f"part-{i:05d}.csv").write_bytes(b"".join(lines[at:at + n]))
        at += n


# -- the loop (the limit) --------------------------------------------------------------------


def batches(data: bytes, limit: int) -> Iterator[bytes]:
    """Whole lines, as many as fit in ``limit`` bytes (what a MultiRecord job sends)."""
    start, n = 0, len(data)
    while start < n:
        end = data.rfind(b"\n", start, start + limit)
        end = n if start + limit >= n else end + 1
        yield data[start:end]
        start = end


def loop_one(session: object, in_name: str, src: Path, dest: Path) -> int:
    import onnxruntime as ort

    assert isinstance(session, ort.InferenceSession)
    rows = 0
    out = []
    for body in batches(src.read_bytes(), PAYLOAD_BYTES):
        x = np.loadtxt(io.BytesIO(body), delimiter=",", dtype=np.float32, ndmin=2)
        y = session.run(None, {in_name: x})[0]
        out.append(csv_rows(y) if y.ndim == 2 else
                   orjson.dumps(y, option=orjson.OPT_SERIALIZE_NUMPY)[1:-1].replace(b",", b"\n")
                   + b"\n")
        rows += len(x)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".tmp")
    tmp.write_bytes(b"".join(out))
    os.replace(tmp, dest)
    return rows


def run_loop(model_path: Path, inputs: list[Path], in_root: Path, out_root: Path) -> float:
    """The loop's own time (session creation included), in this process."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    t0 = time.perf_counter()
    session = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    in_name = session.get_inputs()[0].name
    for src in inputs:
        loop_one(session, in_name, src, out_root / (str(src.relative_to(in_root)) + ".out"))
    return time.perf_counter() - t0


def run_loop_process(model_path: Path, in_root: Path, out_root: Path) -> tuple[float, float]:
    """(wall, work) of the loop as a program of its own: a fresh python process, imports
    and all, as our job's processes are."""
    code = ("import sys, time; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
            "from bench.batch import run_loop; r = Path(sys.argv[3]); "
            "print(run_loop(Path(sys.argv[2]), sorted(p for p in r.rglob('*') if p.is_file()),"
            " r, Path(sys.argv[4])))")
    quiet_disk()
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code, str(REPO), str(model_path), str(in_root),
                          str(out_root)], check=True, capture_output=True, text=True).stdout
    return time.perf_counter() - t0, float(out.strip().splitlines()[-1])


def quiet_disk() -> None:
    """Flush what earlier steps wrote (10,000 files make the disk busy for seconds after),
    so a run does not pay for the one before it."""
    os.sync()
    time.sleep(0.5)


# -- ours ---------------------------------------------------------------------------------------


def job_yaml(name: str, model_path: Path, in_dir: Path, out_dir: Path, workers: int) -> str:
    return textwrap.dedent(f"""\
        apiVersion: kubeinfer.io/v1alpha1
        kind: TransformJob
        metadata:
          name: {name}
        spec:
          model:
            uri: file://{model_path}
          input:
            uri: file://{in_dir}/
            contentType: text/csv
            splitType: Line
          output:
            uri: file://{out_dir}/
            accept: text/csv
            assembleWith: Line
          batchStrategy: MultiRecord
          maxPayloadInMB: 6
          resources:
            instanceCount: {workers}
        """)


def run_ours(name: str, model_path: Path, in_dir: Path, out_dir: Path, workers: int,
             work: Path) -> tuple[float, float]:
    """(wall, work) of ``kubeinfer up -f``: work is the slowest worker's time on its shards."""
    manifest = work / f"{name}.yaml"
    manifest.write_text(job_yaml(name, model_path, in_dir, out_dir, workers))
    home = work / "home"
    # A fresh run each time: a job's done markers would make a second run skip everything.
    shutil.rmtree(out_dir, ignore_errors=True)
    shutil.rmtree(home / "jobs" / name, ignore_errors=True)
    env = {**os.environ, "KUBEINFER_HOME": str(home)}
    quiet_disk()
    t0 = time.perf_counter()
    proc = subprocess.run([str(REPO / ".venv/bin/kubeinfer"), "up", "-f", str(manifest)],
                          env=env, cwd=REPO, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"kubeinfer up -f {manifest} exited {proc.returncode}:\n"
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    reports = [orjson.loads(p.read_bytes())
               for p in (home / "jobs" / name / "progress").glob("worker-*.json")]
    return wall, max(float(r["seconds"]) for r in reports)


# -- Ray Data ------------------------------------------------------------------------------------

RAY_SCRIPT = """
import sys, time
import numpy as np, onnxruntime as ort, ray

model, src, dest, batch_rows = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
t0 = time.perf_counter()

class Predict:
    def __init__(self):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        self.s = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        self.name = self.s.get_inputs()[0].name
    def __call__(self, batch):
        x = np.array([np.array(t.split(","), dtype=np.float32) for t in batch["text"]])
        y = self.s.run(None, {self.name: x})[0]
        return {"text": [",".join(map(str, r)) if np.ndim(r) else str(r) for r in y]}

ds = ray.data.read_text(src)
# Two actors of half a CPU each: actors of a whole CPU would hold both cores and
# leave none for the read tasks (the job then waits forever).
ds = ds.map_batches(Predict, batch_size=batch_rows, batch_format="numpy", concurrency=2,
                    num_cpus=0.5)
ds.write_csv(dest)
print(f"{time.perf_counter() - t0:.3f}")
"""


def ray_python() -> Path | None:
    """``.venv-ray``'s python with ray installed (creating it once), or None."""
    py = RAY_VENV / "bin/python"
    stamp = RAY_VENV / ".installed"
    if not stamp.exists():
        try:
            if not py.exists():
                subprocess.run([sys.executable, "-m", "venv", str(RAY_VENV)], check=True)
            subprocess.run([str(REPO / ".venv/bin/uv"), "pip", "install", "-q",
                            "--compile-bytecode", "--python", str(py), "-r",
                            str(RAY_REQUIREMENTS)], check=True)
            stamp.touch()
        except (subprocess.CalledProcessError, OSError) as e:
            print(f"Ray Data not measured: installing it into {RAY_VENV} failed ({e})",
                  file=sys.stderr)
            return None
    return py


def run_ray(py: Path, model_path: Path, src: Path, dest: Path) -> tuple[float, float]:
    """(wall, work): work is from the dataset's creation to its written end (after
    ``ray.init``)."""
    script = dest.parent / "ray_job.py"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(RAY_SCRIPT)
    with src.open("rb") as f:
        batch_rows = max(1, PAYLOAD_BYTES // (len(f.readline()) or 1))
    quiet_disk()
    t0 = time.perf_counter()
    out = subprocess.run([str(py), str(script), str(model_path), str(src), str(dest),
                          str(batch_rows)], check=True, capture_output=True, text=True).stdout
    return time.perf_counter() - t0, float(out.strip().splitlines()[-1])


# -- checks ---------------------------------------------------------------------------------------


def same_outputs(expected: Path, got: Path) -> str:
    """"ok", or what differs: each ``.out`` under ``got`` against the loop's."""
    want = sorted(p.relative_to(expected) for p in expected.rglob("*.out"))
    have = sorted(p.relative_to(got) for p in got.rglob("*.out"))
    if want != have:
        return f"{len(have)} outputs, the loop wrote {len(want)}"
    for rel in want:
        a = np.loadtxt(expected / rel, delimiter=",", ndmin=2)
        b = np.loadtxt(got / rel, delimiter=",", ndmin=2)
        if a.shape != b.shape or not np.allclose(a, b, rtol=1e-5, atol=1e-6):
            return f"{rel} differs"
    return "ok"


# -- main ------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--objects", type=int, default=10_000)
    ap.add_argument("--models", default="iris,mlp")
    ap.add_argument("--objects-models", default="iris,mlp",
                    help="models whose rows are also cut into --objects objects")
    ap.add_argument("--rounds", type=int, default=3,
                    help="runs of each (Ray: one); the table shows the median by work time")
    ap.add_argument("--no-ray", action="store_true")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    console = Console()
    results: list[Result] = []
    warm_bytecode()
    ray_py = None if args.no_ray else ray_python()
    with tempfile.TemporaryDirectory(prefix="kubeinfer-batch-bench-") as tmp:
        work = Path(tmp)
        for key in args.models.split(","):
            m = MODELS[key]
            model_path = m.build(work / f"{key}.onnx")
            one = work / key / "one"
            write_rows(one / "data.csv", args.rows, m.features, seed=1)
            console.print(f"[bold]{m.name}[/]: {args.rows:,} rows, "
                          f"{(one / 'data.csv').stat().st_size / 1e6:.0f} MB")
            loop_out = work / key / "out-loop"
            wall, busy = median(args.rounds, partial(run_loop_process, model_path, one, loop_out))
            results.append(Result("one object", m.name, LOOP, args.rows, wall, busy))
            for workers in (1, 2):
                out = work / key / f"out-ours-{workers}"
                wall, busy = median(args.rounds, partial(
                    run_ours, f"bench-{key}-{workers}", model_path, one, out, workers, work))
                results.append(Result("one object", m.name, ours(workers), args.rows, wall,
                                      busy, same_outputs(loop_out, out)))
            if ray_py is not None:
                wall, busy = run_ray(ray_py, model_path, one / "data.csv",
                                     work / key / "out-ray")
                results.append(Result("one object", m.name, "Ray Data map_batches (2 CPUs)",
                                      args.rows, wall, busy))
            if key in args.objects_models.split(",") and args.objects:
                case = f"{args.objects:,} objects"
                many = work / key / "many"
                split_objects(one / "data.csv", many, args.objects)
                loop_many = work / key / "out-loop-many"
                wall, busy = median(args.rounds,
                                    partial(run_loop_process, model_path, many, loop_many))
                results.append(Result(case, m.name, LOOP, args.rows, wall, busy))
                for workers in (1, 2):
                    out = work / key / f"out-ours-many-{workers}"
                    wall, busy = median(args.rounds, partial(
                        run_ours, f"bench-{key}-many-{workers}", model_path, many, out, workers,
                        work))
                    results.append(Result(case, m.name, ours(workers), args.rows, wall, busy,
                                          same_outputs(loop_many, out)))
            report(console, results, args.markdown)


LOOP = "in-process loop (the limit)"


def warm_bytecode() -> None:
    """Byte-compile our packages first, as an installed package is.

    An editable install has no ``.pyc`` files until a process writes them, and
    with ``PYTHONDONTWRITEBYTECODE`` set (as on this machine) none ever does: every
    job process would then compile ~700 modules from source (0.5-0.8 s each),
    a cost no user's install pays. The loop imports only pre-compiled packages.
    """
    import compileall

    for package in ("runtime", "operator"):
        compileall.compile_dir(REPO / package, quiet=1)


def median(rounds: int, run: Callable[[], tuple[float, float]]) -> tuple[float, float]:
    """The run of median work time among ``rounds`` (the machine's noise is +-20%)."""
    runs = sorted((run() for _ in range(max(1, rounds))), key=lambda r: r[1])
    return runs[len(runs) // 2]


def ours(workers: int) -> str:
    return f"kubeinfer, {workers} worker" + ("s" if workers > 1 else "")


def report(console: Console, results: list[Result], markdown: bool) -> None:
    limits = {(r.case, r.model): r for r in results if r.runner == LOOP}
    one_object = {(r.model, r.runner): r for r in results if r.case == "one object"}
    rows = []
    for r in results:
        loop = limits.get((r.case, r.model))
        note = r.note
        same = one_object.get((r.model, r.runner))
        if r.case != "one object" and same is not None and r.work and same.work:
            note += (f"; {r.rows / r.work / (same.rows / same.work) * 100:.0f}% (work) / "
                     f"{r.rows / r.wall / (same.rows / same.wall) * 100:.0f}% (e2e) of one "
                     "object's records/s")
        rows.append((
            r.case, r.model, r.runner,
            f"{r.wall:.2f}", f"{r.rows / r.wall:,.0f}",
            f"{loop.wall / r.wall * 100:.0f}%" if loop else "",
            f"{r.work:.2f}" if r.work else "-",
            f"{r.rows / r.work:,.0f}" if r.work else "-",
            f"{loop.work / r.work * 100:.0f}%" if loop and loop.work and r.work else "",
            note.strip("; ")))
    head = ("case", "model", "runner", "e2e s", "e2e records/s", "e2e vs loop",
            "work s", "work records/s", "work vs loop", "notes")
    if markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for row in rows:
            print("| " + " | ".join(row) + " |")
        return
    table = Table(*head)
    for row in rows:
        table.add_row(*row)
    console.print(table)


if __name__ == "__main__":
    main()
