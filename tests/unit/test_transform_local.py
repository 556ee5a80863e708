"""Local mode's TransformJob pieces that run nothing: the exit policy, progress, loading,
the CLI's refusals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from kubeinfer_operator.cli import _kinds, app
from kubeinfer_operator.errors import SpecError
from kubeinfer_operator.local.paths import EndpointPaths
from kubeinfer_operator.local.state import DesiredSpec, write_desired
from kubeinfer_operator.local.transform_manifest import (
    load_transform_file,
    parse_transform_jobs,
)
from kubeinfer_operator.local.transform_policy import Next, on_exit
from kubeinfer_operator.local.transform_state import (
    JobPaths,
    JobPhase,
    JobState,
    WorkerState,
    first_errors,
    write_job_state,
)
from kubeinfer_operator.local.transform_view import (
    add,
    duration,
    job_progress,
    progress_text,
    status_row,
)
from kubeinfer_runtime.contract.batch import JobSummary, PlanReport, WorkerReport

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KUBEINFER_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


# -- exits -------------------------------------------------------------------------------------


def test_exits_follow_the_pod_failure_policy() -> None:
    assert on_exit(0, restarts=0, retries=3).next is Next.DONE
    model = on_exit(43, restarts=0, retries=3, tolerant=True)
    assert (model.next, model.reason) == (Next.STOP_JOB, "ModelFailed")
    bad = on_exit(42, restarts=0, retries=3)
    assert (bad.next, bad.reason) == (Next.STOP_JOB, "BadInput")
    assert on_exit(42, restarts=0, retries=3, tolerant=True).next is Next.FAIL
    crash = [on_exit(1, restarts=n, retries=3) for n in range(4)]
    assert [c.next for c in crash] == [Next.RESTART] * 3 + [Next.STOP_JOB]
    assert [c.delay_s for c in crash[:3]] == [1.0, 2.0, 4.0]
    assert crash[3].reason == "BackoffLimitExceeded"
    assert on_exit(-9, restarts=0, retries=0).next is Next.STOP_JOB  # SIGKILL, no retries left


# -- progress ----------------------------------------------------------------------------------


def _state(**kw: Any) -> JobState:
    base: dict[str, Any] = {"name": "score", "runner_pid": 1, "phase": JobPhase.RUNNING,
                            "plan": PlanReport(shards=8, objects=4, bytes=8000),
                            "work_started_at": 100.0}
    base.update(kw)
    return JobState(**base)


def test_progress_sums_workers_and_their_earlier_attempts() -> None:
    crashed = WorkerReport(shards_assigned=4, shards_done=2, records=200, bytes_in=2000)
    state = _state(workers=[WorkerState(index=0, earlier=crashed), WorkerState(index=1)])
    current = {0: WorkerReport(shards_assigned=4, shards_skipped=2, shards_done=1, records=100,
                               bytes_in=1000),
               1: WorkerReport(shards_assigned=4, shards_done=1, records=100, bytes_in=1000)}
    p = job_progress(state, current, now=110.0)
    assert (p.shards, p.shards_done, p.records, p.bytes_done) == (8, 4, 400, 4000)
    assert p.fraction == 0.5 and p.records_per_s == 40.0 and p.eta_s == 10.0
    assert progress_text(p) == "4/8 shards, 400 records, 40 records/s"
    # A worker whose progress file is not there yet counts its earlier attempts.
    assert job_progress(state, {}, now=110.0).shards_done == 2


def test_progress_of_a_complete_job_is_its_summary() -> None:
    state = _state(phase=JobPhase.COMPLETE, finished_at=120.0,
                   summary=JobSummary(objects=4, shards=8, records=1000, failed_records=2))
    p = job_progress(state, {}, now=500.0)
    assert (p.shards_done, p.records, p.failed_records, p.fraction) == (8, 1000, 2, 1.0)
    assert p.records_per_s == 50.0 and p.eta_s is None
    assert progress_text(p) == "8/8 shards, 1,000 records, 2 bad, 50 records/s"
    row = status_row(state, p, running=False)
    assert (row["phase"], row["progress"], row["records"]) == ("Complete", "8/8", 1000)
    # A runner that died without saying so shows as Stopped.
    assert status_row(_state(), p, running=False)["phase"] == "Stopped"


def test_add_and_duration() -> None:
    a = WorkerReport(shards_done=2, shards_skipped=1, records=5, error="first")
    b = WorkerReport(shards_done=1, records=7)
    assert add(a, b) == WorkerReport(shards_done=3, records=12, error="first")
    assert [duration(s) for s in (None, 5, 75, 3725)] == ["-", "5s", "1m15s", "1h02m"]


# -- loading -----------------------------------------------------------------------------------


JOB = {"apiVersion": "kubeinfer.io/v1alpha1", "kind": "TransformJob",
       "metadata": {"name": "score"},
       "spec": {"endpointRef": {"name": "iris"},
                "input": {"uri": "file://data/in/"}, "output": {"uri": "file://out/"}}}
ENDPOINT = {"apiVersion": "kubeinfer.io/v1alpha1", "kind": "Endpoint",
            "metadata": {"name": "iris"},
            "spec": {"variants": [{"name": "main", "model": {"uri": "file://models/iris.onnx"},
                                   "env": [{"name": "KUBEINFER_INFERENCE_THREADS",
                                            "value": "2"}]}]}}


def test_examples_load_with_paths_resolved_against_the_file() -> None:
    [item] = load_transform_file(REPO / "examples" / "transform-job.yaml")
    env = item.plan.env
    assert env["KUBEINFER_MODEL_URI"] == f"file://{REPO}/examples/models/iris.onnx"
    assert env["KUBEINFER_INPUT_URI"] == f"file://{REPO}/examples/data/iris-csv/"
    assert env["KUBEINFER_OUTPUT_URI"] == "file:///tmp/kubeinfer-examples/iris-csv/"
    # What `up` dispatches on: the manifest's kinds.
    assert _kinds(REPO / "examples" / "transform-job.yaml") == {"TransformJob"}
    assert _kinds(REPO / "examples" / "realtime-endpoint.yaml") == {"Endpoint"}


def test_endpoint_ref_resolves_in_the_same_file(tmp_path: Path) -> None:
    [item] = parse_transform_jobs(yaml.safe_dump_all([ENDPOINT, JOB]), source="f.yaml",
                                  base_dir="/work/jobs")
    assert item.borrowed == ("iris",)
    assert item.plan.env["KUBEINFER_MODEL_URI"] == "file:///work/jobs/models/iris.onnx"
    assert item.plan.env["KUBEINFER_INFERENCE_THREADS"] == "2"  # the variant's env comes along
    assert item.plan.model_description == ("Endpoint iris variant main: model "
                                           "file://models/iris.onnx")


def test_endpoint_ref_resolves_against_a_local_endpoints_folder(home: Path) -> None:
    write_desired(EndpointPaths.for_endpoint("iris", home), DesiredSpec(
        generation=1, manifest=ENDPOINT, base_dir="/srv/endpoints"))
    [item] = parse_transform_jobs(yaml.safe_dump(JOB), source="f.yaml", base_dir="/work/jobs")
    assert item.borrowed == ()
    # The model's relative URI is the Endpoint's (its manifest's folder); the data the job's.
    assert item.plan.env["KUBEINFER_MODEL_URI"] == "file:///srv/endpoints/models/iris.onnx"
    assert item.plan.env["KUBEINFER_INPUT_URI"] == "file:///work/jobs/data/in/"


def test_every_problem_of_every_document_at_once() -> None:
    image = {**JOB, "metadata": {"name": "img"},
             "spec": {**JOB["spec"], "endpointRef": None,
                      "containers": [{"name": "m", "image": "example.test/m:1"}]}}
    typo = {**JOB, "metadata": {"name": "typo"}, "spec": {**JOB["spec"], "maxPayloadInMb": 1}}
    with pytest.raises(SpecError) as exc:
        parse_transform_jobs(yaml.safe_dump_all([JOB, image, typo, {"kind": "Deployment"}]),
                             source="f.yaml", base_dir="/w")
    lines = str(exc.value).splitlines()
    assert any(line.startswith("f.yaml document 1 (TransformJob 'score'): spec.endpointRef: no "
                               "Endpoint 'iris' in f.yaml and no local endpoint 'iris'")
               for line in lines)
    assert any("document 2 (TransformJob 'img'): spec.containers[0].image: image steps run "
               "only on Kubernetes" in line for line in lines)
    assert any("document 3 (TransformJob 'typo'): spec.maxPayloadInMb: unknown field" in line
               for line in lines)
    assert any("document 4: kind: 'Deployment' cannot run beside a TransformJob" in line
               for line in lines)


def test_first_errors_describe_records_never_their_bytes(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "_kubeinfer" / "errors").mkdir(parents=True)
    (out / "_kubeinfer" / "errors" / "00003.jsonl").write_text(
        '{"key": "in/a.csv", "record": 17, "offset": 1234, "error": "not a number"}\n')
    assert first_errors(f"file://{out}/") == ["in/a.csv, record 17, byte offset 1234: not a "
                                              "number"]
    (out / "_errors.jsonl").write_text("".join(
        f'{{"key": "b.csv", "record": {n}, "error": "x"}}\n' for n in range(9)))
    assert len(first_errors(f"file://{out}/")) == 5
    assert first_errors("s3://bucket/out/") == []


# -- the CLI -----------------------------------------------------------------------------------


def test_up_refuses_an_invalid_job_with_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "job.yaml"
    bad.write_text(yaml.safe_dump({**JOB, "spec": {**JOB["spec"], "maxPayloadInMB": 500}}))
    result = runner.invoke(app, ["up", "-f", str(bad)])
    assert result.exit_code == 2
    assert "spec.maxPayloadInMB: Input should be less than or equal to 100" in result.output
    result = runner.invoke(app, ["up", "-f", str(bad), "--port", "8123"])
    assert result.exit_code == 2 and "--port" in result.output


def test_status_lists_jobs_and_down_forgets_a_finished_one(home: Path) -> None:
    paths = JobPaths.for_job("score", home)
    write_job_state(paths, _state(phase=JobPhase.FAILED, reason="BadInput",
                                  message="Worker 0 failed: record 2 is bad",
                                  workers=[WorkerState(index=0, state="failed")]))
    result = runner.invoke(app, ["status", "--json"])
    [row] = __import__("json").loads(result.stdout)["jobs"]
    assert (row["job"], row["phase"], row["reason"]) == ("score", "Failed", "BadInput")
    result = runner.invoke(app, ["status", "score"])
    assert result.exit_code == 0 and "TransformJobs" in result.output
    result = runner.invoke(app, ["down", "score"])
    assert result.exit_code == 0 and "Removed TransformJob score" in result.output
    assert not paths.root.exists()
    result = runner.invoke(app, ["status", "score"])
    assert result.exit_code == 1
