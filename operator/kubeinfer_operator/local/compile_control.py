"""What the CLI does to local CompilationJob runners: hand a job over, start, watch, stop.

The CLI and a runner share only the job's folder (``compile_state``) and
signals: ``up`` writes ``job.json`` and starts the runner; ``status`` reads
``state.json``; ``down`` sends SIGTERM (then SIGKILL) and makes sure the
compiler it recorded is not left running.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from kubeinfer_operator.errors import LocalRunError
from kubeinfer_operator.local.compile_manifest import LoadedCompileJob
from kubeinfer_operator.local.compile_state import (
    CompilePaths,
    CompilePhase,
    CompileState,
    LocalCompileJob,
    compile_cache_root,
    read_compile_job,
    read_compile_state,
    runner_alive,
    write_compile_job,
    write_compile_state,
)
from kubeinfer_operator.local.process import signal_group, spawn
from kubeinfer_operator.local.state import process_alive
from kubeinfer_runtime.contract import ENV_PREFIX


def local_compile_job(item: LoadedCompileJob, source: str) -> LocalCompileJob:
    plan = item.plan
    # Every local compilation shares one tuning cache: a recompile runs no new trials.
    env = {**plan.env,
           f"{ENV_PREFIX}TUNING_CACHE_DIR": str(compile_cache_root() / "tuning")}
    return LocalCompileJob(name=item.name, env=env, retries=plan.backoff_limit,
                           active_deadline_s=plan.active_deadline_s,
                           model=plan.model_description, target=plan.target,
                           output_uri=plan.output_uri, run_hash=plan.run_hash, source=source)


def runner_argv(paths: CompilePaths) -> list[str]:
    return [sys.executable, "-m", "kubeinfer_operator.local.compile_runner",
            "--state-dir", str(paths.root)]


def start_runner(paths: CompilePaths, job: LocalCompileJob, *,
                 detach: bool) -> subprocess.Popen[bytes]:
    """Write the job and start its runner in its own session (it outlives a detached ``up``)."""
    paths.logs.mkdir(parents=True, exist_ok=True)
    paths.state.unlink(missing_ok=True)  # a previous run's result is not this run's
    paths.report.unlink(missing_ok=True)
    write_compile_job(paths, job)
    return spawn(runner_argv(paths), env=os.environ, log_path=paths.runner_log,
                 die_with_parent=not detach)


@dataclass(frozen=True)
class CompileView:
    paths: CompilePaths
    state: CompileState | None
    running: bool


def view(paths: CompilePaths) -> CompileView:
    return CompileView(paths, read_compile_state(paths), paths.running())


def running_spec(paths: CompilePaths) -> LocalCompileJob | None:
    """The job a live runner runs (None when no runner holds the lock)."""
    return read_compile_job(paths) if paths.running() else None


def stop_job(paths: CompilePaths, *, timeout: float = 30.0,
             proc: subprocess.Popen[bytes] | None = None) -> bool:
    """Stop the job's runner and its compiler; False when none was running."""
    if not paths.running():
        return False
    deadline = time.monotonic() + timeout
    state = read_compile_state(paths)
    while (state is None or not runner_alive(state)) and paths.running() and (
            time.monotonic() < deadline):
        time.sleep(0.05)  # a runner too young to have written its state
        state = read_compile_state(paths)
    pid = proc.pid if proc is not None else (state.runner_pid if runner_alive(state) and state
                                             else None)
    if pid is None:
        raise LocalRunError(f"CompilationJob {paths.name} is locked by a runner whose pid is "
                            f"unknown; stop it by hand (see {paths.runner_log})")
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    while paths.running() and time.monotonic() < deadline:
        if proc is not None:
            proc.poll()
        time.sleep(0.05)
    if paths.running():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        while paths.running() and time.monotonic() - killed < 10:
            time.sleep(0.05)
    if proc is not None:
        proc.wait()
    latest = read_compile_state(paths) or state
    if latest is not None and process_alive(latest.pid, latest.start_time):
        assert latest.pid is not None
        signal_group(latest.pid, signal.SIGKILL)  # its runner died before stopping it
    if latest is not None and not latest.phase.finished:
        latest.phase, latest.reason = CompilePhase.STOPPED, "Stopped"
        latest.message = "Stopped; kubeinfer up -f FILE compiles it again"
        latest.finished_at, latest.pid = time.time(), None
        write_compile_state(paths, latest)
    return True


def wait_started(paths: CompilePaths, proc: subprocess.Popen[bytes],
                 timeout: float = 10.0) -> bool:
    """Whether the runner came up (wrote its state) within ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = read_compile_state(paths)
        if state is not None and state.runner_pid == proc.pid:
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False
