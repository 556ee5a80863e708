"""The state-folder plumbing that every local batch kind (TransformJob, CompilationJob) shares.

Both kinds keep one folder per job with the same core files: ``job.json`` (what
``up`` hands the runner), ``state.json`` (what the runner reports), ``runner.lock``
(flock'ed by the live runner) and ``logs/runner.log``. Keeping their paths and
their reading and writing here means the CLI, the runners and ``local.job_control``
treat both kinds the same way; each kind's module adds only its own files and
models (and keeps its own folder under ``$KUBEINFER_HOME``, so names never collide).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from pydantic import BaseModel, ValidationError

from kubeinfer_operator.local.state import lock_file_held, process_alive, write_atomic

M = TypeVar("M", bound=BaseModel)
D = TypeVar("D", bound="JobDir")


@dataclass(frozen=True)
class JobDir:
    """A local job's folder and the files every kind has in it."""

    root: Path

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def job(self) -> Path:
        return self.root / "job.json"

    @property
    def state(self) -> Path:
        return self.root / "state.json"

    @property
    def lock(self) -> Path:
        return self.root / "runner.lock"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def runner_log(self) -> Path:
        return self.logs / "runner.log"

    def running(self) -> bool:
        """True while a live runner holds the job's lock."""
        return lock_file_held(self.lock)


class RunnerRecord(Protocol):
    """The part of a kind's state file that names its runner process."""

    @property
    def runner_pid(self) -> int: ...

    @property
    def runner_start_time(self) -> int | None: ...


def write_model(path: Path, model: BaseModel) -> None:
    write_atomic(path, model.model_dump_json(indent=2))


def read_model(path: Path, model: type[M]) -> M | None:
    """The model in ``path``; None while missing, half-written or not that model."""
    try:
        return model.model_validate_json(path.read_bytes())
    except (OSError, ValidationError):
        return None


def known_job_dirs(root: Path, make: Callable[[Path], D]) -> list[D]:
    """Every job folder under ``root`` that holds a job or a state (in name order)."""
    if not root.is_dir():
        return []
    return [make(c) for c in sorted(root.iterdir())
            if c.is_dir() and (make(c).state.exists() or make(c).job.exists())]


def runner_alive(state: RunnerRecord | None) -> bool:
    return state is not None and process_alive(state.runner_pid, state.runner_start_time)


def forget_dir(paths: JobDir) -> None:
    shutil.rmtree(paths.root, ignore_errors=True)
