"""``kubeinfer up -f`` on TransformJobs: real runner, planner, worker and finalizer processes.

Every test runs the CLI as a user would (a subprocess with its own
KUBEINFER_HOME), on ``file://`` data, with the example models built fresh;
answers are checked against onnxruntime run in the test. Covered: the two
examples as written (their input, their filters), a failing job (exit 1 naming
the record), a model that cannot load (fails at once), ``-d`` + ``status`` +
``down`` + ``up`` resuming with the done shards skipped, and ``endpointRef`` to
an Endpoint in the same file.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from tests.support.ports import wait_until

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "examples" / "data"

#: A pipeline step that makes each request slow, so a job can be stopped half way.
SLOW_HANDLER = '''\
import time


def slow(body, content_type):
    time.sleep(0.5)
    return body, content_type
'''


class Cli:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.env = {**os.environ, "KUBEINFER_HOME": str(home)}

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "kubeinfer_operator.cli", *args],
                              env=self.env, capture_output=True, text=True, timeout=timeout)

    def jobs(self, name: str | None = None) -> list[dict[str, Any]]:
        result = self.run("status", "--json", *([name] if name else []))
        rows: list[dict[str, Any]] = json.loads(result.stdout)["jobs"]
        return rows

    def job(self, name: str) -> dict[str, Any]:
        [row] = self.jobs(name)
        return row

    def our_processes(self) -> list[int]:
        marker = f"KUBEINFER_HOME={self.home}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                environ = (entry / "environ").read_bytes()
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if marker in environ.split(b"\0") and stat[stat.rfind(")") + 2] != "Z":
                found.append(int(entry.name))
        return found


@pytest.fixture
def cli(tmp_path: Path) -> Iterator[Cli]:
    c = Cli(tmp_path / "home")
    yield c
    if c.our_processes():
        c.run("down", "--all", timeout=60)
    for pid in c.our_processes():
        os.kill(pid, signal.SIGKILL)


def example(name: str, models_dir: Path, out: Path) -> dict[str, Any]:
    """An example as written, but with fresh models and the test's own output folder."""
    doc: dict[str, Any] = yaml.safe_load((REPO / "examples" / name).read_text())
    doc["spec"]["model"]["uri"] = f"file://{models_dir}/iris.onnx"
    relative = doc["spec"]["input"]["uri"].removeprefix("file://")
    doc["spec"]["input"]["uri"] = f"file://{REPO / 'examples' / relative}/"
    doc["spec"]["output"]["uri"] = f"file://{out}/"
    return doc


def write(path: Path, *docs: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return path


def labels(models_dir: Path, rows: list[list[float]]) -> list[int]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(models_dir / "iris.onnx"),
                                   providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: np.array(rows, dtype=np.float32)})
    return [int(v) for v in out[0]]


def test_the_csv_example_joins_each_line_with_its_prediction(cli: Cli, models_dir: Path,
                                                             tmp_path: Path) -> None:
    out = tmp_path / "out"
    manifest = write(tmp_path / "job.yaml", example("transform-job.yaml", models_dir, out))
    started = time.monotonic()
    result = cli.run("up", "-f", str(manifest))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "TransformJob iris-batch complete: 150 record(s) from 2 object(s)" in result.stdout
    assert time.monotonic() - started < 60
    for name in ("flowers-1.csv", "flowers-2.csv"):
        lines = (DATA / "iris-csv" / name).read_text().splitlines()
        rows = [[float(v) for v in line.split(",")] for line in lines]
        expected = [f"{line},{label}" for line, label in zip(lines, labels(models_dir, rows),
                                                             strict=True)]
        assert (out / f"{name}.out").read_text().splitlines() == expected
    row = cli.job("iris-batch")
    assert (row["phase"], row["progress"], row["records"]) == ("Complete", row["progress"], 150)
    assert not cli.our_processes()


def test_the_jsonl_example_filters_and_joins(cli: Cli, models_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    manifest = write(tmp_path / "job.yaml", example("transform-jsonl.yaml", models_dir, out))
    result = cli.run("up", "-f", str(manifest))
    assert result.returncode == 0, result.stdout + result.stderr
    records = [json.loads(line) for line in
               (DATA / "iris-jsonl" / "flowers.jsonl").read_text().splitlines()]
    outputs = [json.loads(line) for line in (out / "flowers.jsonl.out").read_text().splitlines()]
    assert [set(o) for o in outputs] == [{"id", "SageMakerOutput"}] * len(records)
    assert [o["id"] for o in outputs] == [r["id"] for r in records]
    predicted = [o["SageMakerOutput"]["label"] for o in outputs]
    assert predicted == labels(models_dir, [r["features"] for r in records])


def test_more_instances_than_shards_and_workers_started_ahead(cli: Cli, models_dir: Path,
                                                             tmp_path: Path) -> None:
    # The runner starts workers while the plan is made (instanceCount of them, at most one
    # per core); one 4.5 MB object makes two shards: two workers do the work, each taking
    # every fourth shard from its index.
    data = tmp_path / "in"
    data.mkdir()
    rows = np.random.default_rng(5).uniform(0.1, 7.0, size=(290_000, 4))
    (data / "big.csv").write_text("\n".join(",".join(f"{v:.1f}" for v in r) for r in rows)
                                  + "\n")
    out = tmp_path / "out"
    doc = example("transform-job.yaml", models_dir, out)
    doc["spec"]["input"]["uri"] = f"file://{data}/"
    doc["spec"]["resources"] = {"instanceCount": 4}
    result = cli.run("up", "-f", str(write(tmp_path / "job.yaml", doc)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "290000 record(s) from 1 object(s) in 2 shard(s)" in result.stdout
    reports = {p.stem: json.loads(p.read_text())
               for p in (cli.home / "jobs" / "iris-batch" / "reports").glob("worker-*.json")}
    assert sorted(reports) == ["worker-0", "worker-1"]
    assert [reports[w]["shards_done"] for w in sorted(reports)] == [1, 1]
    assert (out / "big.csv.out").read_text().count("\n") == len(rows)
    assert not cli.our_processes()

    # The example's two small objects make one shard: every worker started ahead but
    # the first is sent away before it reads anything.
    small = example("transform-job.yaml", models_dir, tmp_path / "out-small")
    small["metadata"]["name"] = "one-shard"
    small["spec"]["resources"] = {"instanceCount": 4}
    result = cli.run("up", "-f", str(write(tmp_path / "small.yaml", small)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "150 record(s) from 2 object(s) in 1 shard(s)" in result.stdout
    reports = list((cli.home / "jobs" / "one-shard" / "reports").glob("worker-*.json"))
    assert [p.stem for p in reports] == ["worker-0"]
    assert not cli.our_processes()


def test_a_failed_plan_leaves_no_worker_started_ahead(cli: Cli, models_dir: Path,
                                                       tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    doc = example("transform-job.yaml", models_dir, tmp_path / "out")
    doc["spec"]["input"]["uri"] = f"file://{empty}/"
    doc["spec"]["resources"] = {"instanceCount": 2}
    result = cli.run("up", "-f", str(write(tmp_path / "job.yaml", doc)))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "holds no objects" in result.stderr
    assert cli.job("iris-batch")["reason"] == "BadInput"
    assert not cli.our_processes()
    assert not list((cli.home / "jobs" / "iris-batch" / "reports").glob("worker-*.json"))


def test_a_bad_record_fails_the_job_naming_it(cli: Cli, models_dir: Path,
                                              tmp_path: Path) -> None:
    data = tmp_path / "in"
    data.mkdir()
    (data / "a.csv").write_text("5.1,3.5,1.4,0.2\nnot,a,number,here\n6.7,2.4,5.5,2.3\n")
    doc = example("transform-job.yaml", models_dir, tmp_path / "out")
    doc["spec"]["input"]["uri"] = f"file://{data}/"
    doc["spec"]["batchStrategy"] = "SingleRecord"
    result = cli.run("up", "-f", str(write(tmp_path / "job.yaml", doc)))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "TransformJob iris-batch failed (BadInput)" in result.stderr
    assert 'record 2 (byte offset 16)' in result.stderr
    assert "not,a,number" not in result.stdout + result.stderr  # never the record's bytes
    row = cli.job("iris-batch")
    assert (row["phase"], row["reason"]) == ("Failed", "BadInput")

    # Tolerated: the job completes and _errors.jsonl names the line.
    doc["spec"]["errorPolicy"] = {"maxFailedRecords": 1}
    doc["spec"]["output"]["uri"] = f"file://{tmp_path / 'out2'}/"
    result = cli.run("up", "-f", str(write(tmp_path / "job.yaml", doc)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 bad record(s)" in result.stdout
    errors = (tmp_path / "out2" / "_errors.jsonl").read_text()
    assert "a.csv" in errors and "not,a,number" not in errors


def test_a_model_that_cannot_load_fails_the_job_at_once(cli: Cli, models_dir: Path,
                                                        tmp_path: Path) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"this is not an onnx model")
    doc = example("transform-job.yaml", models_dir, tmp_path / "out")
    doc["spec"]["model"]["uri"] = f"file://{broken}"
    started = time.monotonic()
    result = cli.run("up", "-f", str(write(tmp_path / "job.yaml", doc)))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "failed (ModelFailed)" in result.stderr
    assert time.monotonic() - started < 60
    assert cli.job("iris-batch")["reason"] == "ModelFailed"


def _slow_job(tmp_path: Path, models_dir: Path) -> Path:
    """Six shards (three 4.5 MB objects, each cut in two) through a slow handler step."""
    data = tmp_path / "in"
    data.mkdir()
    rng = np.random.default_rng(3)
    for k in range(3):
        rows = rng.uniform(0.1, 7.0, size=(290_000, 4))
        (data / f"part-{k}.csv").write_text("\n".join(",".join(f"{v:.1f}" for v in r)
                                                      for r in rows) + "\n")
    code = tmp_path / "code"
    code.mkdir()
    (code / "slowstep.py").write_text(SLOW_HANDLER)
    doc = {"apiVersion": "kubeinfer.io/v1alpha1", "kind": "TransformJob",
           "metadata": {"name": "resumable"},
           "spec": {"containers": [
               {"name": "wait", "handler": "slowstep:slow", "codeUri": f"file://{code}"},
               {"name": "iris", "model": {"uri": f"file://{models_dir}/iris.onnx"}}],
               "input": {"uri": f"file://{data}/", "contentType": "text/csv",
                         "splitType": "Line"},
               "output": {"uri": f"file://{tmp_path / 'out'}/", "accept": "text/csv",
                          "assembleWith": "Line"},
               "maxPayloadInMB": 1, "resources": {"instanceCount": 1}}}
    return write(tmp_path / "job.yaml", doc)


def test_detach_status_down_and_up_resume(cli: Cli, models_dir: Path, tmp_path: Path) -> None:
    manifest = _slow_job(tmp_path, models_dir)
    result = cli.run("up", "-f", str(manifest), "-d")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Running in the background" in result.stdout
    wait_until(lambda: cli.job("resumable")["phase"] == "Running", 60, "the workers")
    row = cli.job("resumable")
    assert row["running"] and row["progress"].endswith("/6")
    status = cli.run("status")
    assert "TransformJobs" in status.stdout and "resumable" in status.stdout

    done = tmp_path / "out" / "_kubeinfer" / "done"
    wait_until(lambda: done.is_dir() and any(done.iterdir()), 120, "a first done shard",
               interval=0.05)
    result = cli.run("down", "resumable")
    assert result.returncode == 0 and "Stopped TransformJob resumable" in result.stdout
    assert not cli.our_processes()
    kept = len(list(done.iterdir()))
    # At least the shard waited for; not all six: each shard is ~3 requests of 0.5 s
    # (SLOW_HANDLER), so the other five need ~7 s more than `down` takes. kept == 6
    # would mean `down` stopped nothing and the resume below proved nothing.
    assert 1 <= kept < 6, kept
    row = cli.job("resumable")
    assert (row["phase"], row["running"]) == ("Stopped", False)

    result = cli.run("up", "-f", str(manifest), timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    reports = [json.loads(p.read_text())
               for p in (cli.home / "jobs" / "resumable" / "reports").glob("worker-*.json")]
    assert sum(r["shards_skipped"] for r in reports) == kept
    assert sum(r["shards_done"] for r in reports) == 6 - kept
    for k in range(3):
        lines = (tmp_path / "in" / f"part-{k}.csv").read_text().count("\n")
        assert (tmp_path / "out" / f"part-{k}.csv.out").read_text().count("\n") == lines
    assert cli.job("resumable")["phase"] == "Complete"
    # down on a finished job forgets it; its outputs stay.
    assert "Removed TransformJob resumable" in cli.run("down", "resumable").stdout
    assert cli.jobs() == [] and (tmp_path / "out" / "part-0.csv.out").is_file()


def test_endpoint_ref_to_an_endpoint_in_the_same_file(cli: Cli, models_dir: Path,
                                                      tmp_path: Path) -> None:
    endpoint = {"apiVersion": "kubeinfer.io/v1alpha1", "kind": "Endpoint",
                "metadata": {"name": "iris"},
                "spec": {"variants": [{"name": "main",
                                       "model": {"uri": f"file://{models_dir}/iris.onnx"}}]}}
    job = example("transform-job.yaml", models_dir, tmp_path / "out")
    del job["spec"]["model"]
    job["spec"]["endpointRef"] = {"name": "iris"}
    result = cli.run("up", "-f", str(write(tmp_path / "both.yaml", endpoint, job)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Endpoint iris in" in result.stdout and "(it is not started)" in result.stdout
    assert (tmp_path / "out" / "flowers-1.csv.out").is_file()

    job["spec"]["endpointRef"] = {"name": "missing"}
    result = cli.run("up", "-f", str(write(tmp_path / "job.yaml", job)))
    assert result.returncode == 2
    assert "spec.endpointRef: no Endpoint 'missing'" in result.stderr
