"""The ``kubeinfer`` commands' TransformJob half: ``up -f`` on a job file, its rows in
``status``, ``down`` of a job.

``cli.py`` parses the options and hands over here when the file holds a
TransformJob (or the name is a job's). A job runs to completion under a runner
process (``local.transform_runner``); ``up`` shows a progress bar (records,
shards, rate, ETA) and exits 0 when the job completes, 1 when it fails (the
reason and the first bad records), or returns at once with ``-d``.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TaskProgressColumn, TextColumn
from rich.table import Table

from kubeinfer_operator.cli_jobs import KindCli, Refused, up_jobs, wait_any
from kubeinfer_operator.local.transform_control import (
    JobView,
    local_job,
    running_spec,
    start_runner,
    stop_job,
    view,
    wait_started,
)
from kubeinfer_operator.local.transform_manifest import LoadedJob, load_transform_file
from kubeinfer_operator.local.transform_state import JobPaths, JobPhase, forget, known_jobs
from kubeinfer_operator.local.transform_view import duration, progress_text, status_row

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

#: Seconds between progress lines when stdout is not a terminal.
LINE_INTERVAL_S = 5.0
#: Characters of a job's message in the status table.
MAX_MESSAGE = 120


@dataclass
class _Target:
    paths: JobPaths
    proc: subprocess.Popen[bytes] | None
    #: Started by this command (Ctrl-C stops it) rather than joined.
    started: bool
    last_line: str = ""
    last_at: float = 0.0
    result: JobView | None = field(default=None)


class _Bars:
    """A rich progress bar per job on a terminal; a line per change (at most every few
    seconds) otherwise."""

    def __init__(self) -> None:
        self.progress: Progress | None = None
        self.tasks: dict[str, TaskID] = {}

    def __enter__(self) -> _Bars:
        if out.is_terminal:
            self.progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
                TextColumn("{task.fields[detail]}"), TextColumn("ETA {task.fields[eta]}"),
                console=out, transient=False, refresh_per_second=4)
            self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.__exit__(None, None, None)

    def update(self, target: _Target, v: JobView) -> None:
        phase = v.state.phase.value if v.state else "Starting"
        text = progress_text(v.progress) if v.state and v.state.plan else ""
        if self.progress is not None:
            name = target.paths.name
            if name not in self.tasks:
                self.tasks[name] = self.progress.add_task(name, total=1000, detail="", eta="-")
            self.progress.update(self.tasks[name], completed=int(v.progress.fraction * 1000),
                                 detail=f"{phase}: {text}" if text else phase,
                                 eta=duration(v.progress.eta_s))
            return
        line = f"{phase}: {text}" if text else phase
        now = time.monotonic()
        if line != target.last_line and (phase not in target.last_line
                                         or now - target.last_at >= LINE_INTERVAL_S):
            target.last_line, target.last_at = line, now
            eta = f", ETA {duration(v.progress.eta_s)}" if v.progress.eta_s is not None else ""
            out.print(f"  {target.paths.name}: {line}{eta}", soft_wrap=True)


def _report(v: JobView, source: Path) -> bool:
    """Print how the job ended; True when it completed."""
    name, state = v.paths.name, v.state
    if state is None or not state.phase.finished:
        err.print(f"[red]TransformJob {name}: its runner stopped without a result; see "
                  f"{v.paths.runner_log}[/red]", soft_wrap=True)
        return False
    if state.phase is JobPhase.COMPLETE:
        rate = (f" ({v.progress.records_per_s:,.0f} records/s)"
                if v.progress.records_per_s else "")
        out.print(f"[green]TransformJob {name} complete:[/green] {state.message}{rate}; "
                  f"outputs in {state.output_uri}", soft_wrap=True)
        for line in state.first_errors:
            out.print(f"  bad record: {line}", soft_wrap=True, markup=False)
        return True
    if state.phase is JobPhase.STOPPED:
        out.print(f"TransformJob {name} stopped; kubeinfer up -f {source} resumes it "
                  "(done shards are kept)", soft_wrap=True)
        return False
    err.print(f"[red]TransformJob {name} failed ({state.reason}):[/red] {state.message}",
              soft_wrap=True)
    for line in state.first_errors:
        err.print(f"  bad record: {line}", soft_wrap=True, markup=False)
    err.print(f"  logs: {v.paths.logs}", soft_wrap=True)
    return False


def _follow(targets: list[_Target], source: Path) -> int:
    remaining = list(targets)
    with _Bars() as bars:
        while remaining:
            for target in list(remaining):
                v = view(target.paths)
                bars.update(target, v)
                ended = (target.proc.poll() is not None if target.proc is not None
                         else not target.paths.running())
                if ended:
                    target.result = view(target.paths)
                    bars.update(target, target.result)
                    remaining.remove(target)
            if remaining:
                wait_any(remaining, 0.25)
    ok = [_report(t.result, source) for t in targets if t.result is not None]
    return 0 if ok and all(ok) else 1


def up(file: Path, *, detach: bool, interrupts: tuple[type[BaseException], ...]) -> int:
    """Run the TransformJobs of ``file``; the exit status. Raises SpecError (exit 2)."""
    return up_jobs(_CLI, load_transform_file(file), file, detach=detach, interrupts=interrupts,
                   out=out, err=err)


def _start(item: LoadedJob, file: Path, *, detach: bool) -> _Target:
    paths = JobPaths.for_job(item.name)
    job = local_job(item, str(file))
    for borrowed in item.borrowed:
        out.print(f"Endpoint {borrowed} in {file} gives TransformJob {item.name} its model "
                  "(it is not started)", soft_wrap=True)
    running = running_spec(paths)
    if running is not None:
        if running.run_hash != job.run_hash:
            raise Refused(f"TransformJob {item.name} is running with another spec (a "
                           f"TransformJob cannot change while it runs); stop it with "
                           f"kubeinfer down {item.name}, then run kubeinfer up again")
        out.print(f"TransformJob {item.name} is already running: following it", soft_wrap=True)
        return _Target(paths, None, started=False)
    proc = start_runner(paths, job, detach=detach)
    out.print(f"Starting TransformJob {item.name}: {job.model} → {job.output_uri} "
              f"({job.instance_count} worker(s); logs in {paths.logs})", soft_wrap=True)
    return _Target(paths, proc, started=True)


_CLI: KindCli[LoadedJob, _Target] = KindCli(
    kind="TransformJob", again="resumes it", doing="Running",
    start=lambda item, file, detach: _start(item, file, detach=detach),
    stop=lambda target: stop_job(target.paths, proc=target.proc),
    wait_started=lambda target, proc: wait_started(target.paths, proc),
    follow=_follow)


# -- status and down ------------------------------------------------------------------------


def job_rows(name: str | None = None) -> list[dict[str, Any]]:
    """``status`` rows of local TransformJobs (running, stopped or finished)."""
    candidates = [JobPaths.for_job(name)] if name else known_jobs()
    rows = []
    for paths in candidates:
        v = view(paths)
        if v.state is not None:
            rows.append(status_row(v.state, v.progress, v.running))
    return rows


def print_jobs(rows: list[dict[str, Any]]) -> None:
    table = Table(title="TransformJobs", title_justify="left")
    columns = ("job", "phase", "progress", "records", "records/s", "ETA", "message")
    for col in columns:
        table.add_column(col, no_wrap=col != "message", overflow="fold")
    for row in rows:
        rate = f"{row['records_per_s']:,.0f}" if row["records_per_s"] is not None else "-"
        message = row["message"] or row["model"]
        if len(message) > MAX_MESSAGE:  # the whole of it: kubeinfer status --json
            message = message[:MAX_MESSAGE - 1] + "…"
        table.add_row(row["job"], row["phase"], row["progress"], f"{row['records']:,}", rate,
                      duration(row["eta_s"]), message)
    out.print(table)


def running_jobs() -> list[JobPaths]:
    return [p for p in known_jobs() if p.running()]


def down(paths: JobPaths, *, timeout: float) -> str | None:
    """Stop a running job (its state stays: ``up`` resumes it) or forget a finished one.

    None when there is no such job.
    """
    if stop_job(paths, timeout=timeout):
        return f"Stopped TransformJob {paths.name} (kubeinfer up -f FILE resumes it)"
    if paths.root.is_dir():
        forget(paths)
        return (f"Removed TransformJob {paths.name} from local state (its outputs and done "
                "shards stay under its output URI)")
    return None
