"""What ``kubeinfer up -f`` does the same for every local batch kind (TransformJob,
CompilationJob): start or join each job of the file, hand them over to the background
with ``-d`` or follow them to their end, and stop what it started on Ctrl-C or on a
job that cannot start.

Each kind's ``cli_*`` module keeps how it starts one job and how it shows one
following; this module keeps the order of those steps and their messages in one
place, so both kinds answer ``up`` and Ctrl-C alike.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, Protocol, TypeVar

from rich.console import Console

from kubeinfer_operator.local.job_state import JobDir
from kubeinfer_operator.local.process import wait_exit


class Refused(Exception):
    """The job cannot be started as asked (exit 1, with the message)."""


class Target(Protocol):
    """A job this ``up`` follows: started by it, or joined while running."""

    @property
    def paths(self) -> JobDir: ...

    @property
    def proc(self) -> subprocess.Popen[bytes] | None: ...

    #: Started by this command (Ctrl-C stops it) rather than joined.
    @property
    def started(self) -> bool: ...


L = TypeVar("L")
T = TypeVar("T", bound=Target)


@dataclass(frozen=True)
class KindCli(Generic[L, T]):
    """A kind's part of ``up``."""

    #: "TransformJob", for the messages.
    kind: str
    #: What ``up -f`` again does to a stopped job ("resumes it").
    again: str
    #: What the jobs do in the background ("Running").
    doing: str
    #: Start or join the job of one loaded item; raises Refused.
    start: Callable[[L, Path, bool], T]
    #: Stop a started job's runner (and what it started).
    stop: Callable[[T], object]
    #: Whether a runner this command started came up.
    wait_started: Callable[[T, subprocess.Popen[bytes]], bool]
    #: Follow the targets to their end; the exit status.
    follow: Callable[[list[T], Path], int]


def wait_any(targets: Sequence[Target], timeout: float) -> None:
    """Up to ``timeout``, less when the one runner this command started exits sooner."""
    procs = [t.proc for t in targets if t.proc is not None]
    if len(targets) == 1 and len(procs) == 1:
        wait_exit(procs[0], timeout)
        return
    time.sleep(timeout)


def stop_started(cli: KindCli[L, T], targets: list[T], source: Path, out: Console) -> None:
    for target in targets:
        if target.started:
            cli.stop(target)
            out.print(f"Stopped {cli.kind} {target.paths.name}; kubeinfer up -f {source} "
                      f"{cli.again}", soft_wrap=True)
        else:
            out.print(f"{cli.kind} {target.paths.name} keeps running in the background "
                      f"(kubeinfer down {target.paths.name} stops it)", soft_wrap=True)


def up_jobs(cli: KindCli[L, T], loaded: Iterable[L], file: Path, *, detach: bool,
            interrupts: tuple[type[BaseException], ...], out: Console, err: Console) -> int:
    """Run the loaded jobs of ``file``; the exit status."""
    targets: list[T] = []
    try:
        for item in loaded:
            try:
                targets.append(cli.start(item, file, detach))
            except Refused as exc:
                err.print(f"[red]Error:[/red] {exc}", soft_wrap=True)
                stop_started(cli, targets, file, out)
                return 1
        if detach:
            for target in targets:
                if target.proc is not None and not cli.wait_started(target, target.proc):
                    err.print(f"[red]{cli.kind} {target.paths.name} did not start; see "
                              f"{target.paths.runner_log}[/red]", soft_wrap=True)
                    return 1
            names = " ".join(t.paths.name for t in targets)
            out.print(f"{cli.doing} in the background; follow with: kubeinfer status {names}; "
                      f"stop with: kubeinfer down {names}", soft_wrap=True)
            return 0
        return cli.follow(targets, file)
    except interrupts:
        err.print("Interrupted: stopping what this command started")
        stop_started(cli, targets, file, out)
        return 130
