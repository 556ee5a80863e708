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

import argparse
import fcntl
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

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

EXIT_COMPLETE, EXIT_FAILED, EXIT_STOPPED = 0, 1, 2
#: Exit status of a runner that found another one running the job.
EXIT_ALREADY_RUNNING = 3


class _Stop(Exception):
    """SIGTERM or SIGINT: stop the compiler and exit."""


@dataclass
class _Failure(Exception):
    reason: str
    message: str


class Runner:
    def __init__(self, paths: CompilePaths, job: LocalCompileJob, *, tick_s: float = 0.1,
                 grace_s: float = 10.0) -> None:
        self.paths = paths
        self.job = job
        self.tick_s = tick_s
        self.grace_s = grace_s
        self.stopping = False
        self.child: subprocess.Popen[bytes] | None = None
        self.state = CompileState(name=job.name, runner_pid=os.getpid(),
                                  runner_start_time=process_start_time(os.getpid()),
                                  model=job.model, target=job.target,
                                  output_uri=job.output_uri, started_at=time.time())
        self._lock_fd: int | None = None

    def save(self) -> None:
        self.state.updated_at = time.time()
        write_compile_state(self.paths, self.state)

    def _env(self) -> dict[str, str]:
        return {**os.environ, **self.job.env,
                f"{ENV_PREFIX}REPORT_FILE": str(self.paths.report),
                f"{ENV_PREFIX}WORK_DIR": str(self.paths.work),
                # The compiler's rich output goes to a log: no terminal to size it by.
                "COLUMNS": os.environ.get("COLUMNS", "160")}

    def _tick(self) -> None:
        if self.stopping:
            raise _Stop()
        deadline = self.job.active_deadline_s
        if deadline is not None and time.time() - self.state.started_at > deadline:
            raise _Failure(REASON_DEADLINE, f"The compilation ran longer than {deadline} s; "
                           "raise spec.stoppingCondition.maxRuntimeInSeconds or lower "
                           "spec.tuning.budgetSeconds")
        time.sleep(self.tick_s)

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
                self._tick()
            code = self.child.returncode
            self.child = None
            self.state.pid, self.state.exit_code = None, code
            decision = on_exit(code, restarts=self.state.restarts, retries=self.job.retries)
            if decision.next is Next.DONE:
                report = read_report(self.paths.report)
                if report is None or not report.ok:
                    raise _Failure(REASON_NO_REPORT, "The compiler exited 0 without a report in "
                                   f"{self.paths.report}; see {self.paths.compiler_log}")
                return report
            why = self._why(code)
            if decision.next is not Next.RESTART:
                raise _Failure(decision.reason, f"Compilation failed: {why}")
            self.state.restarts += 1
            self.state.message = f"Retry {self.state.restarts} after: {why}"
            log.warning("The compiler exited (%s); restart %d in %.0f s", why,
                        self.state.restarts, decision.delay_s)
            self.save()
            until = time.monotonic() + decision.delay_s
            while time.monotonic() < until:
                self._tick()

    def acquire_lock(self) -> bool:
        self.paths.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.paths.lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._lock_fd = fd
        return True

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True

    def stop_child(self) -> None:
        if self.child is not None:
            stop_popen(self.child, timeout=self.grace_s)
            self.child = None

    def run(self) -> int:
        if not self.acquire_lock():
            log.error("CompilationJob %s already has a running runner", self.job.name)
            return EXIT_ALREADY_RUNNING
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        self.paths.logs.mkdir(parents=True, exist_ok=True)
        self.save()
        try:
            report = self.compile()
            self.state.artifact_uri, self.state.backend = report.artifact_uri, report.backend
            self.state.chosen = report.chosen.value if report.chosen else ""
            self.state.speedup = report.speedup
            self._finish(CompilePhase.COMPLETE, complete_reason(report),
                         outcome_text(report) + f"; artifact {report.artifact_uri}")
            return EXIT_COMPLETE
        except _Failure as failure:
            self.stop_child()
            self._finish(CompilePhase.FAILED, failure.reason, failure.message)
            return EXIT_FAILED
        except _Stop:
            self.stop_child()
            self._finish(CompilePhase.STOPPED, "Stopped", "Stopped; kubeinfer up -f "
                         f"{self.job.source or 'FILE'} compiles it again (the tuning cache "
                         "keeps what tuning found)")
            return EXIT_STOPPED
        finally:
            self.stop_child()

    def _finish(self, phase: CompilePhase, reason: str, message: str) -> None:
        self.state.phase, self.state.reason, self.state.message = phase, reason, message
        self.state.finished_at = time.time()
        self.state.pid = None
        self.save()
        log.info("CompilationJob %s: %s (%s) %s", self.job.name, phase.value, reason, message)


def run_runner(state_dir: Path) -> int:
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    paths = CompilePaths(state_dir)
    job = read_compile_job(paths)
    if job is None:
        log.error("No readable job at %s; start CompilationJobs with kubeinfer up -f",
                  paths.job)
        return 2
    return Runner(paths, job).run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kubeinfer-compile-runner")
    parser.add_argument("--state-dir", type=Path, required=True)
    return run_runner(parser.parse_args(argv).state_dir)


if __name__ == "__main__":
    sys.exit(main())
