"""The files supervisors and the CLI exchange, and the checks on them.

* ``desired.json`` (``DesiredSpec``): written by ``kubeinfer up``, read by the
  supervisor on start and on SIGHUP. A monotonically increasing ``generation``
  lets ``up`` wait for *its* spec to be applied.
* ``state.json`` (``EndpointState``): written by the supervisor whenever
  something changes, read by ``status``, ``invoke``, ``down`` and ``up``.
* ``events.jsonl``: append-only log of what happened (crashes, restarts,
  rollouts) that a foreground ``up`` prints as it comes.

Every whole-file write is atomic (temp file + rename) so a reader never sees
half a file. Whether a supervisor is alive is decided by its flock on
``supervisor.lock`` (released by the kernel when it dies, even by SIGKILL), not
by its pid, which can be reused.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
import time
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kubeinfer_operator.local.paths import EndpointPaths


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class DesiredSpec(_Model):
    """What ``kubeinfer up`` asks a supervisor to run."""

    generation: int = Field(ge=1)
    #: The Endpoint document exactly as read from the file (validated again by the supervisor).
    manifest: dict[str, Any]
    #: Directory of the manifest: relative file:// model URIs resolve against it.
    base_dir: str
    #: How long a rollout may wait for new model servers to become ready.
    timeout_s: float = Field(default=120.0, gt=0)
    #: Gateway port asked for with ``up --port``; None picks a free one.
    gateway_port: int | None = None


class Phase(StrEnum):
    STARTING = "Starting"
    READY = "Ready"
    UPDATING = "Updating"
    #: Serving, but some desired model server is not ready (crashed, restarting).
    DEGRADED = "Degraded"
    #: Nothing can serve: e.g. no model server of any variant ever got ready.
    FAILED = "Failed"
    STOPPING = "Stopping"


class ProcState(StrEnum):
    STARTING = "starting"
    READY = "ready"
    NOT_READY = "not-ready"
    #: Exited unexpectedly; restarts after the backoff delay.
    BACKOFF = "backoff"
    STOPPING = "stopping"
    STOPPED = "stopped"


class ProcessState(_Model):
    name: str
    role: str
    variant: str | None = None
    replica: int | None = None
    server_hash: str | None = None
    pid: int | None = None
    #: Kernel start time of ``pid`` (clock ticks), to tell it from a reused pid.
    start_time: int | None = None
    port: int
    url: str
    state: ProcState
    #: Why it is not ready (the model server's own message when it gave one).
    reason: str = ""
    #: True when the gateway's route table lists this process.
    routed: bool = False
    restarts: int = 0
    last_exit: int | None = None
    #: Why the previous run ended, as Kubernetes' lastState.terminated.reason:
    #: OOMKilled (over its memory limit), Error (crashed) or Completed (exit 0).
    last_termination: str = ""
    #: For OOMKilled: the memory used, the limit and the field that sets it.
    last_termination_message: str = ""
    log: str


class VariantState(_Model):
    name: str
    weight: float
    replicas: int
    ready: int = 0
    model_uri: str = ""
    server_hash: str = ""
    #: Why the scaler last changed the replicas ("" when it never did).
    last_scaling: str = ""


class ApplyResult(_Model):
    generation: int
    ok: bool
    message: str = ""
    changes: list[str] = Field(default_factory=list)


class EndpointState(_Model):
    endpoint: str
    supervisor_pid: int
    supervisor_start_time: int | None = None
    url: str | None = None
    phase: Phase = Phase.STARTING
    message: str = ""
    #: Generation of the desired spec being worked on.
    generation: int = 0
    #: Last generation whose apply finished (successfully or not, see last_apply).
    observed_generation: int = 0
    last_apply: ApplyResult | None = None
    variants: list[VariantState] = Field(default_factory=list)
    processes: list[ProcessState] = Field(default_factory=list)
    #: spec.deploymentConfig: each variant's latest guarded rollout (as the operator's
    #: ``status.rollouts``: phase, step, traffic on green, last alarm evaluation).
    rollouts: list[dict[str, Any]] = Field(default_factory=list)
    updated_at: float = 0.0


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so concurrent readers see old or new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_state(paths: EndpointPaths, state: EndpointState) -> None:
    write_atomic(paths.state, state.model_dump_json(indent=2))


def read_state(paths: EndpointPaths) -> EndpointState | None:
    """The endpoint's state, or None when missing or unreadable (e.g. an older format)."""
    try:
        return EndpointState.model_validate_json(paths.state.read_bytes())
    except (OSError, ValidationError):
        return None


def write_desired(paths: EndpointPaths, desired: DesiredSpec) -> None:
    write_atomic(paths.desired, desired.model_dump_json(indent=2))


def read_desired(paths: EndpointPaths) -> DesiredSpec | None:
    try:
        return DesiredSpec.model_validate_json(paths.desired.read_bytes())
    except (OSError, ValidationError):
        return None


def append_event(paths: EndpointPaths, message: str, *, level: str = "info",
                 process: str | None = None, now: float | None = None) -> None:
    """Append one event line; O_APPEND keeps concurrent small writes whole."""
    paths.root.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"time": time.time() if now is None else now, "endpoint": paths.name,
                       "level": level, "process": process, "message": message})
    with open(paths.events, "a") as fh:
        fh.write(line + "\n")


def read_events(paths: EndpointPaths, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Events appended since byte ``offset``, and the offset to continue from.

    A trailing line still being written is left for the next call.
    """
    try:
        with open(paths.events, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except FileNotFoundError:
        return [], offset
    events: list[dict[str, Any]] = []
    consumed = 0
    for raw in data.splitlines(keepends=True):
        if not raw.endswith(b"\n"):
            break
        consumed += len(raw)
        try:
            events.append(json.loads(raw))
        except ValueError:
            continue
    return events, offset + consumed


def events_size(paths: EndpointPaths) -> int:
    try:
        return paths.events.stat().st_size
    except FileNotFoundError:
        return 0


def lock_is_held(paths: EndpointPaths) -> bool:
    """True while a live supervisor holds the endpoint's lock."""
    return lock_file_held(paths.lock)


def take_lock_file(path: Path) -> int | None:
    """An flock on ``path`` for as long as the returned fd stays open (the kernel drops it
    when its holder dies, even by SIGKILL); None when another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def lock_file_held(path: Path) -> bool:
    """True while a live process holds an flock on ``path``."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def process_start_time(pid: int) -> int | None:
    """Kernel start time of ``pid`` in clock ticks (Linux /proc), None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) is in parentheses and may hold spaces: split after it.
    fields = raw[raw.rfind(")") + 2:].split()
    try:
        if fields[0] == "Z":  # a zombie has exited; only its exit status is left
            return None
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def process_alive(pid: int | None, start_time: int | None) -> bool:
    """True when ``pid`` runs and is the same process (same start time) we recorded."""
    if pid is None:
        return False
    current = process_start_time(pid)
    if current is None:
        return False
    return start_time is None or current == start_time
