"""Batch Transform jobs as real processes: ``python -m kubeinfer_runtime batch plan|work|
finalize`` against SeaweedFS S3 and file:// folders, with real ONNX models, a real model
server over HTTP, and a stand-in image for ``/execution-parameters``.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from kubeinfer_runtime.contract.batch import EXIT_BAD_INPUT, EXIT_MODEL_FAILED
from tests.support.orphans import die_with_parent
from tests.support.ports import free_port, http_ok, stop_process, wait_until
from tests.support.procs import start_runtime
from tests.support.s3 import S3Server

REPO = Path(__file__).resolve().parent.parent.parent


@dataclass
class Step:
    rc: int
    report: dict[str, Any]
    log: str
    seconds: float


def batch_env(tmp: Path, s3: S3Server | None = None, **kw: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBEINFER_")}
    env.update(s3.env() if s3 is not None else {})
    env.update({"KUBEINFER_REPORT_FILE": str(tmp / "report.json"),
                "KUBEINFER_SPLIT_TYPE": "Line", "KUBEINFER_INPUT_CONTENT_TYPE": "text/csv",
                "KUBEINFER_ACCEPT": "text/csv", "KUBEINFER_ASSEMBLE_WITH": "Line"})
    env.update({f"KUBEINFER_{k.upper()}": v for k, v in kw.items()})
    return env


def spawn(step: str, env: dict[str, str], report: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "kubeinfer_runtime", "batch", step],
                            env={**env, "KUBEINFER_REPORT_FILE": str(report)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=die_with_parent)


def run(step: str, env: dict[str, str], timeout: float = 120, **extra: str) -> Step:
    report = Path(env["KUBEINFER_REPORT_FILE"])
    report.unlink(missing_ok=True)
    t0 = time.monotonic()
    proc = spawn(step, {**env, **extra}, report)
    out, _ = proc.communicate(timeout=timeout)
    seconds = time.monotonic() - t0
    doc = json.loads(report.read_text()) if report.exists() else {}
    return Step(proc.returncode, doc, out, seconds)


def csv_rows(n: int, seed: int = 0) -> tuple[np.ndarray, bytes]:
    x = np.round(np.random.default_rng(seed).normal(5, 1.5, size=(n, 4)), 3)
    return x, ("\n".join(",".join(f"{v:.3f}" for v in row) for row in x) + "\n").encode()


def iris_labels(model: Path, x: np.ndarray) -> bytes:
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    labels = sess.run([sess.get_outputs()[0].name], {"X": x.astype(np.float32)})[0]
    return b"".join(f"{int(v)}\n".encode() for v in labels)


def put(s3: S3Server, bucket: str, key: str, data: bytes) -> None:
    client = s3.minio()
    if not client.bucket_exists(bucket):
        client.make_bucket(bucket)
    client.put_object(bucket, key, io.BytesIO(data), len(data))


def get(s3: S3Server, bucket: str, key: str) -> bytes:
    resp = s3.minio().get_object(bucket, key)
    try:
        return bytes(resp.read())
    finally:
        resp.close()
        resp.release_conn()


def keys(s3: S3Server, bucket: str, prefix: str) -> list[str]:
    return sorted(str(o.object_name) for o in
                  s3.minio().list_objects(bucket, prefix=prefix, recursive=True))


def test_multi_object_job_over_two_workers(s3_server: S3Server, models_dir: Path,
                                           tmp_path: Path) -> None:
    iris = models_dir / "iris.onnx"
    big_x, big = csv_rows(220_000)  # ~5 MB: cut into byte ranges over two shards
    small = {f"small/{i}.csv": csv_rows(50 + i, seed=i + 1) for i in range(3)}
    put(s3_server, "jobs", "multi/in/big.csv", big)
    for key, (_, data) in small.items():
        put(s3_server, "jobs", f"multi/in/{key}", data)
    env = batch_env(tmp_path, s3_server, model_uri=f"file://{iris}",
                    input_uri="s3://jobs/multi/in/", output_uri="s3://jobs/multi/out/",
                    instance_count="2", max_batch_payload_bytes="1000000")
    plan = run("plan", env)
    assert plan.rc == 0, plan.log
    assert plan.report["objects"] == 4 and plan.report["shards"] >= 3
    workers = [spawn("work", {**env, "KUBEINFER_SHARDS": f"{i}/2"}, tmp_path / f"w{i}.json")
               for i in range(2)]
    for w in workers:
        assert w.wait(timeout=120) == 0, w.communicate()[0]
    reports = [json.loads((tmp_path / f"w{i}.json").read_text()) for i in range(2)]
    assert sum(r["shards_done"] for r in reports) == plan.report["shards"]
    assert all(r["shards_done"] >= 1 for r in reports)
    final = run("finalize", env)
    assert final.rc == 0, final.log
    assert final.report["records"] == 220_000 + sum(len(x) for x, _ in small.values())
    assert get(s3_server, "jobs", "multi/out/big.csv.out") == iris_labels(iris, big_x)
    for key, (x, _) in small.items():
        assert get(s3_server, "jobs", f"multi/out/{key}.out") == iris_labels(iris, x)
    # Parts joined and removed: the output folder holds outputs and the job's state only.
    assert [k for k in keys(s3_server, "jobs", "multi/out/") if "/parts/" in k] == []
    assert run("finalize", env).rc == 0  # a retried finalize reports the same summary


def test_sigkill_half_way_then_resume(models_dir: Path, tmp_path: Path) -> None:
    iris = models_dir / "iris.onnx"
    (tmp_path / "in").mkdir()
    expected = {}
    for i in range(6):
        x, data = csv_rows(4000, seed=i)
        (tmp_path / f"in/{i}.csv").write_bytes(data)
        expected[f"{i}.csv.out"] = iris_labels(iris, x)
    progress = tmp_path / "progress.json"
    # One record per request makes each shard take a while: time to kill the worker.
    env = batch_env(tmp_path, model_uri=f"file://{iris}", input_uri=f"file://{tmp_path}/in/",
                    output_uri=f"file://{tmp_path}/out/", shard_bytes="50000",
                    batch_strategy="SingleRecord", progress_file=str(progress))
    plan = run("plan", env)
    assert plan.rc == 0, plan.log
    total = plan.report["shards"]
    assert total >= 6
    worker = spawn("work", env, tmp_path / "first.json")

    def half_way() -> bool:
        if worker.poll() is not None:
            raise AssertionError("the worker finished before it was killed:\n"
                                 + worker.communicate()[0])
        try:
            doc = json.loads(progress.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return False
        return bool(doc["shards_done"] >= 2 and doc["shards_started"] > doc["shards_done"])

    wait_until(half_way, 60, "the worker half way through its shards")
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    first = json.loads(progress.read_text())
    markers = len(list((tmp_path / "out/_kubeinfer/done").glob("*.json")))
    in_flight = first["shards_started"] - first["shards_done"]
    assert markers >= first["shards_done"] and in_flight >= 1

    second = run("work", {**env, "KUBEINFER_BATCH_STRATEGY": "MultiRecord"})
    assert second.rc == 0, second.log
    assert second.report["shards_skipped"] >= markers
    redone = second.report["shards_started"] - (total - first["shards_started"])
    assert 0 <= redone <= in_flight
    final = run("finalize", env)
    assert final.rc == 0, final.log
    out = tmp_path / "out"
    assert {p.name: p.read_bytes() for p in out.glob("*.out")} == expected
    leftovers = [p for p in out.rglob("*") if p.name.startswith(".") or "parts" in p.parts]
    assert leftovers == []


def test_sigterm_stops_cleanly_leaving_the_shard_in_progress_undone(models_dir: Path,
                                                                   tmp_path: Path) -> None:
    iris = models_dir / "iris.onnx"
    (tmp_path / "in").mkdir()
    _, data = csv_rows(20_000)
    (tmp_path / "in/a.csv").write_bytes(data)
    progress = tmp_path / "progress.json"
    env = batch_env(tmp_path, model_uri=f"file://{iris}", input_uri=f"file://{tmp_path}/in/",
                    output_uri=f"file://{tmp_path}/out/", shard_bytes="100000",
                    batch_strategy="SingleRecord", progress_file=str(progress))
    assert run("plan", env).rc == 0
    worker = spawn("work", env, tmp_path / "report.json")

    def started() -> bool:
        assert worker.poll() is None, worker.communicate()[0]
        try:
            return bool(json.loads(progress.read_text())["shards_started"] >= 1)
        except (FileNotFoundError, json.JSONDecodeError):
            return False

    wait_until(started, 60, "the worker's first shard")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 143
    report = json.loads((tmp_path / "report.json").read_text())
    assert "SIGTERM" in report["error"]
    done = len(list((tmp_path / "out/_kubeinfer/done").glob("*.json")))
    assert done == report["shards_done"] < report["shards_started"]
    assert "SIGTERM" in json.loads(progress.read_text())["error"]


def test_one_malformed_line_among_100000(s3_server: S3Server, models_dir: Path,
                                         tmp_path: Path) -> None:
    iris = models_dir / "iris.onnx"
    x, data = csv_rows(100_000)
    lines = data.splitlines(keepends=True)
    lines[56_789] = b"5.1,oops,1.4,0.2\n"
    bad = b"".join(lines)
    put(s3_server, "jobs", "bad/in/rows.csv", bad)
    common = dict(model_uri=f"file://{iris}", input_uri="s3://jobs/bad/in/")
    tolerant = batch_env(tmp_path, s3_server, output_uri="s3://jobs/bad/out10/",
                         max_failed_records="10", **common)
    assert run("plan", tolerant).rc == 0
    work = run("work", tolerant)
    assert work.rc == 0, work.log
    assert work.report["failed_records"] == 1
    final = run("finalize", tolerant)
    assert final.rc == 0, final.log
    assert (final.report["records"], final.report["failed_records"]) == (100_000, 1)
    errors = [json.loads(x) for x in get(s3_server, "jobs",
                                         "bad/out10/_errors.jsonl").splitlines()]
    offset = bad.index(b"5.1,oops")
    assert [(e["key"], e["record"], e["offset"]) for e in errors] == [
        ("rows.csv", 56_790, offset)]
    assert "oops" not in errors[0]["error"]
    good = np.delete(x, 56_789, axis=0)
    assert get(s3_server, "jobs", "bad/out10/rows.csv.out") == iris_labels(iris, good)

    strict = batch_env(tmp_path, s3_server, output_uri="s3://jobs/bad/out0/", **common)
    assert run("plan", strict).rc == 0
    work = run("work", strict)
    assert work.rc == EXIT_BAD_INPUT, work.log
    message = work.report["error"]
    assert f'Object "rows.csv" record 56790 (byte offset {offset}) failed' in message
    assert "errorPolicy.maxFailedRecords (0)" in message and "oops" not in message
    assert keys(s3_server, "jobs", "bad/out0/_kubeinfer/done/") == []


def test_a_model_that_cannot_load_fails_at_once(models_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"this is not an onnx model")
    (tmp_path / "in").mkdir()
    (tmp_path / "in/a.csv").write_bytes(b"1,2,3,4\n")
    env = batch_env(tmp_path, model_uri=f"file://{broken}", input_uri=f"file://{tmp_path}/in/",
                    output_uri=f"file://{tmp_path}/out/")
    assert run("plan", env).rc == 0
    work = run("work", env, timeout=60)
    assert work.rc == EXIT_MODEL_FAILED, work.log
    assert work.seconds < 60
    assert "failed to load" in work.report["error"]


def test_image_model_over_http(models_dir: Path, tmp_path: Path) -> None:
    iris = models_dir / "iris.onnx"
    server = start_runtime("model-server", {"KUBEINFER_MODEL_URI": f"file://{iris}"},
                           tmp_path / "logs")
    try:
        (tmp_path / "in").mkdir()
        x, data = csv_rows(3000)
        (tmp_path / "in/a.csv").write_bytes(data)
        env = batch_env(tmp_path, model_url=server.url, input_uri=f"file://{tmp_path}/in/",
                        output_uri=f"file://{tmp_path}/out/", max_batch_payload_bytes="20000",
                        max_concurrent_transforms="4")
        assert run("plan", env).rc == 0
        work = run("work", env)
        assert work.rc == 0, work.log
        assert run("finalize", env).rc == 0
        assert (tmp_path / "out/a.csv.out").read_bytes() == iris_labels(iris, x)
    finally:
        server.stop()


def test_image_execution_parameters_apply_where_the_job_set_none(tmp_path: Path) -> None:
    port, log = free_port(), tmp_path / "requests.jsonl"
    image = subprocess.Popen([sys.executable, "-m", "tests.support.batch_image", str(port),
                              str(log)], cwd=REPO, preexec_fn=die_with_parent)
    try:
        wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/ping"), 30, "the image")
        (tmp_path / "in").mkdir()
        (tmp_path / "in/a.csv").write_bytes(b"".join(f"{i},1\n".encode() for i in range(30))
                                            + b"bad,1\n")
        env = batch_env(tmp_path, model_url=f"http://127.0.0.1:{port}",
                        input_uri=f"file://{tmp_path}/in/", output_uri=f"file://{tmp_path}/out/",
                        max_failed_records="1")
        assert run("plan", env).rc == 0
        work = run("work", env)
        assert work.rc == 0, work.log
        assert run("finalize", env).rc == 0
        requests = [json.loads(x) for x in log.read_text().splitlines()]
        # SINGLE_RECORD and MaxConcurrentTransforms 3 from the image, as SageMaker applies them.
        assert {r["records"] for r in requests} == {1} and len(requests) == 30
        assert 2 <= max(r["in_flight"] for r in requests) <= 3
        assert (tmp_path / "out/a.csv.out").read_bytes() == b"".join(
            f"{i + 1.0}\n".encode() for i in range(30))
        errors = (tmp_path / "out/_errors.jsonl").read_text()
        assert '"record":31' in errors and "a value is not a number" in errors
        # The job's own settings win over the image's.
        log.unlink()
        own = {**env, "KUBEINFER_OUTPUT_URI": f"file://{tmp_path}/out2/",
               "KUBEINFER_BATCH_STRATEGY": "MultiRecord", "KUBEINFER_MAX_FAILED_RECORDS": "0"}
        (tmp_path / "in/a.csv").write_bytes(b"1,1\n2,2\n")
        assert run("plan", own).rc == 0
        assert run("work", own).rc == 0
        assert [json.loads(x)["records"] for x in log.read_text().splitlines()] == [2]
    finally:
        stop_process(image)  # type: ignore[arg-type]


def test_invalid_settings_are_refused_readably(tmp_path: Path) -> None:
    result = run("work", batch_env(tmp_path, max_concurrent_transforms="0"), timeout=60)
    assert result.rc == EXIT_BAD_INPUT
    assert "KUBEINFER_MAX_CONCURRENT_TRANSFORMS" in result.log
    assert "KUBEINFER_MAX_CONCURRENT_TRANSFORMS" in result.report["error"]


def test_a_gated_step_waits_for_its_word_and_leaves_on_eof(models_dir: Path,
                                                           tmp_path: Path) -> None:
    """Local mode starts a step ahead (KUBEINFER_START_GATE): it runs only on a line on
    stdin, and an EOF sends it away before it touches anything."""
    (tmp_path / "in").mkdir()
    x, data = csv_rows(100)
    (tmp_path / "in/a.csv").write_bytes(data)
    env = batch_env(tmp_path, model_uri=f"file://{models_dir / 'iris.onnx'}",
                    input_uri=f"file://{tmp_path}/in/", output_uri=f"file://{tmp_path}/out/",
                    start_gate="true")

    def gated(step: str, word: bytes) -> tuple[int, str]:
        report = tmp_path / f"{step}.json"
        proc = subprocess.Popen([sys.executable, "-m", "kubeinfer_runtime", "batch", step],
                                env={**env, "KUBEINFER_REPORT_FILE": str(report)},
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
        out, _ = proc.communicate(word, timeout=120)
        return proc.returncode, out.decode(errors="replace")

    # EOF: nothing planned, nothing written.
    rc, log = gated("plan", b"")
    assert rc == 143, log
    assert not (tmp_path / "out").exists() and not (tmp_path / "plan.json").exists()
    # A line: each step runs as it would have.
    for step in ("plan", "work", "finalize"):
        rc, log = gated(step, b"go\n")
        assert rc == 0, f"{step}: {log}"
    assert (tmp_path / "out/a.csv.out").read_bytes() == \
        iris_labels(models_dir / "iris.onnx", x)
