"""Starting, stopping and waiting for a local job's runner process, for every batch kind.

TransformJob and CompilationJob runners are handed over and stopped the same way:
``up`` writes ``job.json`` and spawns the runner in its own session; ``down`` finds
the runner's pid in ``state.json`` (or the Popen it started), sends SIGTERM and then
SIGKILL until the lock is free. Only what a kind does afterwards (which children it
recorded, what its Stopped message says) differs, so that stays in the kind's
``*_control`` module and this one returns what it needs for it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from kubeinfer_operator.errors import LocalRunError
from kubeinfer_operator.local.job_state import JobDir, RunnerRecord, runner_alive
from kubeinfer_operator.local.process import spawn

D = TypeVar("D", bound=JobDir)
S = TypeVar("S", bound=RunnerRecord)


def spawn_runner(paths: JobDir, argv: list[str], *, detach: bool) -> subprocess.Popen[bytes]:
    """Start a runner in its own session (it outlives a detached ``up``)."""
    return spawn(argv, env=os.environ, log_path=paths.runner_log, die_with_parent=not detach)


@dataclass(frozen=True)
class StoppedRunner(Generic[S]):
    """What ``stop_runner`` saw: the state it found the runner by, and the state left after."""

    #: The state read before signalling (None when the runner never wrote one).
    state: S | None
    #: The state read once the runner was gone (None when there is none).
    latest: S | None
    #: ``time.monotonic()`` by which the whole stop should be over.
    deadline: float


def stop_runner(paths: D, read_state: Callable[[D], S | None], kind: str, *,
                timeout: float, proc: subprocess.Popen[bytes] | None = None,
                ) -> StoppedRunner[S] | None:
    """Stop the job's runner (SIGTERM, then SIGKILL); None when none was running.

    The caller then cleans up after a runner that died before it could (its children,
    its phase): only the kind knows what those are.
    """
    if not paths.running():
        return None
    deadline = time.monotonic() + timeout
    state = read_state(paths)
    while (state is None or not runner_alive(state)) and paths.running() and (
            time.monotonic() < deadline):
        time.sleep(0.05)  # a runner too young to have written its state
        state = read_state(paths)
    pid = proc.pid if proc is not None else (state.runner_pid if runner_alive(state) and state
                                             else None)
    if pid is None:
        raise LocalRunError(f"{kind} {paths.name} is locked by a runner whose pid is "
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
    return StoppedRunner(state, read_state(paths), deadline)


def wait_started(paths: D, read_state: Callable[[D], S | None],
                 proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Whether the runner came up (wrote its state) within ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = read_state(paths)
        if state is not None and state.runner_pid == proc.pid:
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False
