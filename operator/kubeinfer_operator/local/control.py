"""What the CLI does to local supervisors: find, start, hand a spec over, wait, stop.

The CLI and the supervisors share nothing but files in the endpoint's state
directory and signals: ``up`` writes desired.json and sends SIGHUP, the
supervisor writes state.json; ``down`` sends SIGTERM and waits until the
supervisor and every child it recorded are gone.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from kubeinfer_operator.errors import LocalRunError
from kubeinfer_operator.local.paths import EndpointPaths, known_endpoints
from kubeinfer_operator.local.process import signal_exit_name, signal_group, spawn, tail
from kubeinfer_operator.local.state import (
    DesiredSpec,
    EndpointState,
    Phase,
    lock_is_held,
    process_alive,
    read_desired,
    read_state,
    write_desired,
)

if TYPE_CHECKING:
    from kubeinfer_operator.local.manifest import LoadedEndpoint


class Liveness(StrEnum):
    RUNNING = "running"
    #: State files left by a supervisor that died without cleaning up.
    STALE = "stale"
    STOPPED = "stopped"


def liveness(paths: EndpointPaths) -> Liveness:
    if lock_is_held(paths):
        return Liveness.RUNNING
    if paths.state.exists() or paths.desired.exists() or paths.routes.exists():
        return Liveness.STALE
    return Liveness.STOPPED


def _kill_recorded_children(state: EndpointState | None, timeout: float) -> list[str]:
    """Stop children a state file lists that still run (same pid *and* start time)."""
    if state is None:
        return []
    alive = [p for p in state.processes if process_alive(p.pid, p.start_time)]
    for p in alive:
        assert p.pid is not None
        signal_group(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(process_alive(p.pid, p.start_time) for p in alive):
        time.sleep(0.05)
    for p in alive:
        if process_alive(p.pid, p.start_time):
            assert p.pid is not None
            signal_group(p.pid, signal.SIGKILL)
    return [f"{p.name} (pid {p.pid})" for p in alive]


def clean_stale(paths: EndpointPaths, timeout: float = 5.0) -> str | None:
    """Remove the state of a dead supervisor (and any child it left); what was done."""
    if liveness(paths) is not Liveness.STALE:
        return None
    state = read_state(paths)
    killed = _kill_recorded_children(state, timeout)
    for path in (paths.state, paths.desired, paths.routes):
        path.unlink(missing_ok=True)
    pid = f" (pid {state.supervisor_pid})" if state else ""
    extra = f"; stopped leftover {', '.join(killed)}" if killed else ""
    return f"Cleaned stale state of endpoint {paths.name}: its supervisor{pid} is gone{extra}"


def clean_all_stale() -> list[str]:
    notes = []
    for paths in known_endpoints():
        note = clean_stale(paths)
        if note:
            notes.append(note)
    return notes


def supervisor_argv(paths: EndpointPaths) -> list[str]:
    return [sys.executable, "-m", "kubeinfer_operator.local.supervisor",
            "--state-dir", str(paths.root)]


def start_supervisor(paths: EndpointPaths, *, detach: bool) -> subprocess.Popen[bytes]:
    """Start the endpoint's supervisor in its own session.

    Attached (foreground ``up``), it dies with the CLI; detached, it outlives it.
    """
    paths.logs.mkdir(parents=True, exist_ok=True)
    return spawn(supervisor_argv(paths), env=os.environ, log_path=paths.supervisor_log,
                 die_with_parent=not detach)


def next_generation(paths: EndpointPaths) -> int:
    previous = read_desired(paths)
    state = read_state(paths)
    return max(previous.generation if previous else 0, state.generation if state else 0) + 1


def hand_over(paths: EndpointPaths, item: LoadedEndpoint, *, timeout_s: float,
              gateway_port: int | None, running: bool) -> int:
    """Write the desired spec; signal the running supervisor. Returns its generation."""
    generation = next_generation(paths)
    desired = DesiredSpec(generation=generation, manifest=item.document, base_dir=item.base_dir,
                          timeout_s=timeout_s, gateway_port=gateway_port)
    write_desired(paths, desired)
    if running:
        state = read_state(paths)
        if state is not None and process_alive(state.supervisor_pid, state.supervisor_start_time):
            # SIGHUP wakes it at once; a supervisor still starting up re-reads
            # desired.json within a second anyway.
            with contextlib.suppress(ProcessLookupError):
                os.kill(state.supervisor_pid, signal.SIGHUP)
    return generation


@dataclass(frozen=True)
class Outcome:
    ok: bool
    message: str
    state: EndpointState | None


def check_applied(paths: EndpointPaths, generation: int,
                  proc: subprocess.Popen[bytes] | None) -> Outcome | None:
    """One look at an endpoint ``up`` waits for: an Outcome once decided, else None."""
    state = read_state(paths)
    exited = proc.poll() if proc is not None else None
    if exited is not None or (proc is None and not lock_is_held(paths)):
        how = signal_exit_name(exited) if exited is not None else "not running"
        last = tail(paths.supervisor_log, lines=12)
        return Outcome(False, f"Supervisor of endpoint {paths.name} stopped ({how}); see "
                       f"{paths.supervisor_log}" + (f"; last lines:\n{last}" if last else ""),
                       state)
    if state is None or state.observed_generation < generation:
        return None
    applied = state.last_apply
    if applied is not None and applied.generation >= generation and not applied.ok:
        return Outcome(False, applied.message or "the spec could not be applied", state)
    if state.phase is Phase.READY:
        return Outcome(True, "", state)
    return None


def wait_applied(targets: list[tuple[EndpointPaths, int, subprocess.Popen[bytes] | None]],
                 timeout: float, on_tick: Callable[[dict[str, EndpointState | None]], None]
                 | None = None, interval: float = 0.1) -> dict[str, Outcome]:
    """Wait until every target reached its generation (or failed, or the timeout passed)."""
    outcomes: dict[str, Outcome] = {}
    deadline = time.monotonic() + timeout
    while True:
        for paths, generation, proc in targets:
            if paths.name not in outcomes:
                outcome = check_applied(paths, generation, proc)
                if outcome is not None:
                    outcomes[paths.name] = outcome
        if on_tick is not None:
            on_tick({p.name: read_state(p) for p, _, _ in targets})
        if len(outcomes) == len(targets):
            return outcomes
        if time.monotonic() >= deadline:
            for paths, _, _ in targets:
                if paths.name not in outcomes:
                    state = read_state(paths)
                    why = state.message if state and state.message else "no progress reported"
                    outcomes[paths.name] = Outcome(
                        False, f"Endpoint {paths.name} not ready after {timeout:g}s: {why}; "
                        f"raise --timeout or check logs in {paths.logs}", state)
            return outcomes
        time.sleep(interval)


def _supervisor_pid(paths: EndpointPaths, state: EndpointState | None) -> int | None:
    if state is not None and process_alive(state.supervisor_pid, state.supervisor_start_time):
        return state.supervisor_pid
    return None


def stop_endpoint(paths: EndpointPaths, *, timeout: float = 30.0,
                  proc: subprocess.Popen[bytes] | None = None) -> bool:
    """Stop the endpoint's supervisor and make sure no child is left. False if not running."""
    if liveness(paths) is Liveness.STOPPED:
        return False
    if liveness(paths) is Liveness.STALE:
        clean_stale(paths)
        return True
    if proc is not None and proc.poll() is not None:
        # The supervisor this command started has exited already (e.g. it lost the
        # lock to one started at the same moment): that other one is not ours to stop.
        return True
    deadline = time.monotonic() + timeout
    state = read_state(paths)
    # The supervisor may be too young to have written its state: wait for it.
    while state is None and lock_is_held(paths) and time.monotonic() < deadline:
        time.sleep(0.05)
        state = read_state(paths)
    pid = proc.pid if proc is not None else _supervisor_pid(paths, state)
    if pid is None:
        raise LocalRunError(f"Endpoint {paths.name} is locked by a supervisor whose pid is "
                            f"unknown; stop it by hand (see {paths.supervisor_log})")
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    while lock_is_held(paths) and time.monotonic() < deadline:
        if proc is not None:
            proc.poll()
        time.sleep(0.05)
    if lock_is_held(paths):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        while lock_is_held(paths):
            if time.monotonic() - killed_at > 10:
                raise LocalRunError(f"Endpoint {paths.name} is still locked after its "
                                    f"supervisor (pid {pid}) was killed; check "
                                    f"{paths.supervisor_log}")
            time.sleep(0.05)
    if proc is not None:
        proc.wait()
    # A supervisor that was SIGKILLed cannot stop its children itself (they get
    # SIGTERM from the kernel); make sure every recorded one is gone.
    _kill_recorded_children(state, timeout=max(1.0, deadline - time.monotonic()))
    latest = read_state(paths)
    if latest is not None and latest is not state:
        _kill_recorded_children(latest, timeout=5.0)
    for path in (paths.state, paths.desired, paths.routes):
        path.unlink(missing_ok=True)
    return True
