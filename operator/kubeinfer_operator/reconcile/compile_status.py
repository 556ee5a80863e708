"""A CompilationJob's next step and status, from what its Job and pods report: PURE.

The state machine (one call of ``decide`` per reconcile; the clock is an argument):

    (nothing) ──create Job──▶ Compiling ──Job Complete + CompileReport──▶ Complete
                                  └──Job Failed (bad input, deadline, retries spent)──▶ Failed

* The compiler's report (``CompileReport`` of the runtime's contract) is its
  pod's termination message; the Job's own status says whether it completed
  or failed and why (``DeadlineExceeded``, ``BackoffLimitExceeded``,
  ``PodFailurePolicy``).
* ``Complete`` and ``Failed`` are monotonic: once either is True the status
  never changes again; only the TTL clean-up of the Job follows.
* The Job carries the spec's hash: a Job rendered from another spec fails the
  job (``SpecChanged``) instead of reporting another compilation's result.
* ``report_status`` (report → status fields) and ``outcome_text`` (one line
  saying what was chosen and why) are shared with local mode and with the
  variants that compile before they serve (``variant_compile_status``: their
  model-server pods' compile init container), so every place says it alike.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from kubeinfer_operator.reconcile.job_status import COMPLETE as COMPLETE
from kubeinfer_operator.reconcile.job_status import FAILED as FAILED
from kubeinfer_operator.reconcile.job_status import StatusBuilder
from kubeinfer_operator.reconcile.job_status import is_terminal as is_terminal
from kubeinfer_operator.reconcile.status import condition, timestamp
from kubeinfer_operator.reconcile.transform_observe import (
    JobView,
    detail,
    parse_report,
    parse_time,
)
from kubeinfer_operator.render import k8s_meta as meta
from kubeinfer_operator.render.compile_jobs import CONTAINER, job_name
from kubeinfer_runtime.contract.compile import EXIT_BAD_INPUT, CandidateName, CompileReport

RUNNING = "Running"

PHASE_PENDING = "Pending"
PHASE_COMPILING = "Compiling"

REASON_COMPILING = "Compiling"
REASON_INVALID_SPEC = "InvalidSpec"
REASON_SPEC_CHANGED = "SpecChanged"
REASON_DEADLINE = "DeadlineExceeded"
REASON_BAD_INPUT = "BadInput"
REASON_NO_REPORT = "NoReport"
#: Complete, and a candidate beat onnxruntime fp32: the artifact is compiled.
REASON_COMPILED = "Compiled"
#: Complete, and nothing beat onnxruntime fp32: the artifact serves the ONNX model.
REASON_ONNX_KEPT = "OnnxRuntimeKept"


@dataclass(frozen=True)
class JobInfo:
    """The CompilationJob itself: what the decision needs of it."""

    name: str
    namespace: str
    generation: int
    run_hash: str
    status: Mapping[str, Any]
    model: str = ""
    target: str = ""
    max_runtime_s: int | None = None
    ttl_s: int | None = None


@dataclass(frozen=True)
class PodView:
    """One pod of the Job: how its compiler container ended (if it did)."""

    name: str
    phase: str
    exit_code: int | None = None
    #: The compiler's termination message: a CompileReport, or a log tail.
    message: str = ""
    finished_at: str = ""


def pod_view(obj: Mapping[str, Any], container: str = CONTAINER) -> PodView:
    """``container``'s last termination in pod ``obj`` (also an init container's)."""
    meta = obj.get("metadata") or {}
    status = obj.get("status") or {}
    exit_code, message, finished_at = None, "", ""
    for c in [*(status.get("initContainerStatuses") or []),
              *(status.get("containerStatuses") or [])]:
        if isinstance(c, Mapping) and c.get("name") == container:
            terminated = (c.get("state") or {}).get("terminated") or (
                c.get("lastState") or {}).get("terminated") or {}
            if terminated:
                exit_code = terminated.get("exitCode")
                message = str(terminated.get("message") or "")
                finished_at = str(terminated.get("finishedAt") or "")
    return PodView(name=str(meta.get("name")), phase=str(status.get("phase") or ""),
                   exit_code=exit_code if isinstance(exit_code, int) else None,
                   message=message, finished_at=finished_at)


@dataclass(frozen=True)
class Observed:
    """The CompilationJob's Job (if any) and its pods, as listed."""

    job: JobView = field(default_factory=JobView)
    pods: tuple[PodView, ...] = ()


@dataclass(frozen=True)
class Decision:
    status: dict[str, Any]
    #: Create the Job now.
    create: bool = False
    #: Delete the Job (stopped after a spec change, or cleaned up after the TTL).
    delete: bool = False
    #: Finished, and nothing is left to clean up: no further sync can change anything.
    done: bool = False


# -- what a report says ---------------------------------------------------------------------


def outcome_text(report: CompileReport) -> str:
    """One line: what was chosen, how it compares with onnxruntime fp32, and why."""
    where = f"{report.target}" + (f" ({report.target_cpu})" if report.target_cpu else "")
    chosen = report.chosen.value if report.chosen else "?"
    if report.chosen in (None, CandidateName.ORT_FP32):
        # The compiler's reason already says the ONNX model is served, and why.
        return (f"onnxruntime fp32 kept on {where}: {report.reason}" if report.reason else
                f"Nothing beat onnxruntime fp32 on {where}: the artifact is the ONNX model, "
                "served by onnxruntime")
    # A quantized candidate's gate is top-1 agreement; its max abs diff is context.
    accuracy = ", ".join(
        ([f"top-1 agreement {report.top1_agreement:.2%}"]
         if report.top1_agreement is not None else [])
        + ([f"max abs diff {report.max_abs_diff:.1e}"] if report.max_abs_diff is not None
           else [])) or "accuracy not reported"
    speed = (f"{report.speedup:.2f}x onnxruntime fp32" if report.speedup is not None
             else report.verification or "not timed")
    return f"{chosen} ({report.backend}) for {where}: {speed}, {accuracy}"


def report_status(report: CompileReport) -> dict[str, Any]:
    """The status fields a successful report fills (None values left out)."""
    fields: dict[str, Any] = {
        "artifactUri": report.artifact_uri or None,
        "sha256": report.sha256 or None,
        "sourceSha256": report.source_sha256 or None,
        "target": report.target or None,
        "targetCpu": report.target_cpu or None,
        "chosen": report.chosen.value if report.chosen else None,
        "backend": report.backend or None,
        "speedup": round(report.speedup, 3) if report.speedup is not None else None,
        "maxAbsDiff": report.max_abs_diff,
        "top1Agreement": report.top1_agreement,
        "verification": report.verification or None,
        "reason": report.reason or None,
        "tvmStatus": report.tvm_status or None,
        "batchSizes": report.batch_sizes or None,
        "tuningTrials": report.tuning_trials,
        "tuningCacheHit": report.tuning_cache_hit,
        "compileSeconds": round(report.seconds, 1),
        "candidates": [{k: v for k, v in {
            "name": c.name.value, "speedup": round(c.speedup, 3) if c.speedup else c.speedup,
            "maxAbsDiff": c.max_abs_diff, "top1Agreement": c.top1_agreement,
            "accurate": c.accurate, "chosen": c.chosen, "note": c.note}.items()
            if v is not None} for c in report.candidates] or None,
    }
    return {k: v for k, v in fields.items() if v is not None}


def complete_reason(report: CompileReport) -> str:
    return REASON_ONNX_KEPT if report.chosen in (None, CandidateName.ORT_FP32) \
        else REASON_COMPILED


# -- the decision ---------------------------------------------------------------------------


class _Builder(StatusBuilder[JobInfo]):
    """The new status, built from the old one (what was learnt stays)."""

    def __init__(self, info: JobInfo, now: datetime) -> None:
        super().__init__(info, now)
        if info.target:
            self.status.setdefault("target", info.target)

    def running(self, message: str) -> dict[str, Any]:
        gen = self.info.generation
        return self.finish([condition(RUNNING, True, REASON_COMPILING, message, gen)],
                           PHASE_COMPILING)

    def failed(self, reason: str, message: str) -> dict[str, Any]:
        gen = self.info.generation
        self.status["completionTime"] = timestamp(self.now)
        return self.finish([condition(RUNNING, False, FAILED, message, gen),
                            condition(FAILED, True, reason, message, gen)], FAILED)

    def complete(self, reason: str, message: str) -> dict[str, Any]:
        gen = self.info.generation
        self.status["completionTime"] = timestamp(self.now)
        return self.finish([condition(RUNNING, False, COMPLETE, message, gen),
                            condition(COMPLETE, True, reason, message, gen)], COMPLETE)


def _failed_pod(pods: tuple[PodView, ...]) -> PodView | None:
    """The most telling failed pod: bad input first, then the latest."""
    failed = sorted((p for p in pods if p.phase == "Failed" or p.exit_code not in (None, 0)),
                    key=lambda p: p.finished_at, reverse=True)
    return min(failed, key=lambda p: 0 if p.exit_code == EXIT_BAD_INPUT else 1, default=None)


def _failure(info: JobInfo, job: JobView, pods: tuple[PodView, ...]) -> tuple[str, str]:
    """Reason and message of a failed Job, naming the pod and what the compiler said."""
    job_reason, job_message = job.failure or ("Failed", "")
    name = job_name(info.name)
    if job_reason == REASON_DEADLINE:
        return REASON_DEADLINE, (
            f"The compilation ran longer than {info.max_runtime_s or '?'} s (Job "
            f"{info.namespace}/{name}); raise spec.stoppingCondition.maxRuntimeInSeconds or "
            "lower spec.tuning.budgetSeconds")
    pod = _failed_pod(pods)
    if pod is None:
        return job_reason, (f"Job {info.namespace}/{name} failed ({job_reason}): "
                            f"{job_message or 'no pod reported why'}")
    reason = REASON_BAD_INPUT if pod.exit_code == EXIT_BAD_INPUT else job_reason
    said = detail(pod.message) or f"exit code {pod.exit_code}"
    return reason, (f"Compilation failed: {said} (pod {info.namespace}/{pod.name}, exit code "
                    f"{pod.exit_code}; kubectl logs -n {info.namespace} {pod.name} -c "
                    f"{CONTAINER})")


def _report(pods: tuple[PodView, ...]) -> CompileReport | None:
    for pod in sorted(pods, key=lambda p: p.finished_at, reverse=True):
        if pod.phase == "Succeeded" or pod.exit_code == 0:
            report = parse_report(pod.message, CompileReport)
            if report is not None:
                return report
    return None


def decide(info: JobInfo, observed: Observed, now: datetime) -> Decision:
    """The status of the CompilationJob and the one thing to do next."""
    job = observed.job
    if is_terminal(info.status):
        completed = parse_time((info.status or {}).get("completionTime"))
        due = (info.ttl_s is not None and completed is not None
               and (now - completed).total_seconds() >= info.ttl_s)
        return Decision(dict(info.status), delete=due and job.exists,
                        done=info.ttl_s is None or (due and not job.exists))
    b = _Builder(info, now)
    b.status.setdefault("startTime", timestamp(now))
    if job.exists and job.run_hash != info.run_hash:
        return Decision(b.failed(REASON_SPEC_CHANGED,
                                 f"Job {info.namespace}/{job_name(info.name)} was made from "
                                 "another spec than the CompilationJob's now; a CompilationJob "
                                 "is immutable: delete it and create it again"),
                        delete=not job.finished)
    compiling = f"Compiling {info.model or 'the model'} for {info.target or 'its target'}"
    if not job.exists:
        return Decision(b.running(compiling), create=True)
    if job.failure is not None:
        return Decision(b.failed(*_failure(info, job, observed.pods)))
    if not job.complete:
        retried = _failed_pod(observed.pods)
        if retried is not None and job.failed:
            said = detail(retried.message) or f"exit code {retried.exit_code}"
            compiling += f" (retry {job.failed} after: {said})"
        return Decision(b.running(compiling))
    report = _report(observed.pods)
    if report is None or not report.ok:
        return Decision(b.failed(
            REASON_NO_REPORT,
            f"Job {info.namespace}/{job_name(info.name)} completed but no pod left a "
            "successful CompileReport in its termination message; check that the runtime "
            "image matches the operator's version"))
    b.status.update(report_status(report))
    return Decision(b.complete(complete_reason(report),
                               outcome_text(report) + f"; artifact {report.artifact_uri}"))


def invalid_status(info: JobInfo, reason: str, message: str, now: datetime) -> dict[str, Any]:
    """Failed at once: the spec (immutable) can never run."""
    return _Builder(info, now).failed(reason, message)


# -- a variant that compiles before it serves -----------------------------------------------

VARIANT_COMPILING = "Compiling"
VARIANT_COMPILED = "Compiled"
VARIANT_FAILED = "Failed"


def variant_compile_status(pods: Iterable[Mapping[str, Any]],
                           server_hash: str) -> dict[str, Any] | None:
    """What the compile step of a variant's current pods said: the newest finished one's
    report (None: no pod of the current spec yet)."""
    current = [p for p in pods if ((p.get("metadata") or {}).get("annotations") or {}).get(
        meta.ANNOTATION_SERVER_HASH) == server_hash]
    if not current:
        return None
    views = [pod_view(p, CONTAINER) for p in current]
    finished = sorted((v for v in views if v.exit_code is not None),
                      key=lambda v: v.finished_at)
    if not finished:
        return {"phase": VARIANT_COMPILING,
                "message": f"Compiling the model in pod {views[0].name} (init container "
                           f"{CONTAINER}) before its model server starts"}
    latest = finished[-1]
    report = parse_report(latest.message, CompileReport)
    if latest.exit_code != 0 or report is None or not report.ok:
        said = detail(latest.message) or f"exit code {latest.exit_code}"
        return {"phase": VARIANT_FAILED, "pod": latest.name,
                "message": f"Compiling the model failed in pod {latest.name}: {said} "
                           f"(kubectl logs {latest.name} -c {CONTAINER})"}
    fields = {
        "phase": VARIANT_COMPILED, "pod": latest.name, "message": outcome_text(report),
        "chosen": report.chosen.value if report.chosen else None,
        "backend": report.backend or None, "artifactUri": report.artifact_uri or None,
        "speedup": round(report.speedup, 3) if report.speedup is not None else None,
        "maxAbsDiff": report.max_abs_diff, "top1Agreement": report.top1_agreement,
        "cacheHit": report.artifact_cache_hit,
    }
    return {k: v for k, v in fields.items() if v is not None}
