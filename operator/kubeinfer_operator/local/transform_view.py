"""PURE views of a local TransformJob: its progress (bar, ETA) and its ``status`` row.

The runner's state says which step runs and what the plan is; each worker's
progress file (the runtime's running ``WorkerReport``) says how far it got in
its current attempt, and ``WorkerState.earlier`` what its earlier attempts did.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubeinfer_operator.local.transform_state import JobPhase, JobState
from kubeinfer_runtime.contract.batch import WorkerReport


@dataclass(frozen=True)
class JobProgress:
    shards: int = 0
    shards_done: int = 0
    records: int = 0
    failed_records: int = 0
    #: Input bytes as listed by the planner, and read so far (an estimate on resume).
    bytes_total: int = 0
    bytes_done: int = 0
    records_per_s: float | None = None
    eta_s: float | None = None

    @property
    def fraction(self) -> float:
        by_bytes = self.bytes_done / self.bytes_total if self.bytes_total else 0.0
        by_shards = self.shards_done / self.shards if self.shards else 0.0
        return min(1.0, max(by_bytes, by_shards))


def add(a: WorkerReport, b: WorkerReport) -> WorkerReport:
    """Counters of two attempts of one worker (done shards: the most any attempt saw)."""
    return WorkerReport(
        shards_assigned=max(a.shards_assigned, b.shards_assigned),
        shards_started=a.shards_started + b.shards_started,
        shards_done=max(a.shards_done + a.shards_skipped, b.shards_done + b.shards_skipped),
        records=a.records + b.records, failed_records=a.failed_records + b.failed_records,
        bytes_in=a.bytes_in + b.bytes_in, bytes_out=a.bytes_out + b.bytes_out,
        seconds=a.seconds + b.seconds, error=b.error or a.error)


def job_progress(state: JobState, current: Mapping[int, WorkerReport | None],
                 now: float) -> JobProgress:
    """Progress of the job: ``current`` is each worker's progress file (None: none yet)."""
    plan = state.plan
    if plan is None:
        return JobProgress()
    if state.summary is not None and state.phase is JobPhase.COMPLETE:
        s = state.summary
        return JobProgress(shards=plan.shards, shards_done=plan.shards, records=s.records,
                           failed_records=s.failed_records, bytes_total=plan.bytes,
                           bytes_done=plan.bytes, records_per_s=_rate(state, s.records, now))
    done = records = failed = bytes_in = 0
    for worker in state.workers:
        report = add(worker.earlier, current.get(worker.index) or WorkerReport())
        done += report.shards_done
        records += report.records
        failed += report.failed_records
        bytes_in += report.bytes_in
    if state.phase is JobPhase.FINALIZING:
        done = plan.shards
    # Shards skipped on a resume were read by an earlier run: the shard count covers them.
    bytes_done = min(plan.bytes, bytes_in)
    progress = JobProgress(shards=plan.shards, shards_done=min(done, plan.shards),
                           records=records, failed_records=failed, bytes_total=plan.bytes,
                           bytes_done=bytes_done, records_per_s=_rate(state, records, now))
    eta = None
    started = state.work_started_at
    if started is not None and 0 < progress.fraction < 1 and not state.phase.finished:
        elapsed = now - started
        eta = elapsed * (1 - progress.fraction) / progress.fraction
    return JobProgress(**{**progress.__dict__, "eta_s": eta})


def _rate(state: JobState, records: int, now: float) -> float | None:
    start = state.work_started_at
    end = state.finished_at or now
    if start is None or end <= start:
        return None
    return records / (end - start)


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def progress_text(progress: JobProgress) -> str:
    """``12/40 shards, 51,200 records, 8,210 records/s`` (what the bar and status show)."""
    rate = (f", {progress.records_per_s:,.0f} records/s"
            if progress.records_per_s is not None else "")
    failed = f", {progress.failed_records:,} bad" if progress.failed_records else ""
    return (f"{progress.shards_done}/{progress.shards} shards, {progress.records:,} records"
            f"{failed}{rate}")


def status_row(state: JobState, progress: JobProgress, running: bool) -> dict[str, Any]:
    """One row of ``kubeinfer status`` (and its ``--json``)."""
    phase = state.phase.value if running or state.phase.finished else "Stopped"
    return {
        "job": state.name,
        "phase": phase,
        "running": running,
        "progress": f"{progress.shards_done}/{progress.shards}",
        "records": progress.records,
        "failed_records": progress.failed_records,
        "records_per_s": round(progress.records_per_s, 1)
        if progress.records_per_s is not None else None,
        "eta_s": round(progress.eta_s) if progress.eta_s is not None else None,
        "model": state.model,
        "output": state.output_uri,
        "reason": state.reason,
        "message": state.message,
        "runner_pid": state.runner_pid if running else None,
    }
