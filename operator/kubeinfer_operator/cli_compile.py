"""The ``kubeinfer`` commands' compile half: ``kubeinfer compile``, and ``up -f`` on a
CompilationJob file, its rows in ``status``, ``down`` of one.

* ``kubeinfer compile MODEL.onnx --target T --out DIR ...`` runs the runtime's
  compiler (``kubeinfer-runtime compile``) as a child process on this terminal:
  it draws its own progress and candidates table, and its exit code is this
  command's (0, 42 bad input, 1 failed). The operator package never imports the
  compiler (TVM is heavy and optional), so the CLI only builds its argv.
* ``up -f`` on Endpoints: variants whose model says ``compile`` are compiled
  first (``compile_variants``: the local twin of the init container a cluster
  runs), each outcome printed, and served as their artifact.
* ``cli.py`` parses ``up``/``status``/``down`` and hands over here when the file
  holds a CompilationJob (or the name is one's). A job runs to completion under
  a runner process (``local.compile_runner``); ``up`` shows the compiler's
  progress, then what was chosen, how it compares with onnxruntime fp32, and
  the artifact; it exits 0 when the job completes, 1 when it fails, or returns
  at once with ``-d``.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.status import Status
from rich.table import Table

from kubeinfer_operator.cli_jobs import KindCli, up_jobs, wait_any
from kubeinfer_operator.cli_jobs import Refused as Refused  # cli.py catches it from here
from kubeinfer_operator.local.compile_control import (
    CompileView,
    local_compile_job,
    running_spec,
    start_runner,
    stop_job,
    view,
    wait_started,
)
from kubeinfer_operator.local.compile_manifest import LoadedCompileJob, load_compile_file
from kubeinfer_operator.local.compile_state import (
    CompilePaths,
    CompilePhase,
    forget,
    known_compile_jobs,
    read_report,
)
from kubeinfer_operator.local.compile_variants import (
    VariantOutcome,
    run_compile,
    served,
    to_compile,
)
from kubeinfer_operator.local.manifest import LoadedEndpoint
from kubeinfer_operator.local.process import tail
from kubeinfer_runtime.contract.compile import CompileReport, CompileTarget

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

#: Characters of a job's message in the status table.
MAX_MESSAGE = 120
#: What the compiler prints before each finished stage (its progress lines).
_DONE_MARK = "✓"


# -- kubeinfer compile -----------------------------------------------------------------------


def compile_argv(model: str, *, target: str, out_dir: str, tune: float | None = None,
                 trials: int | None = None, allow_quantization: bool = False,
                 calibration: str | None = None, min_top1: float | None = None,
                 batch: int | None = None, threads: int | None = None,
                 measure: float | None = None, as_json: bool = False) -> list[str]:
    """The runtime compiler's command line for these options."""
    argv = [sys.executable, "-m", "kubeinfer_runtime", "compile", model, "--target", target,
            "--out", out_dir]
    for flag, value in (("--tune", tune), ("--trials", trials), ("--calibration", calibration),
                        ("--min-top1", min_top1), ("--batch", batch), ("--threads", threads),
                        ("--measure", measure)):
        if value is not None:
            argv += [flag, str(value)]
    if allow_quantization:
        argv.append("--allow-quantization")
    if as_json:
        argv.append("--json")
    return argv


def compile_command(
    model: Annotated[str, typer.Argument(help="The ONNX model: a path, file:// or s3:// URI.")],
    out_dir: Annotated[str, typer.Option("--out", help="Output folder: a path, file:// or "
                                                       "s3:// URI (artifact/, artifact.tar.gz, "
                                                       "report.json).")],
    target: Annotated[str, typer.Option(help="One of " + ", ".join(t.value for t in
                                                                   CompileTarget) + ".")]
    = CompileTarget.NATIVE.value,
    tune: Annotated[float | None, typer.Option(
        metavar="SECONDS", help="MetaSchedule tuning budget per batch size (default: no "
                                "tuning).", min=0)] = None,
    trials: Annotated[int | None, typer.Option(help="Most tuning trials per batch size.",
                                               min=1)] = None,
    allow_quantization: Annotated[bool, typer.Option(
        "--allow-quantization", help="Also try onnxruntime dynamic INT8 (gated on top-1 "
                                     "agreement).")] = False,
    calibration: Annotated[str | None, typer.Option(
        metavar="FILE", help="Inputs to check accuracy on (.npz/.npy).")] = None,
    min_top1: Annotated[float | None, typer.Option(
        "--min-top1", metavar="SHARE", help="Quantized candidates' least top-1 agreement "
                                            "(default 0.99).")] = None,
    batch: Annotated[int | None, typer.Option(
        metavar="N", help="A batch size to compile and measure besides 1.", min=1)] = None,
    threads: Annotated[int | None, typer.Option(help="Threads per inference (default 1).",
                                                min=1)] = None,
    measure: Annotated[float | None, typer.Option(
        metavar="SECONDS", help="Timing per candidate and batch size (default 1).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report JSON instead of "
                                                         "the table.")] = False,
) -> None:
    """Compile an ONNX model for a target (SageMaker Neo), measured against onnxruntime.

    Publishes the fastest candidate that passes the accuracy gate and is at least as
    fast as onnxruntime fp32, else the ONNX model itself; exit 0 either way, 42 when
    the model or options are wrong, 1 when compiling failed.
    """
    argv = compile_argv(model, target=target, out_dir=out_dir, tune=tune, trials=trials,
                        allow_quantization=allow_quantization, calibration=calibration,
                        min_top1=min_top1, batch=batch, threads=threads, measure=measure,
                        as_json=as_json)
    proc = subprocess.Popen(argv)
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        # The terminal's Ctrl-C reached the compiler too (same process group): let it end.
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        raise typer.Exit(130) from None
    raise typer.Exit(code)


# -- up -f on CompilationJobs ----------------------------------------------------------------


@dataclass
class _Target:
    paths: CompilePaths
    proc: subprocess.Popen[bytes] | None
    #: Started by this command (Ctrl-C stops it) rather than joined.
    started: bool
    last_line: str = ""
    result: CompileView | None = field(default=None)


def _last_stage_of(log: Path) -> str:
    """The compiler's latest finished stage (its last progress line in ``log``)."""
    lines = [ln.strip() for ln in tail(log, lines=40).splitlines()]
    done = [ln.removeprefix(_DONE_MARK).strip() for ln in lines if ln.startswith(_DONE_MARK)]
    return done[-1] if done else ""


def _last_stage(paths: CompilePaths) -> str:
    return _last_stage_of(paths.compiler_log)


def _line(v: CompileView) -> str:
    phase = v.state.phase.value if v.state else "Starting"
    stage = _last_stage(v.paths)
    retry = v.state.message if v.state and v.state.restarts and not v.state.phase.finished \
        else ""
    return f"{phase}: {stage or retry}" if stage or retry else phase


def _ms(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def candidates_table(report: CompileReport) -> Table:
    """Each candidate: p50 at every batch size, accuracy, speedup, chosen or why not."""
    sizes = report.batch_sizes or [1]
    table = Table(title=f"Candidates for {report.target}"
                        + (f" ({report.target_cpu})" if report.target_cpu else ""),
                  title_justify="left")
    table.add_column("candidate")
    for b in sizes:
        table.add_column(f"b{b} p50 ms", justify="right")
    for col in ("max-abs-diff", "top-1", "speedup"):
        table.add_column(col, justify="right")
    table.add_column("chosen / why", overflow="fold")
    for c in report.candidates:
        table.add_row(c.name.value, *(_ms(c.p50_ms.get(b)) for b in sizes),
                      "" if c.max_abs_diff is None else f"{c.max_abs_diff:.2g}",
                      "" if c.top1_agreement is None else f"{c.top1_agreement:.1%}",
                      "" if c.speedup is None else f"{c.speedup:.2f}x", c.note,
                      style="bold" if c.chosen else None)
    return table


def _report(v: CompileView, source: Path) -> bool:
    """Print how the job ended; True when it completed."""
    name, state = v.paths.name, v.state
    if state is None or not state.phase.finished:
        err.print(f"[red]CompilationJob {name}: its runner stopped without a result; see "
                  f"{v.paths.runner_log}[/red]", soft_wrap=True)
        return False
    if state.phase is CompilePhase.COMPLETE:
        report = read_report(v.paths.report)
        if report is not None and report.candidates:
            # A pipe or a log has no width to fit: do not squeeze the table into 80 columns.
            (out if out.is_terminal else Console(width=160)).print(candidates_table(report))
        out.print(f"[green]CompilationJob {name} complete:[/green] {state.message}",
                  soft_wrap=True)
        return True
    if state.phase is CompilePhase.STOPPED:
        out.print(f"CompilationJob {name} stopped; kubeinfer up -f {source} compiles it again",
                  soft_wrap=True)
        return False
    err.print(f"[red]CompilationJob {name} failed ({state.reason}):[/red] {state.message}",
              soft_wrap=True)
    err.print(f"  logs: {v.paths.logs}", soft_wrap=True)
    return False


def _follow(targets: list[_Target], source: Path) -> int:
    remaining = list(targets)
    status: Status | None = out.status("Compiling") if out.is_terminal else None
    if status is not None:
        status.start()
    try:
        while remaining:
            lines = []
            for target in list(remaining):
                v = view(target.paths)
                line = _line(v)
                lines.append(f"{target.paths.name}: {line}")
                if status is None and line != target.last_line:
                    out.print(f"  {target.paths.name}: {line}", soft_wrap=True)
                target.last_line = line
                ended = (target.proc.poll() is not None if target.proc is not None
                         else not target.paths.running())
                if ended:
                    target.result = view(target.paths)
                    remaining.remove(target)
            if status is not None:
                status.update("; ".join(lines))
            if remaining:
                wait_any(remaining, 0.25)
    finally:
        if status is not None:
            status.stop()
    ok = [_report(t.result, source) for t in targets if t.result is not None]
    return 0 if ok and all(ok) else 1


def _start(item: LoadedCompileJob, file: Path, *, detach: bool) -> _Target:
    paths = CompilePaths.for_job(item.name)
    job = local_compile_job(item, str(file))
    running = running_spec(paths)
    if running is not None:
        if running.run_hash != job.run_hash:
            raise Refused(f"CompilationJob {item.name} is running with another spec (a "
                          "CompilationJob cannot change while it runs); stop it with "
                          f"kubeinfer down {item.name}, then run kubeinfer up again")
        out.print(f"CompilationJob {item.name} is already running: following it",
                  soft_wrap=True)
        return _Target(paths, None, started=False)
    proc = start_runner(paths, job, detach=detach)
    out.print(f"Compiling CompilationJob {item.name}: {job.model} for {job.target} → "
              f"{job.output_uri} (logs in {paths.logs})", soft_wrap=True)
    return _Target(paths, proc, started=True)


_CLI: KindCli[LoadedCompileJob, _Target] = KindCli(
    kind="CompilationJob", again="compiles it again", doing="Compiling",
    start=lambda item, file, detach: _start(item, file, detach=detach),
    stop=lambda target: stop_job(target.paths, proc=target.proc),
    wait_started=lambda target, proc: wait_started(target.paths, proc),
    follow=_follow)


def up(file: Path, *, detach: bool, interrupts: tuple[type[BaseException], ...]) -> int:
    """Run the CompilationJobs of ``file``; the exit status. Raises SpecError (exit 2)."""
    return up_jobs(_CLI, load_compile_file(file), file, detach=detach, interrupts=interrupts,
                   out=out, err=err)


# -- up -f on Endpoints whose variants compile -----------------------------------------------


def compile_variants(loaded: list[LoadedEndpoint]) -> list[LoadedEndpoint]:
    """Each endpoint with the variants that say ``model.compile`` compiled and replaced by
    their artifacts; Refused (exit 1) naming the variant when one cannot be compiled."""
    ready = []
    for item in loaded:
        outcomes: dict[int, VariantOutcome] = {}
        for index, variant, step in to_compile(item):
            target = step.settings().get("target", "native")
            out_line = (f"Endpoint {item.name} variant {variant}: compiling "
                        f"{step.settings()['model_uri']} for {target}")
            status: Status | None = out.status(out_line) if out.is_terminal else None
            if status is None:
                out.print(out_line, soft_wrap=True)
            else:
                status.start()

            def tick(log: Path, status: Status | None = status, line: str = out_line) -> None:
                if status is not None:
                    stage = _last_stage_of(log)
                    status.update(f"{line}: {stage}" if stage else line)

            try:
                outcome = run_compile(item, variant, step, on_tick=tick)
            finally:
                if status is not None:
                    status.stop()
            if not outcome.ok:
                raise Refused(f"Endpoint {item.name} variant {variant}: {outcome.text()}")
            out.print(f"Endpoint {item.name} variant {variant}: {outcome.text()}",
                          soft_wrap=True)
            outcomes[index] = outcome
        ready.append(served(item, outcomes))
    return ready


# -- status and down ------------------------------------------------------------------------


def job_rows(name: str | None = None) -> list[dict[str, Any]]:
    """``status`` rows of local CompilationJobs (running, stopped or finished)."""
    candidates = [CompilePaths.for_job(name)] if name else known_compile_jobs()
    rows = []
    for paths in candidates:
        v = view(paths)
        if v.state is None:
            continue
        s = v.state
        phase = s.phase.value if v.running or s.phase.finished else "Stopped"
        rows.append({"job": s.name, "phase": phase, "running": v.running,
                     "target": s.target, "backend": s.backend or None,
                     "chosen": s.chosen or None, "speedup": s.speedup,
                     "artifact": s.artifact_uri or None, "model": s.model,
                     "output": s.output_uri, "reason": s.reason,
                     "message": s.message if s.phase.finished else _line(v),
                     "runner_pid": s.runner_pid if v.running else None})
    return rows


def print_jobs(rows: list[dict[str, Any]]) -> None:
    table = Table(title="CompilationJobs", title_justify="left")
    columns = ("job", "phase", "target", "backend", "speedup", "message")
    for col in columns:
        table.add_column(col, no_wrap=col != "message", overflow="fold")
    for row in rows:
        speedup = f"{row['speedup']:.2f}x" if row["speedup"] is not None else "-"
        message = row["message"] or row["model"]
        if len(message) > MAX_MESSAGE:  # the whole of it: kubeinfer status --json
            message = message[:MAX_MESSAGE - 1] + "…"
        table.add_row(row["job"], row["phase"], row["target"], row["backend"] or "-", speedup,
                      message)
    out.print(table)


def running_jobs() -> list[CompilePaths]:
    return [p for p in known_compile_jobs() if p.running()]


def down(paths: CompilePaths, *, timeout: float) -> str | None:
    """Stop a running job or forget a finished one. None when there is no such job."""
    if stop_job(paths, timeout=timeout):
        return f"Stopped CompilationJob {paths.name} (kubeinfer up -f FILE compiles it again)"
    if paths.root.is_dir():
        forget(paths)
        return (f"Removed CompilationJob {paths.name} from local state (its artifact stays "
                "under its output URI)")
    return None
