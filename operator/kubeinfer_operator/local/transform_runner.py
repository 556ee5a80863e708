"""The runner of one local TransformJob: the three steps as processes, to the end.

``python -m kubeinfer_operator.local.transform_runner --state-dir DIR`` (started by
``kubeinfer up``, in the foreground or detached) holds the job's lock, reads
``job.json`` and runs what the cluster runs as Jobs, with the same env:

1. ``kubeinfer-runtime batch plan`` → the PlanReport (shards, objects, bytes);
2. ``min(instanceCount, shards)`` ``batch work`` processes, worker ``i`` taking
   ``KUBEINFER_SHARDS=i/n`` (every n-th shard), each rewriting its progress file;
3. ``batch finalize`` → the JobSummary.

A step's process is started a step early (the workers while the plan is made, the
finalizer while the workers run) with ``KUBEINFER_START_GATE``: it imports what it
needs, then waits for a line on its stdin, so a job does not pay each step's
interpreter and library start-up in turn. Workers beyond ``min(instanceCount,
shards)`` and steps a failure makes unneeded get EOF instead and exit.

Exits follow ``transform_policy`` (the podFailurePolicy's rules). It rewrites
``state.json`` as things change and exits 0 (Complete), 1 (Failed) or 2
(stopped: SIGTERM/SIGINT stop every child, SIGTERM then SIGKILL). Nothing of
the job's own progress lives here: the plan and done markers are under the
output URI, so a later run resumes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel

from kubeinfer_operator.local.job_runner import (
    Failure,
    JobRunner,
    runner_main,
    setup_logging,
)
from kubeinfer_operator.local.process import signal_exit_name, spawn, stop_popen, tail
from kubeinfer_operator.local.state import process_start_time
from kubeinfer_operator.local.transform_policy import (
    STEP_RETRIES,
    ExitDecision,
    Next,
    on_exit,
)
from kubeinfer_operator.local.transform_state import (
    JobPaths,
    JobPhase,
    JobState,
    LocalJob,
    ProcessRecord,
    WorkerState,
    first_errors,
    read_job,
    read_progress,
    write_job_state,
)
from kubeinfer_operator.local.transform_view import add
from kubeinfer_operator.reconcile.transform_observe import detail, parse_report
from kubeinfer_operator.render.transform_names import REASON_DEADLINE, REASON_NO_REPORT
from kubeinfer_runtime.contract.batch import (
    ERRORS_NAME,
    JobSummary,
    PlanReport,
    WorkerReport,
)

log = logging.getLogger("kubeinfer.transform")

R = TypeVar("R", bound=BaseModel)


class Runner(JobRunner[JobPaths, LocalJob, JobState]):
    kind = "TransformJob"
    log = logging.getLogger("kubeinfer.transform")
    deadline_reason = REASON_DEADLINE

    def __init__(self, paths: JobPaths, job: LocalJob, *, tick_s: float = 0.1,
                 grace_s: float = 10.0) -> None:
        super().__init__(paths, job,
                         JobState(name=job.name, runner_pid=os.getpid(),
                                  runner_start_time=process_start_time(os.getpid()),
                                  model=job.model, output_uri=job.output_uri,
                                  started_at=time.time()),
                         tick_s=tick_s, grace_s=grace_s)
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        #: Steps started ahead of their turn, waiting at their gate (also in children).
        self.ahead: dict[str, subprocess.Popen[bytes]] = {}

    # -- files -----------------------------------------------------------------------------

    def save(self) -> None:
        self.state.updated_at = time.time()
        write_job_state(self.paths, self.state)

    def _env(self, name: str, extra: dict[str, str] | None = None) -> dict[str, str]:
        report = self.paths.report_file(name)
        report.parent.mkdir(parents=True, exist_ok=True)
        report.unlink(missing_ok=True)
        env = {**os.environ, **self.job.env,
               "KUBEINFER_REPORT_FILE": str(report),
               "KUBEINFER_MODEL_CACHE_DIR": str(self.paths.root / "cache"),
               **(extra or {})}
        env.pop("JOB_COMPLETION_INDEX", None)
        env.pop("KUBEINFER_START_GATE", None)  # only ``_spawn(gated=True)`` sets it
        return env

    def _read_report(self, name: str, model: type[R]) -> tuple[R | None, str]:
        try:
            text = self.paths.report_file(name).read_text()
        except OSError:
            text = ""
        return parse_report(text, model), text

    def _why(self, name: str, code: int | None) -> str:
        _, text = self._read_report(name, WorkerReport)
        said = detail(text) or detail(tail(self.paths.log_file(name), lines=6))
        how = signal_exit_name(code)
        return f"{said} ({how}; log: {self.paths.log_file(name)})" if said else (
            f"{how}; see {self.paths.log_file(name)}")

    # -- processes -------------------------------------------------------------------------

    def _spawn(self, name: str, step: str, env: dict[str, str], *,
               gated: bool = False) -> subprocess.Popen[bytes]:
        """Start a step; a ``gated`` one imports what it needs, then waits for ``_go``."""
        argv = [sys.executable, "-m", "kubeinfer_runtime", "batch", step]
        with open(self.paths.log_file(name), "ab") as fh:
            fh.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv[2:])}\n".encode())
        if gated:
            env = {**env, "KUBEINFER_START_GATE": "true"}
        proc = spawn(argv, env=env, log_path=self.paths.log_file(name), stdin_pipe=gated)
        self.children[name] = proc
        return proc

    @staticmethod
    def _go(proc: subprocess.Popen[bytes], go: bool = True) -> None:
        """Open a gated step's gate (``go``) or send it away (EOF: it exits 143)."""
        if proc.stdin is None:
            return
        # A step that died before its gate opened is seen by whoever waits on it.
        with contextlib.suppress(OSError):
            if go:
                proc.stdin.write(b"go\n")
            proc.stdin.close()

    def deadline_message(self, deadline: int) -> str:
        return (f"The job ran longer than activeDeadlineSeconds ({deadline}); "
                "raise it or add instances")

    def stop_children(self) -> None:
        for proc in self.ahead.values():
            self._go(proc, go=False)
        self.ahead.clear()
        for proc in list(self.children.values()):
            stop_popen(proc, timeout=self.grace_s)
        self.children.clear()

    def _step(self, name: str, step: str, phase: JobPhase) -> None:
        """Run the planner or the finalizer to its end, restarting it on transient failures
        (the finalizer's first run is the process ``work`` started ahead, gated)."""
        self.state.phase = phase
        restarts = 0
        while True:
            ahead = self.ahead.pop(name, None)
            if ahead is not None:
                proc = ahead
                self._go(proc)
            else:
                proc = self._spawn(name, step, self._env(name))
            self.state.step = ProcessRecord(name=name, pid=proc.pid, restarts=restarts,
                                            start_time=process_start_time(proc.pid))
            self.save()
            while proc.poll() is None:
                self._tick(proc)
            self.children.pop(name, None)
            decision = on_exit(proc.returncode, restarts=restarts, retries=STEP_RETRIES)
            if decision.next is Next.DONE:
                self.state.step = None
                return
            if decision.next is not Next.RESTART:
                raise Failure(decision.reason, f"{phase.value} failed: "
                              f"{self._why(name, proc.returncode)}")
            restarts += 1
            log.warning("%s exited (%s); restart %d in %.0f s", name,
                        signal_exit_name(proc.returncode), restarts, decision.delay_s)
            self._sleep(decision.delay_s)

    def _sleep(self, seconds: float) -> None:
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            self._tick()

    # -- the steps -------------------------------------------------------------------------

    def plan(self) -> PlanReport:
        # The workers start now and import while the plan is made (gated until it is);
        # no more than there are cores: more would not start sooner, and a plan with few
        # shards sends the surplus away.
        for index in range(min(self.job.instance_count, os.cpu_count() or 1)):
            self.ahead[f"worker-{index}"] = self._spawn_worker(index, self.job.instance_count,
                                                               gated=True)
        self._step("planner", "plan", JobPhase.PLANNING)
        report, text = self._read_report("planner", PlanReport)
        if report is None:
            raise Failure(REASON_NO_REPORT, "The planner exited 0 without a PlanReport in "
                          f"{self.paths.report_file('planner')} ({detail(text) or 'empty'})")
        self.state.plan = report
        self.save()
        return report

    def _send_away_ahead(self, names: list[str]) -> None:
        """Stop processes started ahead that will not be needed."""
        for name in names:
            proc = self.ahead.pop(name, None)
            if proc is not None:
                self._go(proc, go=False)
                stop_popen(proc, timeout=self.grace_s)
                self.children.pop(name, None)

    def work(self, plan: PlanReport) -> None:
        # Worker i of instanceCount takes every instanceCount-th shard from i; with fewer
        # shards than instances that is shard i alone, as with i/shards.
        count = min(self.job.instance_count, plan.shards)
        self._send_away_ahead([f"worker-{i}" for i in range(count, self.job.instance_count)])
        self.state.phase = JobPhase.RUNNING
        self.state.work_started_at = time.time()
        self.state.workers = [WorkerState(index=i) for i in range(count)]
        due: dict[int, float] = {i: 0.0 for i in range(count)}
        failures: list[Failure] = []
        while due or any(w.state == "running" for w in self.state.workers):
            now = time.monotonic()
            for index, at in list(due.items()):
                if now >= at:
                    del due[index]
                    self._start_worker(index, self.job.instance_count)
            if "finalizer" not in self.ahead and "finalizer" not in self.children:
                # The finalizer imports while the workers run (gated until they are done).
                self.ahead["finalizer"] = self._spawn("finalizer", "finalize",
                                                      self._env("finalizer"), gated=True)
            for worker in self.state.workers:
                if worker.state != "running":
                    continue
                proc = self.children[f"worker-{worker.index}"]
                if proc.poll() is None:
                    continue
                decision = self._worker_exited(worker, proc)
                if decision.next is Next.RESTART:
                    due[worker.index] = time.monotonic() + decision.delay_s
                elif decision.next in (Next.FAIL, Next.STOP_JOB):
                    failure = Failure(decision.reason, f"Worker {worker.index} failed: "
                                      f"{worker.error}")
                    if decision.next is Next.STOP_JOB:
                        raise failure
                    failures.append(failure)
            self.save()
            # With one worker (or the first still running) its exit is seen at once.
            running = [self.children[f"worker-{w.index}"] for w in self.state.workers
                       if w.state == "running"]
            if not running and not due:
                break  # the last worker's exit: no tick to wait before finalizing
            self._tick(running[0] if running and not due else None)
        if failures:
            raise failures[0]

    def _spawn_worker(self, index: int, count: int, *,
                      gated: bool = False) -> subprocess.Popen[bytes]:
        name = f"worker-{index}"
        progress = self.paths.progress_file(index)
        progress.parent.mkdir(parents=True, exist_ok=True)
        progress.unlink(missing_ok=True)
        return self._spawn(name, "work", self._env(name, {
            "KUBEINFER_SHARDS": f"{index}/{count}", "KUBEINFER_PROGRESS_FILE": str(progress)}),
            gated=gated)

    def _start_worker(self, index: int, count: int) -> None:
        proc = self.ahead.pop(f"worker-{index}", None)
        if proc is not None:
            self._go(proc)
        else:
            proc = self._spawn_worker(index, count)
        worker = self.state.workers[index]
        worker.pid, worker.start_time = proc.pid, process_start_time(proc.pid)
        worker.state, worker.exit_code = "running", None

    def _worker_exited(self, worker: WorkerState, proc: subprocess.Popen[bytes]) -> ExitDecision:
        name = f"worker-{worker.index}"
        self.children.pop(name, None)
        code = proc.returncode
        report, _ = self._read_report(name, WorkerReport)
        current = report or read_progress(self.paths.progress_file(worker.index))
        worker.exit_code, worker.pid = code, None
        decision = on_exit(code, restarts=worker.restarts, retries=self.job.retries,
                           tolerant=self.job.max_failed_records > 0)
        if decision.next is Next.DONE:
            worker.state = "done"
            # The final report is the attempt's last word: it becomes its progress.
            if report is not None:
                self.paths.progress_file(worker.index).write_text(report.model_dump_json())
            return decision
        worker.earlier = add(worker.earlier, current or WorkerReport())
        self.paths.progress_file(worker.index).unlink(missing_ok=True)
        worker.error = self._why(name, code)
        if decision.next is Next.RESTART:
            worker.restarts += 1
            worker.state = "backoff"
            log.warning("%s exited (%s); restart %d in %.0f s", name, signal_exit_name(code),
                        worker.restarts, decision.delay_s)
        else:
            worker.state = "failed"
        return decision

    def finalize(self) -> JobSummary:
        try:
            self._step("finalizer", "finalize", JobPhase.FINALIZING)
        except Failure:
            summary, _ = self._read_report("finalizer", JobSummary)
            if summary is not None and summary.failed:
                self.state.summary = summary
                raise Failure(summary.reason or "TooManyFailedRecords",
                              summary.message or "Too many records failed") from None
            raise
        summary, text = self._read_report("finalizer", JobSummary)
        if summary is None:
            raise Failure(REASON_NO_REPORT, "The finalizer exited 0 without a JobSummary in "
                          f"{self.paths.report_file('finalizer')} ({detail(text) or 'empty'})")
        self.state.summary = summary
        if summary.failed:
            raise Failure(summary.reason or "TooManyFailedRecords",
                          summary.message or "Too many records failed")
        return summary

    # -- lifecycle -------------------------------------------------------------------------

    def run_to_end(self) -> None:
        plan = self.plan()
        if plan.shards:
            self.work(plan)
        else:
            self._send_away_ahead(list(self.ahead))
        summary = self.finalize()
        self._finish(JobPhase.COMPLETE, "Completed",
                     f"{summary.records} record(s) from {summary.objects} object(s) in "
                     f"{summary.shards} shard(s)"
                     + (f"; {summary.failed_records} bad record(s) in "
                        f"{self.job.output_uri.rstrip('/')}/{ERRORS_NAME}"
                        if summary.failed_records else ""))

    def finish_failed(self, failure: Failure) -> None:
        self._finish(JobPhase.FAILED, failure.reason, failure.message)

    def finish_stopped(self) -> None:
        self._finish(JobPhase.STOPPED, "Stopped", "Stopped; kubeinfer up -f "
                     f"{self.job.source or 'FILE'} resumes it (done shards are kept)")

    def _finish(self, phase: JobPhase, reason: str, message: str) -> None:
        self.state.phase, self.state.reason, self.state.message = phase, reason, message
        self.state.finished_at = time.time()
        self.state.step = None
        for worker in self.state.workers:
            if worker.state in ("running", "backoff", "pending"):
                worker.state, worker.pid = "stopped", None
        if phase is not JobPhase.STOPPED:
            self.state.first_errors = first_errors(self.job.output_uri)
        self.save()
        log.info("TransformJob %s: %s (%s) %s", self.job.name, phase.value, reason, message)


def run_runner(state_dir: Path) -> int:
    setup_logging()
    paths = JobPaths(state_dir)
    job = read_job(paths)
    if job is None:
        log.error("No readable job at %s; start TransformJobs with kubeinfer up -f", paths.job)
        return 2
    return Runner(paths, job).run()


def main(argv: list[str] | None = None) -> int:
    return runner_main(argv, "kubeinfer-transform-runner", run_runner)


if __name__ == "__main__":
    sys.exit(main())
