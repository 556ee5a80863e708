"""A local job's activeDeadlineSeconds across a wall-clock step: it runs on the
monotonic clock from the runner's start, not on ``time.time() - started_at``."""

from __future__ import annotations

import logging
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

from kubeinfer_operator.local import job_runner
from kubeinfer_operator.local.job_runner import Failure, JobRunner
from kubeinfer_operator.local.job_state import JobDir

WALL0 = 1_800_000_000.0


@dataclass
class Job:
    name: str = "j"
    active_deadline_s: int | None = 600


@dataclass
class State:
    started_at: float = WALL0


class Runner(JobRunner[JobDir, Job, State]):
    kind = "TransformJob"
    log = logging.getLogger("test")
    deadline_reason = "DeadlineExceeded"

    def save(self) -> None: ...
    def run_to_end(self) -> None: ...
    def stop_children(self) -> None: ...
    def finish_failed(self, failure: Failure) -> None: ...
    def finish_stopped(self) -> None: ...

    def deadline_message(self, deadline: int) -> str:
        return f"past {deadline}s"


class Clocks:
    def __init__(self) -> None:
        self.wall, self.mono = WALL0, 50.0

    def time(self) -> float:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    def sleep(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds


@pytest.fixture
def clocks(monkeypatch: pytest.MonkeyPatch) -> Clocks:
    c = Clocks()
    monkeypatch.setattr(job_runner, "time", types.SimpleNamespace(
        time=c.time, monotonic=c.monotonic, sleep=c.sleep))
    return c


def runner(clocks: Clocks, tmp_path: Path) -> Runner:
    r = Runner(JobDir(tmp_path), Job(), State(), tick_s=1.0, grace_s=1.0)
    r.monotonic = clocks.monotonic
    r.started_m = clocks.monotonic()
    return r


def test_a_wall_clock_step_forward_does_not_fail_the_job(clocks: Clocks,
                                                         tmp_path: Path) -> None:
    r = runner(clocks, tmp_path)
    clocks.sleep(10)
    clocks.wall += 3600  # NTP corrects a clock an hour slow
    r._tick()  # 11 s into a 600 s deadline


def test_a_wall_clock_step_back_does_not_extend_the_deadline(clocks: Clocks,
                                                             tmp_path: Path) -> None:
    r = runner(clocks, tmp_path)
    clocks.wall -= 3600
    clocks.sleep(599)
    r._tick()  # 599 s, then a tick of 1 s
    clocks.sleep(1)
    with pytest.raises(Failure, match="past 600s"):
        r._tick()  # 601 s on the monotonic clock, 2999 s "before" the start on the wall
