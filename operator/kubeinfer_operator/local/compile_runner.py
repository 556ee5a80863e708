"""The runner of one local CompilationJob: the compiler as a process, to the end.

``python -m kubeinfer_operator.local.compile_runner --state-dir DIR`` (started by
``kubeinfer up``, in the foreground or detached) holds the job's lock, reads
``job.json`` and runs what the cluster runs as a Job, with the same env:
``kubeinfer-runtime compile``, its report going to ``report.json`` (the
termination log on Kubernetes). Exits follow ``compile_policy`` (the Job's
podFailurePolicy and backoffLimit); ``activeDeadlineSeconds`` is enforced here.
It rewrites ``state.json`` as things change and exits 0 (Complete), 1 (Failed)
or 2 (stopped: SIGTERM/SIGINT stop the compiler, SIGTERM then SIGKILL).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from kubeinfer_operator.local.compile_policy import on_exit
from kubeinfer_operator.local.compile_state import (
    CompilePaths,
    CompilePhase,
    CompileState,
    LocalCompileJob,
    read_compile_job,
    read_report,
    write_compile_state,
)
from kubeinfer_operator.local.job_runner import (
    Failure,
    JobRunner,
    runner_main,
    setup_logging,
)
from kubeinfer_operator.local.process import signal_exit_name, spawn, stop_popen, tail
from kubeinfer_operator.local.state import process_start_time
from kubeinfer_operator.local.transform_policy import Next
from kubeinfer_operator.reconcile.compile_status import (
    REASON_DEADLINE,
    REASON_NO_REPORT,
    complete_reason,
    outcome_text,
)
from kubeinfer_operator.reconcile.transform_observe import detail
from kubeinfer_runtime.contract import ENV_PREFIX
from kubeinfer_runtime.contract.compile import CompileReport

log = logging.getLogger("kubeinfer.compile")


class Runner(JobRunner[CompilePaths, LocalCompileJob, CompileState]):
    kind = "CompilationJob"
    log = logging.getLogger("kubeinfer.compile")
    deadline_reason = REASON_DEADLINE

    def __init__(self, paths: CompilePaths, job: LocalCompileJob, *, tick_s: float = 0.1,
                 grace_s: float = 10.0) -> None:
        super().__init__(paths, job,
                         CompileState(name=job.name, runner_pid=os.getpid(),
                                      runner_start_time=process_start_time(os.getpid()),
                                      model=job.model, target=job.target,
                                      output_uri=job.output_uri, started_at=time.time()),
                         tick_s=tick_s, grace_s=grace_s)
        self.child: subprocess.Popen[bytes] | None = None

    def save(self) -> None:
        self.state.updated_at = time.time()
        write_compile_state(self.paths, self.state)

    def _env(self) -> dict[str, str]:
        return {**os.environ, **self.job.env,
                f"{ENV_PREFIX}REPORT_FILE": str(self.paths.report),
                f"{ENV_PREFIX}WORK_DIR": str(self.paths.work),
                # The compiler's rich output goes to a log: no terminal to size it by.
                "COLUMNS": os.environ.get("COLUMNS", "160")}

    def deadline_message(self, deadline: int) -> str:
        return (f"The compilation ran longer than {deadline} s; raise "
                "spec.stoppingCondition.maxRuntimeInSeconds or lower spec.tuning.budgetSeconds")

    def _why(self, code: int | None) -> str:
        try:
            text = self.paths.report.read_text()
        except OSError:
            text = ""
        said = detail(text) or detail(tail(self.paths.compiler_log, lines=6))
        how = signal_exit_name(code)
        return f"{said} ({how}; log: {self.paths.compiler_log})" if said else (
            f"{how}; see {self.paths.compiler_log}")

    def compile(self) -> CompileReport:
        """Run the compiler to its end, restarting it on failures that may pass."""
        self.state.phase = CompilePhase.COMPILING
        while True:
            self.paths.report.unlink(missing_ok=True)
            self.paths.logs.mkdir(parents=True, exist_ok=True)
            argv = [sys.executable, "-m", "kubeinfer_runtime", "compile"]
            with open(self.paths.compiler_log, "ab") as fh:
                fh.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} compile (attempt "
                         f"{self.state.restarts + 1})\n".encode())
            self.child = spawn(argv, env=self._env(), log_path=self.paths.compiler_log)
            self.state.pid = self.child.pid
            self.state.start_time = process_start_time(self.child.pid)
            self.state.exit_code = None
            self.save()
            while self.child.poll() is None:
                self._tick(self.child)
            code = self.child.returncode
            self.child = None
            self.state.pid, self.state.exit_code = None, code
            decision = on_exit(code, restarts=self.state.restarts, retries=self.job.retries)
            if decision.next is Next.DONE:
                report = read_report(self.paths.report)
                if report is None or not report.ok:
                    raise Failure(REASON_NO_REPORT, "The compiler exited 0 without a report in "
                                  f"{self.paths.report}; see {self.paths.compiler_log}")
                return report
            why = self._why(code)
            if decision.next is not Next.RESTART:
                raise Failure(decision.reason, f"Compilation failed: {why}")
            self.state.restarts += 1
            self.state.message = f"Retry {self.state.restarts} after: {why}"
            log.warning("The compiler exited (%s); restart %d in %.0f s", why,
                        self.state.restarts, decision.delay_s)
            self.save()
            until = time.monotonic() + decision.delay_s
            while time.monotonic() < until:
                self._tick()

    def stop_children(self) -> None:
        if self.child is not None:
            stop_popen(self.child, timeout=self.grace_s)
            self.child = None

    def run_to_end(self) -> None:
        report = self.compile()
        self.state.artifact_uri, self.state.backend = report.artifact_uri, report.backend
        self.state.chosen = report.chosen.value if report.chosen else ""
        self.state.speedup = report.speedup
        self._finish(CompilePhase.COMPLETE, complete_reason(report),
                     outcome_text(report) + f"; artifact {report.artifact_uri}")

    def finish_failed(self, failure: Failure) -> None:
        self._finish(CompilePhase.FAILED, failure.reason, failure.message)

    def finish_stopped(self) -> None:
        self._finish(CompilePhase.STOPPED, "Stopped", "Stopped; kubeinfer up -f "
                     f"{self.job.source or 'FILE'} compiles it again (the tuning cache "
                     "keeps what tuning found)")

    def _finish(self, phase: CompilePhase, reason: str, message: str) -> None:
        self.state.phase, self.state.reason, self.state.message = phase, reason, message
        self.state.finished_at = time.time()
        self.state.pid = None
        self.save()
        log.info("CompilationJob %s: %s (%s) %s", self.job.name, phase.value, reason, message)


def run_runner(state_dir: Path) -> int:
    setup_logging()
    paths = CompilePaths(state_dir)
    job = read_compile_job(paths)
    if job is None:
        log.error("No readable job at %s; start CompilationJobs with kubeinfer up -f",
                  paths.job)
        return 2
    return Runner(paths, job).run()


def main(argv: list[str] | None = None) -> int:
    return runner_main(argv, "kubeinfer-compile-runner", run_runner)


if __name__ == "__main__":
    sys.exit(main())
