"""The CompilationJob state machine, step by step, on an explicit clock.

Each test feeds ``decide`` what the Job and its pods report at one moment,
applies the decision the way the handler does (the new status becomes the old
one) and checks what the operator does next and what ``kubectl get kcj`` shows.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from kubeinfer_operator.reconcile.compile_status import (
    Decision,
    JobInfo,
    Observed,
    PodView,
    decide,
    invalid_status,
    is_terminal,
    outcome_text,
    pod_view,
    report_status,
)
from kubeinfer_operator.reconcile.transform_observe import JobView
from kubeinfer_runtime.contract.compile import (
    EXIT_BAD_INPUT,
    CandidateName,
    CandidateSummary,
    CompileReport,
)

T0 = datetime(2026, 12, 6, 12, 0, 0, tzinfo=UTC)
HASH = "run-1"

REPORT = CompileReport(
    ok=True, artifact_uri="s3://compiled/mlp/artifact.tar.gz",
    artifact_dir_uri="s3://compiled/mlp/artifact", sha256="ab" * 32, source_sha256="cd" * 32,
    target="native", target_cpu="znver4", chosen=CandidateName.ORT_INT8, backend="onnx",
    speedup=2.4567, max_abs_diff=None, top1_agreement=0.995,
    verification="timed on this host (znver4), 1 thread",
    reason="onnxruntime-int8 is 2.46x faster and keeps 99.5% top-1 agreement",
    batch_sizes=[1, 64], seconds=12.34,
    candidates=[
        CandidateSummary(name=CandidateName.ORT_FP32, p50_ms={1: 0.024}, speedup=1.0,
                         max_abs_diff=0.0, accurate=True, note="baseline"),
        CandidateSummary(name=CandidateName.ORT_INT8, p50_ms={1: 0.011}, speedup=2.4567,
                         top1_agreement=0.995, accurate=True, chosen=True, note="fastest"),
        CandidateSummary(name=CandidateName.TVM_UNTUNED, speedup=0.02, max_abs_diff=3e-7,
                         accurate=True, note="50x slower"),
    ])


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def cond(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == type_)


def job(*, complete: bool = False, failure: tuple[str, str] | None = None,
        **kw: Any) -> JobView:
    return JobView(exists=True, run_hash=HASH, complete=complete, failure=failure, **kw)


def pod(message: str = "", *, code: int | None = 0, name: str = "mlp-compile-abcde",
        at_: str = "2026-12-06T12:00:05Z") -> PodView:
    phase = "Running" if code is None else ("Succeeded" if code == 0 else "Failed")
    return PodView(name=name, phase=phase, exit_code=code, message=message, finished_at=at_)


class Run:
    """A CompilationJob through reconciles: the status written by one is read by the next."""

    def __init__(self, **kw: Any) -> None:
        self.info = JobInfo(name="mlp", namespace="ml", generation=1, run_hash=HASH,
                            status={}, model="model s3://models/mlp.onnx", target="native",
                            max_runtime_s=900, **kw)

    def step(self, now: datetime, job_: JobView | None = None,
             pods: tuple[PodView, ...] = ()) -> Decision:
        d = decide(self.info, Observed(job=job_ or JobView(), pods=pods), now)
        self.info = replace(self.info, status=d.status)
        return d


def test_create_then_compiling_then_complete_with_the_report() -> None:
    run = Run()
    first = run.step(at(0))
    assert first.create and not first.delete
    assert first.status["phase"] == "Compiling"
    running = cond(first.status, "Running")
    assert (running["status"], running["reason"]) == ("True", "Compiling")
    assert running["message"] == "Compiling model s3://models/mlp.onnx for native"
    assert first.status["startTime"] == "2026-12-06T12:00:00Z"
    assert first.status["target"] == "native" and first.status["observedGeneration"] == 1

    # Duplicate events while it runs: nothing new to create.
    again = run.step(at(5), job(active=1), (pod(code=None),))
    assert not again.create and again.status["phase"] == "Compiling"

    done = run.step(at(30), job(complete=True, succeeded=1),
                    (pod(REPORT.termination_message().decode()),))
    s = done.status
    assert s["phase"] == "Complete" and is_terminal(s)
    complete = cond(s, "Complete")
    assert complete["reason"] == "Compiled"
    assert complete["message"] == (
        "onnxruntime-int8 (onnx) for native (znver4): 2.46x onnxruntime fp32, top-1 "
        "agreement 99.50%; artifact s3://compiled/mlp/artifact.tar.gz")
    assert cond(s, "Running")["status"] == "False"
    assert (s["artifactUri"], s["sha256"], s["backend"], s["chosen"], s["speedup"]) == (
        "s3://compiled/mlp/artifact.tar.gz", "ab" * 32, "onnx", "onnxruntime-int8", 2.457)
    assert (s["top1Agreement"], s["targetCpu"], s["batchSizes"]) == (0.995, "znver4", [1, 64])
    assert "maxAbsDiff" not in s  # unknown, not zero
    assert s["verification"].startswith("timed on this host")
    assert [c["name"] for c in s["candidates"]] == ["onnxruntime-fp32", "onnxruntime-int8",
                                                    "tvm-untuned"]
    assert s["candidates"][1] == {"name": "onnxruntime-int8", "speedup": 2.457,
                                  "top1Agreement": 0.995, "accurate": True, "chosen": True,
                                  "note": "fastest"}
    assert s["completionTime"] == "2026-12-06T12:00:30Z"

    # Monotonic: whatever the Job says later, the status stays.
    later = run.step(at(60), job(failure=("BackoffLimitExceeded", "x")))
    assert later.status == s and later.done and not later.create


def test_nothing_faster_keeps_onnxruntime_and_says_why() -> None:
    kept = REPORT.model_copy(update={
        "chosen": CandidateName.ORT_FP32, "speedup": 1.0, "max_abs_diff": 0.0,
        "top1_agreement": None, "tvm_status": "not compilable with TVM: ops ZipMap",
        "reason": "no candidate was at least 1.05x faster"})
    run = Run()
    run.step(at(0))
    d = run.step(at(20), job(complete=True), (pod(kept.model_dump_json()),))
    complete = cond(d.status, "Complete")
    assert complete["reason"] == "OnnxRuntimeKept"
    assert complete["message"] == (
        "onnxruntime fp32 kept on native (znver4): no candidate was at least 1.05x faster; "
        "artifact s3://compiled/mlp/artifact.tar.gz")
    no_reason = kept.model_copy(update={"reason": ""})
    assert outcome_text(no_reason) == ("Nothing beat onnxruntime fp32 on native (znver4): the "
                                       "artifact is the ONNX model, served by onnxruntime")
    assert d.status["tvmStatus"] == "not compilable with TVM: ops ZipMap"


def test_a_cross_target_is_verified_not_timed() -> None:
    arm = REPORT.model_copy(update={
        "target": "aarch64", "target_cpu": "", "chosen": CandidateName.TVM_UNTUNED,
        "backend": "tvm", "speedup": None, "max_abs_diff": 5.4e-7, "top1_agreement": None,
        "verification": "verified under emulation (qemu-aarch64), not timed"})
    assert outcome_text(arm) == ("tvm-untuned (tvm) for aarch64: verified under emulation "
                                 "(qemu-aarch64), not timed, max abs diff 5.4e-07")
    assert "speedup" not in report_status(arm)
    quantized = REPORT.model_copy(update={"max_abs_diff": 0.038})
    assert outcome_text(quantized).endswith(
        "2.46x onnxruntime fp32, top-1 agreement 99.50%, max abs diff 3.8e-02")
    unknown = REPORT.model_copy(update={"top1_agreement": None})
    assert outcome_text(unknown).endswith("2.46x onnxruntime fp32, accuracy not reported")


def test_bad_input_fails_at_once_naming_the_pod_and_the_error() -> None:
    run = Run()
    run.step(at(0))
    said = CompileReport(ok=False, target="native",
                         error="Model s3://models/mlp.onnx is not an ONNX model: parse error")
    d = run.step(at(3), job(failed=1, failure=("PodFailurePolicy", "Container compile for pod "
                                                "ml/mlp-compile-x exited with 42")),
                 (pod(said.model_dump_json(), code=EXIT_BAD_INPUT, name="mlp-compile-x"),))
    failed = cond(d.status, "Failed")
    assert failed["reason"] == "BadInput"
    assert failed["message"] == (
        "Compilation failed: Model s3://models/mlp.onnx is not an ONNX model: parse error "
        "(pod ml/mlp-compile-x, exit code 42; kubectl logs -n ml mlp-compile-x -c compile)")
    assert d.status["phase"] == "Failed" and not d.create and not d.delete


def test_retries_are_shown_then_the_backoff_limit_fails_it() -> None:
    run = Run()
    run.step(at(0))
    crash = pod("Traceback ...\nMemoryError", code=137, at_="2026-12-06T12:00:04Z",
                name="mlp-compile-a")
    d = run.step(at(5), job(failed=1, active=1), (crash, pod(code=None, name="mlp-compile-b")))
    assert d.status["phase"] == "Compiling"
    assert cond(d.status, "Running")["message"].endswith("(retry 1 after: Traceback ... | "
                                                         "MemoryError)")
    d = run.step(at(9), job(failed=3, failure=("BackoffLimitExceeded", "Job has reached the "
                                                "specified backoff limit")), (crash,))
    failed = cond(d.status, "Failed")
    assert failed["reason"] == "BackoffLimitExceeded"
    assert "MemoryError (pod ml/mlp-compile-a, exit code 137" in failed["message"]


def test_the_deadline_says_which_field_to_raise() -> None:
    run = Run()
    run.step(at(0))
    d = run.step(at(900), job(failure=("DeadlineExceeded", "Job was active longer than "
                                                           "specified deadline")))
    failed = cond(d.status, "Failed")
    assert failed["reason"] == "DeadlineExceeded"
    assert failed["message"] == (
        "The compilation ran longer than 900 s (Job ml/mlp-compile); raise "
        "spec.stoppingCondition.maxRuntimeInSeconds or lower spec.tuning.budgetSeconds")


def test_a_complete_job_without_a_report_fails() -> None:
    run = Run()
    run.step(at(0))
    d = run.step(at(10), job(complete=True), (pod("some log tail, not JSON"),))
    assert cond(d.status, "Failed")["reason"] == "NoReport"
    # A report cut at 4 KiB is not a report either.
    cut = REPORT.model_dump_json()[:100]
    d = Run().step(at(10), job(complete=True), (pod(cut),))
    assert cond(d.status, "Failed")["reason"] == "NoReport"


def test_a_job_of_another_spec_fails_the_job_and_stops_it() -> None:
    run = Run()
    run.step(at(0))
    d = run.step(at(1), replace(job(active=1), run_hash="other"))
    assert cond(d.status, "Failed")["reason"] == "SpecChanged"
    assert d.delete
    assert "delete it and create it again" in cond(d.status, "Failed")["message"]


def test_ttl_deletes_the_job_then_is_done() -> None:
    run = Run(ttl_s=30)
    run.step(at(0))
    d = run.step(at(10), job(complete=True), (pod(REPORT.model_dump_json()),))
    assert not d.delete and not d.done
    d = run.step(at(20), job(complete=True))
    assert not d.delete and not d.done
    d = run.step(at(41), job(complete=True))
    assert d.delete and not d.done
    d = run.step(at(42))
    assert d.done and not d.delete
    # Without a TTL a finished job is done at once and keeps its Job.
    keep = Run()
    keep.step(at(0))
    keep.step(at(10), job(complete=True), (pod(REPORT.model_dump_json()),))
    d = keep.step(at(11), job(complete=True))
    assert d.done and not d.delete


def test_invalid_status_is_failed_at_once() -> None:
    info = Run().info
    s = invalid_status(info, "InvalidSpec", "CompilationJob ml/mlp is invalid: spec.output.uri",
                       at(0))
    assert s["phase"] == "Failed" and cond(s, "Failed")["reason"] == "InvalidSpec"
    assert is_terminal(s)


def test_pod_view_reads_the_compiler_container_and_init_containers() -> None:
    obj = {"metadata": {"name": "mlp-compile-x"}, "status": {
        "phase": "Failed",
        "containerStatuses": [
            {"name": "other", "state": {"terminated": {"exitCode": 0, "message": "no"}}},
            {"name": "compile", "state": {"terminated": {
                "exitCode": 42, "message": '{"ok": false, "error": "bad"}',
                "finishedAt": "2026-12-06T12:00:05Z"}}}]}}
    view = pod_view(obj)
    assert (view.name, view.phase, view.exit_code, view.finished_at) == (
        "mlp-compile-x", "Failed", 42, "2026-12-06T12:00:05Z")
    assert view.message == '{"ok": false, "error": "bad"}'
    # A variant's compile step is an init container of the model server's pod.
    init = {"metadata": {"name": "p"}, "status": {"phase": "Running", "initContainerStatuses": [
        {"name": "compile", "state": {"terminated": {"exitCode": 0, "message": "{}"}}}]}}
    assert pod_view(init).exit_code == 0
    assert pod_view({"metadata": {"name": "p"}, "status": {}}).exit_code is None
