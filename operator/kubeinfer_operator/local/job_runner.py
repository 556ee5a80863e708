"""The lifecycle every local batch runner (TransformJob, CompilationJob) shares.

A runner holds its job's lock for as long as it lives, turns SIGTERM/SIGINT into a
stop at its next tick, enforces ``activeDeadlineSeconds`` on every tick, and ends
with one of the same exit statuses whatever its kind. Keeping that here means the
CLI's ``down`` and ``up`` (``local.job_control``) can rely on both kinds behaving
alike; what a kind runs between start and finish stays in its own ``*_runner``.
"""

from __future__ import annotations

import abc
import argparse
import logging
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import ClassVar, Generic, Protocol, TypeVar

from kubeinfer_operator.local.job_state import JobDir
from kubeinfer_operator.local.process import wait_exit
from kubeinfer_operator.local.state import take_lock_file

EXIT_COMPLETE, EXIT_FAILED, EXIT_STOPPED = 0, 1, 2
#: Exit status of a runner that found another one running the job.
EXIT_ALREADY_RUNNING = 3


class Stop(Exception):
    """SIGTERM or SIGINT: stop every child and exit."""


@dataclass
class Failure(Exception):
    reason: str
    message: str


class RunnerJob(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def active_deadline_s(self) -> int | None: ...


class RunnerState(Protocol):
    @property
    def started_at(self) -> float: ...


D = TypeVar("D", bound=JobDir)
J = TypeVar("J", bound=RunnerJob)
S = TypeVar("S", bound=RunnerState)


class JobRunner(abc.ABC, Generic[D, J, S]):
    """One job's runner: the lifecycle here, what runs in ``run_to_end`` in the kind."""

    #: The kind, for the messages ("TransformJob").
    kind: ClassVar[str]
    log: ClassVar[logging.Logger]
    #: The status reason of a job past its deadline (each kind's status module names it).
    deadline_reason: ClassVar[str]

    def __init__(self, paths: D, job: J, state: S, *, tick_s: float, grace_s: float,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.paths = paths
        #: The deadline runs on this clock from the runner's start (``state.started_at``
        #: is wall-clock time for people): an NTP step or a resume must neither fail the
        #: job at once nor give it hours more.
        self.monotonic = monotonic
        self.started_m = monotonic()
        self.job = job
        self.tick_s = tick_s
        self.grace_s = grace_s
        self.stopping = False
        self.state = state
        #: Held open for the runner's whole life: the job's lock is this fd's flock.
        self._lock_fd: int | None = None

    @abc.abstractmethod
    def save(self) -> None:
        """Write the state file."""

    @abc.abstractmethod
    def run_to_end(self) -> None:
        """Run the job to its end and record it Complete; raise Failure or Stop otherwise."""

    @abc.abstractmethod
    def stop_children(self) -> None:
        """Stop every process this runner started (called more than once)."""

    @abc.abstractmethod
    def finish_failed(self, failure: Failure) -> None:
        """Record the job Failed (its children are stopped already)."""

    @abc.abstractmethod
    def finish_stopped(self) -> None:
        """Record the job Stopped, saying how ``up`` takes it on again."""

    @abc.abstractmethod
    def deadline_message(self, deadline: int) -> str:
        """Why the job failed after ``deadline`` seconds, and what to change."""

    def _tick(self, child: subprocess.Popen[bytes] | None = None) -> None:
        """Check for a stop and the deadline, then wait a tick, or less: until ``child``
        exits (a step's end is seen at once, not up to a tick later)."""
        if self.stopping:
            raise Stop()
        deadline = self.job.active_deadline_s
        if deadline is not None and self.monotonic() - self.started_m > deadline:
            raise Failure(self.deadline_reason, self.deadline_message(deadline))
        if child is None:
            time.sleep(self.tick_s)
            return
        wait_exit(child, self.tick_s)

    def acquire_lock(self) -> bool:
        self.paths.root.mkdir(parents=True, exist_ok=True)
        self._lock_fd = take_lock_file(self.paths.lock)
        return self._lock_fd is not None

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True

    def run(self) -> int:
        if not self.acquire_lock():
            self.log.error("%s %s already has a running runner", self.kind, self.job.name)
            return EXIT_ALREADY_RUNNING
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        self.paths.logs.mkdir(parents=True, exist_ok=True)
        self.save()
        try:
            self.run_to_end()
            return EXIT_COMPLETE
        except Failure as failure:
            self.stop_children()
            self.finish_failed(failure)
            return EXIT_FAILED
        except Stop:
            self.stop_children()
            self.finish_stopped()
            return EXIT_STOPPED
        finally:
            self.stop_children()


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def runner_main(argv: list[str] | None, prog: str, run_runner: Callable[[Path], int]) -> int:
    """``--state-dir DIR``: the arguments every runner is started with (``job_control``)."""
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--state-dir", type=Path, required=True)
    return run_runner(parser.parse_args(argv).state_dir)
