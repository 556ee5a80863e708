"""The ``kubeinfer`` command: run Endpoints locally, inspect them, generate CRDs, run the operator.

Local mode commands (``up``, ``status``, ``invoke``, ``down``) drive per-endpoint
supervisors through ``local.control``; this module only parses options, calls
that code and prints. Exit codes: 0 success, 1 failure (not ready, HTTP error,
CRDs out of date), 2 invalid input (manifest, options).
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any, TypeVar
from urllib.parse import quote, urlsplit

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperCommand, TyperGroup

from kubeinfer_operator import __version__
from kubeinfer_operator.errors import KubeinferError, SpecError
from kubeinfer_operator.local.control import (
    Liveness,
    Outcome,
    clean_all_stale,
    clean_stale,
    hand_over,
    liveness,
    start_supervisor,
    stop_endpoint,
    wait_applied,
)
from kubeinfer_operator.local.paths import (
    COMPILE_JOBS_DIR,
    FLEETS_DIR,
    TRANSFORM_JOBS_DIR,
    EndpointPaths,
    has_kind_state,
    known_endpoints,
    kubeinfer_home,
    private_home,
)
from kubeinfer_operator.local.process import port_free
from kubeinfer_operator.local.state import (
    EndpointState,
    events_size,
    read_desired,
    read_events,
    read_state,
)
from kubeinfer_operator.local.usage import async_usage_text, sample_body, usage_text
from kubeinfer_operator.local.view import process_rows, status_document, variant_rows

if TYPE_CHECKING:
    import httpx
    from rich.live import Live
    from typer._click.core import Command, Context  # typer 0.29 vendors click
    from typer._click.formatting import HelpFormatter

    from kubeinfer_operator.api.endpoint import AuthConfig
    from kubeinfer_operator.local.compile_state import CompilePaths
    from kubeinfer_operator.local.edge_state import FleetPaths
    from kubeinfer_operator.local.job_state import JobDir
    from kubeinfer_operator.local.transform_state import JobPaths

D = TypeVar("D", bound="JobDir")

#: Commands and command groups of the other kinds, by name: their modules (each kind's API
#: models, renderers and validators) are imported when the command runs or its help is
#: shown, so that ``kubeinfer status`` or ``down`` does not pay for every kind at every start.
_LAZY_COMMANDS: dict[str, tuple[str, str]] = {
    "compile": ("kubeinfer_operator.cli_compile", "compile_command"),
    "recommend": ("kubeinfer_operator.cli_recommend", "recommend_command"),
    "promote": ("kubeinfer_operator.cli_shadow", "promote_command"),
}
_LAZY_GROUPS: dict[str, tuple[str, str]] = {
    "shadow": ("kubeinfer_operator.cli_shadow", "shadow_app"),
    "edge": ("kubeinfer_operator.cli_edge", "edge_app"),
}
#: Every module the CLI imports only when a command needs it (``up`` and ``status`` load
#: cli_transform too): what checks of the CLI's imports must import themselves.
LAZY_MODULES = frozenset({m for m, _ in (*_LAZY_COMMANDS.values(), *_LAZY_GROUPS.values())}
                         | {"kubeinfer_operator.cli_transform"})


#: What the top-level help lists for each lazily imported command (the first paragraph of
#: its help), so that ``kubeinfer --help`` does not import every kind: a unit test holds
#: the help with these equal to the help with the commands themselves.
_LAZY_HELP: dict[str, str] = {
    "compile": "Compile an ONNX model for a target (SageMaker Neo), measured against onnxruntime.",
    "recommend": "Load-test candidate settings of an Endpoint's variant locally and recommend one.",
    "promote": "Make SHADOW production: its model replaces the variant's (name, weight and "
               "replicas\nstay), and it leaves spec.shadowVariants. Under a deploymentConfig "
               "this is a guarded\nrollout.",
    "shadow": "Shadow variants: how a shadow compares with production.",
    "edge": "Edge fleets: the device agent and a fleet's devices and rollout.",
}


def _lazy_command(name: str) -> Command:
    module, attribute = _LAZY_COMMANDS.get(name) or _LAZY_GROUPS[name]
    target = getattr(importlib.import_module(module), attribute)
    if isinstance(target, typer.Typer):
        command: Command = typer.main.get_group(target)
    else:
        holder = typer.Typer(add_completion=False)
        holder.command(name)(target)
        command = typer.main.get_command(holder)
    command.name = name
    return command


class _LazyGroup(TyperGroup):
    """The top-level group: its own commands, then the lazily imported ones."""

    _listing = False

    def format_help(self, ctx: Context, formatter: HelpFormatter) -> None:
        # Listing the commands needs each one's help text only, not its module.
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False

    def list_commands(self, ctx: Context) -> list[str]:
        # The order help always had: commands first (the kinds' ones leading), then groups.
        own = super().list_commands(ctx)
        at = own.index("secret") if "secret" in own else len(own)
        return [*_LAZY_COMMANDS, *own[:at], *_LAZY_GROUPS, *own[at:]]

    def get_command(self, ctx: Context, cmd_name: str) -> Command | None:
        if cmd_name in _LAZY_COMMANDS or cmd_name in _LAZY_GROUPS:
            if self._listing and cmd_name in _LAZY_HELP:
                return TyperCommand(name=cmd_name, help=_LAZY_HELP[cmd_name])
            return _lazy_command(cmd_name)
        return super().get_command(ctx, cmd_name)


app = typer.Typer(
    name="kubeinfer", cls=_LazyGroup, no_args_is_help=True, add_completion=False,
    help="SageMaker-style inference endpoints on Kubernetes, or as local processes.",
)
local_app = typer.Typer(hidden=True, help="Local-mode internals.")
app.add_typer(local_app, name="local")

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def _fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]Error:[/red] {message}", markup=True, soft_wrap=True)
    return typer.Exit(code)


#: What a Kubernetes Secret may hold, and so a local one.
_SECRET_MAX_BYTES = 1024 * 1024


#: How long --from-file waits for a pipe's writer.
_PIPE_WAIT_S = 10.0


def _read_pipe(path: Path, flag: str) -> bytes:
    """A pipe's or device's bytes (``<(command)``), up to _SECRET_MAX_BYTES: an error, not a
    hang, when nothing writes to it for _PIPE_WAIT_S seconds."""
    import select

    wait = _PIPE_WAIT_S
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        chunks: list[bytes] = []
        size = 0
        while True:
            if not select.select([fd], [], [], wait)[0]:
                raise _fail(f"{flag}: nothing wrote to {path} for {wait:.0f} s (a pipe with "
                            "no writer); give a regular file", 2)
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                continue
            if not chunk:
                return b"".join(chunks)
            size += len(chunk)
            if size > _SECRET_MAX_BYTES:
                raise _fail(f"{flag}: {path} gives over the 1 MiB a Secret may hold (as on "
                            "Kubernetes); give a smaller value", 2)
            chunks.append(chunk)
    finally:
        os.close(fd)


def _check_name(name: str | None) -> None:
    """Refuse a NAME that cannot be a local endpoint's or job's (it would name a folder
    outside $KUBEINFER_HOME/local, or none)."""
    if name is None:
        return
    if (not name or name in (".", "..") or any(c in name for c in "/\\\0")
            or len(name) > 253):
        raise _fail(f"{name[:60]!r} is not a valid name: give the metadata.name of an "
                    "Endpoint or job (lower-case letters, digits and '-'; kubeinfer status "
                    "lists them)", 2)


def _version(value: bool) -> None:
    if value:
        out.print(f"kubeinfer {__version__}")
        raise typer.Exit()


def _private_home() -> None:
    """Create $KUBEINFER_HOME for this user alone (``paths.private_home``) before writing."""
    try:
        private_home()
    except OSError as exc:
        raise _fail(f"Cannot create KUBEINFER_HOME={kubeinfer_home()}: "
                    f"{exc.strerror or exc}; point KUBEINFER_HOME at a folder you may write", 2
                    ) from exc


def _check_home() -> None:
    """$KUBEINFER_HOME (or the first of its parents that exists) must be a folder: else
    every command that reads or writes local state fails deep inside with an OSError."""
    home = kubeinfer_home()
    path = home
    while not path.exists() and path != path.parent:
        if path.is_symlink():  # dangling, or a loop
            break
        path = path.parent
    if path.is_dir():
        return
    where = "KUBEINFER_HOME" if path == home else f"{path} (a parent of KUBEINFER_HOME)"
    raise _fail(f"KUBEINFER_HOME={home} cannot hold local state: {where} is not a folder; "
                "point KUBEINFER_HOME at a folder (or unset it for ~/.kubeinfer)", 2)


@app.callback()
def _main(
    ctx: typer.Context,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """kubeinfer: one Endpoint YAML runs on a laptop (kubeinfer up) and on a cluster."""
    if (ctx.invoked_subcommand not in ("crds", "operator") and not ctx.resilient_parsing
            and not {"--help", "-h"} & set(sys.argv[1:])):
        _check_home()


# -- up ------------------------------------------------------------------------------------


class _Terminated(Exception):
    """SIGTERM, turned into an exception so foreground ``up`` cleans up like on Ctrl-C."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise _Terminated()


@contextmanager
def _stop_signals_as_exceptions() -> Iterator[None]:
    """SIGTERM raises _Terminated, SIGINT KeyboardInterrupt, even where SIGINT was inherited
    as ignored (a background job of a non-interactive shell), so both always clean up."""
    previous_term = signal.signal(signal.SIGTERM, _raise_terminated)
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        signal.signal(signal.SIGINT, previous_int)


def _progress_table(states: dict[str, EndpointState | None]) -> Table:
    table = Table(box=None, pad_edge=False, show_header=True, header_style="bold")
    for col in ("endpoint", "phase", "process", "state", "detail"):
        table.add_column(col)
    for name, state in states.items():
        if state is None:
            table.add_row(name, "Starting", "supervisor", "starting", "")
            continue
        for p in state.processes:
            table.add_row(name, state.phase.value, p.name, p.state.value, p.reason)
    return table


class _Progress:
    """Live table on a terminal; one line per change otherwise (logs, CI, tests)."""

    def __init__(self, generations: dict[str, int]) -> None:
        self.live: Live | None = None  # rich.live: imported only on a terminal
        self.last: dict[str, str] = {}
        #: The generation ``up`` waits for, per endpoint: an older state is not news.
        self.generations = generations

    def __enter__(self) -> _Progress:
        if out.is_terminal:
            from rich.live import Live

            self.live = Live(_progress_table({}), console=out, transient=True,
                             refresh_per_second=8)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.__exit__(None, None, None)

    def tick(self, states: dict[str, EndpointState | None]) -> None:
        if self.live is not None:
            self.live.update(_progress_table(states))
            return
        for name, state in states.items():
            if state is None:
                line = "Starting"
            elif state.generation < self.generations.get(name, 0):
                line = "Waiting for the supervisor to pick up the new spec"
            else:
                line = f"{state.phase.value}: {state.message}" if state.message \
                    else state.phase.value
            if self.last.get(name) != line:
                self.last[name] = line
                out.print(f"  {name}: {line}", soft_wrap=True)


def _sample_for(state: EndpointState) -> str | None:
    """A request body that fits the first ready model server's input (V2 metadata).

    Asks V2 model readiness first, which never loads anything: a multi-model
    server has no model named after the variant, so it answers 400 and ``up``
    prints the placeholder instead of making the server look the name up (a
    cache miss and a failed load in its metrics before any request).
    """
    import httpx  # here: it costs every other command a quarter second to import

    for p in state.processes:
        if p.role == "model-server" and p.routed and p.variant:
            model = f"{p.url}/v2/models/{quote(p.variant, safe='')}"
            try:
                if httpx.get(f"{model}/ready", timeout=2.0).status_code != 200:
                    return None
                meta = httpx.get(model, timeout=2.0).json()
            except (httpx.HTTPError, ValueError):
                return None
            return sample_body(meta if isinstance(meta, dict) else None)
    return None


def _report_ready(state: EndpointState, *, updated: bool) -> None:
    url = state.url or "(unknown)"
    changes = state.last_apply.changes if state.last_apply is not None else []
    verb = ("updated" if changes else "unchanged") if updated else "ready"
    out.print(f"[green]Endpoint {state.endpoint} is {verb}[/green] at {url}")
    for v in state.variants:
        out.print(f"  variant {v.name}: weight {v.weight:g}, {v.ready}/{v.replicas} ready, "
                  f"model {v.model_uri}", soft_wrap=True)
    if updated:
        for change in changes:
            out.print(f"  changed: {change}", soft_wrap=True)
    if not updated:
        is_async = any(p.role == "async-worker" for p in state.processes)
        text = (async_usage_text(state.endpoint, url) if is_async
                else usage_text(state.endpoint, url, _sample_for(state)))
        out.print(text, markup=False, soft_wrap=True, highlight=False)


def _stop_started(started: dict[str, tuple[EndpointPaths, subprocess.Popen[bytes]]]) -> None:
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not orphan
    try:
        for name, (paths, proc) in started.items():
            stop_endpoint(paths, proc=proc)
            out.print(f"Stopped endpoint {name}")
    finally:
        signal.signal(signal.SIGINT, previous)


def _follow(started: dict[str, tuple[EndpointPaths, subprocess.Popen[bytes]]]) -> int:
    """Print supervisors' events until they exit; Ctrl-C / SIGTERM stops them all."""
    offsets = {name: events_size(paths) for name, (paths, _) in started.items()}
    names = ", ".join(started)
    out.print(f"Running {names} in the foreground: Ctrl-C stops it "
              f"(or run kubeinfer up -d to keep it in the background)")
    remaining = dict(started)
    failed = False
    while remaining:
        for name, (paths, proc) in list(remaining.items()):
            events, offsets[name] = read_events(paths, offsets[name])
            for event in events:
                style = "red" if event.get("level") == "error" else "dim"
                out.print(f"[{style}]{name}[/{style}] {event.get('message', '')}",
                          soft_wrap=True)
            code = proc.poll()
            if code is not None:
                if code != 0:
                    failed = True
                    err.print(f"[red]Supervisor of endpoint {name} exited with {code}; "
                              f"see {paths.supervisor_log}[/red]")
                else:
                    out.print(f"Endpoint {name} was stopped")
                del remaining[name]
        time.sleep(0.3)
    return 1 if failed else 0


@app.command()
def up(
    file: Annotated[Path, typer.Option("-f", "--file", help="Endpoint manifest (YAML, may hold "
                                                            "several documents).")],
    detach: Annotated[bool, typer.Option("-d", "--detach", help="Run in the background and "
                                                                "return once ready.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for readiness.", min=1)] = 120,
    port: Annotated[int | None, typer.Option(
        help="Gateway port when the endpoint starts (default: a free port).", min=1,
        max=65535)] = None,
) -> None:
    """Run the Endpoints of FILE as local processes, or update them when they already run.

    A file holding TransformJobs or CompilationJobs runs them to completion instead
    (exit 0: complete, 1: failed); -d leaves them running in the background.
    """
    kinds = _kinds(file)
    _private_home()
    if "RecommendationJob" in kinds:
        raise _fail(f"{file} holds a RecommendationJob, which runs on Kubernetes (kubectl "
                    "apply -f). Locally, run the same search with `kubeinfer recommend -f "
                    "ENDPOINT.yaml --candidates CANDIDATES.yaml` (see examples/"
                    "recommend-endpoint.yaml and examples/recommend-candidates.yaml)", 2)
    if "EdgeFleet" in kinds:
        from kubeinfer_operator import cli_edge

        with _stop_signals_as_exceptions():
            try:
                raise typer.Exit(cli_edge.up(file, detach=detach, port=port, timeout=timeout,
                                             interrupts=(KeyboardInterrupt, _Terminated)))
            except SpecError as exc:
                raise _fail(f"Invalid manifest {file}:\n{exc}", 2) from exc
    if "CompilationJob" in kinds:
        from kubeinfer_operator import cli_compile

        raise typer.Exit(_up_jobs(file, detach=detach, port=port, kind="CompilationJobs",
                                  run=cli_compile.up))
    if "TransformJob" in kinds:
        from kubeinfer_operator import cli_transform

        raise typer.Exit(_up_jobs(file, detach=detach, port=port, kind="TransformJobs",
                                  run=cli_transform.up))
    from kubeinfer_operator.local.manifest import load_manifest_file
    from kubeinfer_runtime.contract.auth import AuthMode

    try:
        loaded = load_manifest_file(file)
    except SpecError as exc:
        raise _fail(f"Invalid manifest {file}:\n{exc}", 2) from exc
    if any(item.compiles for item in loaded):
        from kubeinfer_operator import cli_compile

        try:  # variants whose model says compile: compiled first, then served as the artifact
            loaded = cli_compile.compile_variants(loaded)
        except cli_compile.Refused as exc:
            raise _fail(str(exc)) from exc
    if port is not None and len(loaded) > 1:
        raise _fail(f"--port sets one gateway port but {file} holds {len(loaded)} endpoints; "
                    "drop --port", 2)
    if port is not None:
        _check_port(loaded[0].name, port)
    started: dict[str, tuple[EndpointPaths, subprocess.Popen[bytes]]] = {}
    targets: list[tuple[EndpointPaths, int, subprocess.Popen[bytes] | None]] = []
    updated: set[str] = set()
    with _stop_signals_as_exceptions():
        try:
            for item in loaded:
                paths = EndpointPaths.for_endpoint(item.name)
                note = clean_stale(paths)
                if note:
                    out.print(note)
                auth = item.endpoint.spec.auth
                if auth is None or auth.mode in (None, AuthMode.NONE):
                    out.print(f"Endpoint {item.name}: callers are not authenticated (local "
                              "mode's default; the gateway listens on 127.0.0.1 only); set "
                              "spec.auth.mode SigV4 or Token to require credentials",
                              soft_wrap=True)
                running = liveness(paths) is Liveness.RUNNING
                generation = hand_over(paths, item, timeout_s=timeout, gateway_port=port,
                                       running=running)
                proc = None
                if running:
                    updated.add(item.name)
                    out.print(f"Endpoint {item.name} is running: applying generation "
                              f"{generation}")
                else:
                    proc = start_supervisor(paths, detach=detach)
                    started[item.name] = (paths, proc)
                    out.print(f"Starting endpoint {item.name} (logs in {paths.logs})")
                targets.append((paths, generation, proc))
            with _Progress({p.name: g for p, g, _ in targets}) as progress:
                outcomes = wait_applied(targets, timeout + 15, on_tick=progress.tick)
        except (KeyboardInterrupt, _Terminated):
            err.print("Interrupted: stopping what this command started")
            _stop_started(started)
            raise typer.Exit(130) from None
        failed = _report(outcomes, updated)
        if failed:
            fresh = {n: started[n] for n in failed if n in started}
            if fresh:
                _stop_started(fresh)
            raise typer.Exit(1)
        if detach or not started:
            if started:
                out.print(f"Running in the background; stop with: kubeinfer down "
                          f"{' '.join(started)}")
            return
        try:
            code = _follow(started)
        except (KeyboardInterrupt, _Terminated):
            out.print("Stopping...")
            _stop_started(started)
            return
    raise typer.Exit(code)


def _check_port(name: str, port: int) -> None:
    """``--port`` for one endpoint: free, or the port its running gateway already has (a
    running gateway keeps its port; the new spec alone would silently not move it)."""
    paths = EndpointPaths.for_endpoint(name)
    if liveness(paths) is not Liveness.RUNNING:
        if not port_free(port):
            raise _fail(f"Port {port} on 127.0.0.1 is in use; choose another --port or leave "
                        "it out to get a free one", 2)
        return
    state = read_state(paths)
    try:
        running_port = urlsplit(state.url).port if state is not None and state.url else None
    except ValueError:
        running_port = None
    if running_port is not None and running_port != port:
        raise _fail(f"Endpoint {name} is running with its gateway on port {running_port}, "
                    f"which it keeps while it runs: drop --port {port}, or run kubeinfer "
                    f"down {name} first to move it", 2)


def _kinds(file: Path) -> set[str]:
    """The kinds of the objects ``file`` holds (unreadable: none; the loader says why)."""
    from kubeinfer_operator.local.manifest_io import read_manifest, yaml_documents
    try:
        docs = yaml_documents(read_manifest(file), str(file))
    except SpecError:
        return set()
    return {d["kind"] for d in docs if isinstance(d, dict) and isinstance(d.get("kind"), str)}


def _up_jobs(file: Path, *, detach: bool, port: int | None, kind: str,
             run: Callable[..., int]) -> int:
    if port is not None:
        raise _fail(f"--port sets a gateway port; {file} holds {kind}, which serve "
                    "nothing: drop --port", 2)
    with _stop_signals_as_exceptions():
        try:
            return run(file, detach=detach, interrupts=(KeyboardInterrupt, _Terminated))
        except SpecError as exc:
            raise _fail(f"Invalid manifest {file}:\n{exc}", 2) from exc


def _report(outcomes: dict[str, Outcome], updated: set[str]) -> list[str]:
    failed = []
    for name, outcome in outcomes.items():
        if outcome.ok and outcome.state is not None:
            _report_ready(outcome.state, updated=name in updated)
        else:
            failed.append(name)
            still = " (the previous version keeps serving)" if name in updated else ""
            err.print(f"[red]Endpoint {name} failed{still}:[/red] {outcome.message}",
                      soft_wrap=True)
    return failed


# -- status --------------------------------------------------------------------------------


def _running_states(name: str | None) -> tuple[list[EndpointState], list[str], list[str]]:
    """(states of the running endpoints, notes to print, the notes of those among them
    whose state file is unreadable: running, but not to be reported as stopped)."""
    notes = clean_all_stale()
    candidates = [EndpointPaths.for_endpoint(name)] if name else known_endpoints()
    states = []
    unreadable = []
    for paths in candidates:
        if liveness(paths) is Liveness.RUNNING:
            state = read_state(paths)
            if state is not None:
                states.append(state)
            else:
                unreadable.append(_unreadable_state(paths))
    return states, notes + unreadable, unreadable


def _unreadable_state(paths: EndpointPaths) -> str:
    return (f"Endpoint {paths.name} runs (its supervisor holds {paths.root}/supervisor.lock) "
            f"but its state file {paths.state} is unreadable: run kubeinfer up -f FILE "
            "again to rewrite it, or see logs/supervisor.log there")


@app.command()
def status(
    name: Annotated[str | None, typer.Argument(help="Endpoint name (default: all).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Show local endpoints (URL, variants, every process with its pid, port and state),
    TransformJobs (phase, progress, records, rate) and CompilationJobs (phase, target,
    backend, speedup)."""
    _check_name(name)
    states, notes, unreadable = _running_states(name)
    # Each kind's module only where local mode holds state of that kind: importing one
    # costs more than the command's own work.
    jobs: list[dict[str, Any]] = []
    compiles: list[dict[str, Any]] = []
    fleets: list[dict[str, Any]] = []
    if has_kind_state(TRANSFORM_JOBS_DIR):
        from kubeinfer_operator import cli_transform

        jobs = cli_transform.job_rows(name)
    if has_kind_state(COMPILE_JOBS_DIR):
        from kubeinfer_operator import cli_compile

        compiles = cli_compile.job_rows(name)
    if has_kind_state(FLEETS_DIR):
        from kubeinfer_operator import cli_edge

        fleets = cli_edge.fleet_rows(name)
    if as_json:
        typer.echo(json.dumps({**status_document(states, notes), "jobs": jobs,
                               "compilation_jobs": compiles, "edge_fleets": fleets},
                              indent=2))
    else:
        for note in notes:
            err.print(note)
        if states or not (jobs or compiles or fleets or unreadable):
            _print_status(states)
        if jobs:
            cli_transform.print_jobs(jobs)
        if compiles:
            cli_compile.print_jobs(compiles)
        if fleets:
            cli_edge.print_fleets(fleets)
    if name and not states and not jobs and not compiles and not fleets:
        if unreadable:
            raise typer.Exit(1)
        raise _fail(f"Endpoint {name} is not running; start it with kubeinfer up -f FILE")


def _print_status(states: list[EndpointState]) -> None:
    if not states:
        out.print("No local endpoint is running; start one with kubeinfer up -f FILE")
        return
    endpoints = Table(title="Endpoints", title_justify="left")
    for col in ("endpoint", "phase", "url", "generation", "message"):
        endpoints.add_column(col)
    for s in states:
        endpoints.add_row(s.endpoint, s.phase.value, s.url or "-", str(s.observed_generation),
                          s.message)
    out.print(endpoints)
    variants = Table(title="Variants", title_justify="left")
    for col in ("endpoint", "variant", "weight", "replicas", "model"):
        variants.add_column(col)
    for s in states:
        for row in variant_rows(s):
            variants.add_row(*(row[c] for c in ("endpoint", "variant", "weight", "replicas",
                                                "model")))
    out.print(variants)
    if any(s.rollouts for s in states):  # spec.deploymentConfig
        rollouts = Table(title="Rollouts", title_justify="left")
        for col in ("endpoint", "variant", "phase", "step", "on green", "message"):
            rollouts.add_column(col)
        for s in states:
            for r in s.rollouts:
                rollouts.add_row(s.endpoint, str(r.get("variant")), str(r.get("phase")),
                                 f"{r.get('step', 0)}/{r.get('steps', 0)}",
                                 f"{float(r.get('trafficToGreen', 0)):.4g}%",
                                 str(r.get("message", "")))
        out.print(rollouts)
    procs = Table(title="Processes", title_justify="left")
    columns = ("endpoint", "process", "pid", "port", "state", "restarts", "last exit", "reason")
    for col in columns:
        # Names, pids and ports must stay whole; the free-text reason wraps instead.
        procs.add_column(col, no_wrap=col != "reason", overflow="fold")
    for s in states:
        for row in process_rows(s):
            procs.add_row(*(row[c] for c in columns))
    out.print(procs)


# -- invoke --------------------------------------------------------------------------------


@app.command()
def invoke(
    name: Annotated[str, typer.Argument(help="Endpoint name.")],
    body: Annotated[str | None, typer.Option(help="Request body.")] = None,
    body_file: Annotated[Path | None, typer.Option(help="Read the body from a file "
                                                        "('-': stdin).")] = None,
    content_type: Annotated[str, typer.Option(help="Content-Type of the body.")]
    = "application/json",
    accept: Annotated[str | None, typer.Option(help="Accept: the response type wanted.")]
    = None,
    variant: Annotated[str | None, typer.Option(help="TargetVariant: pin one variant.")]
    = None,
    custom_attributes: Annotated[str | None, typer.Option(
        help="X-Amzn-SageMaker-Custom-Attributes.")] = None,
    target_model: Annotated[str | None, typer.Option(
        help="TargetModel: the model of a multi-model endpoint, relative to its prefix.")]
    = None,
    target_container: Annotated[str | None, typer.Option(
        help="TargetContainerHostname: the step of a Direct multi-container endpoint.")]
    = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the answer.",
                                           min=0.001)] = 60,
) -> None:
    """Call a local endpoint through its gateway (SageMaker InvokeEndpoint)."""
    _check_name(name)
    if (body is None) == (body_file is None):
        raise _fail("Give the request body with exactly one of --body or --body-file", 2)
    for flag, value in (("--content-type", content_type), ("--accept", accept),
                        ("--variant", variant), ("--custom-attributes", custom_attributes),
                        ("--target-model", target_model),
                        ("--target-container", target_container)):
        if value is not None and not all(" " <= c <= "~" for c in value):
            raise _fail(f"{flag} holds a control character or non-ASCII text: it is sent as "
                        "an HTTP header, so give printable ASCII only", 2)
    if body is not None:
        # Bytes that are not UTF-8 reach argv as surrogates: send them as they were given.
        data = body.encode("utf-8", "surrogateescape")
    else:
        assert body_file is not None
        try:
            data = sys.stdin.buffer.read() if str(body_file) == "-" else body_file.read_bytes()
        except OSError as exc:
            raise _fail(f"Cannot read --body-file {body_file}: {exc.strerror or exc}", 2) from exc
    states, _, unreadable = _running_states(name)
    if not states or not states[0].url:
        raise _fail(unreadable[0] if unreadable
                    else f"Endpoint {name} is not running; start it with kubeinfer up -f FILE")
    headers = {"Content-Type": content_type}
    if accept:
        headers["Accept"] = accept
    if variant:
        headers["X-Amzn-SageMaker-Target-Variant"] = variant
    if custom_attributes:
        headers["X-Amzn-SageMaker-Custom-Attributes"] = custom_attributes
    if target_model:
        headers["X-Amzn-SageMaker-Target-Model"] = target_model
    if target_container:
        headers["X-Amzn-SageMaker-Target-Container-Hostname"] = target_container
    import httpx

    url = f"{states[0].url}/endpoints/{name}/invocations"
    auth = _auth_of(name)
    if auth is not None:  # credentials' models and botocore only for an endpoint that asks
        from kubeinfer_operator.local.credentials import LocalAuthError, caller_headers

        try:
            headers = caller_headers(auth, "POST", url, data, headers)
        except (LocalAuthError, OSError) as exc:
            raise _fail(f"Cannot sign the request to endpoint {name}: {exc}") from exc
    try:
        response = httpx.post(url, content=data, headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        raise _fail(f"Cannot reach the gateway of endpoint {name} at {url}: {exc}") from exc
    invoked = response.headers.get("x-amzn-invoked-production-variant", "-")
    err.print(f"HTTP {response.status_code} {response.reason_phrase}  variant: {invoked}")
    if response.is_success:
        typer.echo(response.text)
        return
    raise _fail(_error_message(response))


def _auth_of(name: str) -> AuthConfig | None:
    """The running endpoint's ``spec.auth``, from the spec its supervisor was handed."""
    desired = read_desired(EndpointPaths.for_endpoint(name))
    auth = ((desired.manifest.get("spec") or {}).get("auth")
            if desired is not None else None)
    if not isinstance(auth, dict):
        return None
    from kubeinfer_operator.api.endpoint import AuthConfig

    try:
        return AuthConfig.model_validate(auth)
    except ValueError:
        return None


def _error_message(response: httpx.Response) -> str:
    try:
        payload: Any = response.json()
    except ValueError:
        payload = None
    if isinstance(payload, dict) and "Message" in payload:
        return f"{payload.get('ErrorCode', response.status_code)}: {payload['Message']}"
    return response.text.strip() or f"HTTP {response.status_code}"


# -- down ----------------------------------------------------------------------------------


@app.command()
def down(
    name: Annotated[str | None, typer.Argument(help="Endpoint to stop.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Stop every local endpoint.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait before killing.",
                                           min=0)] = 30,
) -> None:
    """Stop a local endpoint and every process it runs, or a TransformJob or CompilationJob
    (a later up resumes or recompiles it; down on a finished job forgets it). Stopping a
    stopped one is fine."""
    _check_name(name)
    if name and all_:
        raise _fail("Give an endpoint name or --all, not both", 2)
    if all_:
        targets = known_endpoints()
    elif name:
        targets = [EndpointPaths.for_endpoint(name)]
    else:
        targets = [p for p in known_endpoints() if liveness(p) is not Liveness.STOPPED]
    jobs, compiles, fleets = _jobs_to_stop(name, all_=all_)
    if name and (jobs or compiles or fleets) and liveness(targets[0]) is Liveness.STOPPED:
        targets = []
    if not name and not all_ and len(targets) + len(jobs) + len(compiles) + len(fleets) > 1:
        names = ", ".join([p.name for p in targets] + [p.name for p in jobs]
                          + [p.name for p in compiles] + [p.name for p in fleets])
        raise _fail(f"Several endpoints or jobs run ({names}): name one or use --all", 2)
    stops: list[Callable[[], str | None]] = []
    if jobs:
        from kubeinfer_operator import cli_transform

        stops += [partial(cli_transform.down, j, timeout=timeout) for j in jobs]
    if compiles:
        from kubeinfer_operator import cli_compile

        stops += [partial(cli_compile.down, c, timeout=timeout) for c in compiles]
    if fleets:
        from kubeinfer_operator import cli_edge

        stops += [partial(cli_edge.down, f, timeout=timeout) for f in fleets]
    for stop in stops:
        try:
            message = stop()
        except KubeinferError as exc:
            raise _fail(str(exc)) from exc
        if message:
            out.print(message)
    if not targets:
        if not (jobs or compiles or fleets):
            out.print("No local endpoint is running")
        return
    for paths in targets:
        try:
            stopped = stop_endpoint(paths, timeout=timeout)
        except KubeinferError as exc:
            raise _fail(str(exc)) from exc
        out.print(f"Stopped endpoint {paths.name}" if stopped
                  else f"Endpoint {paths.name} is not running")


def _jobs_to_stop(name: str | None, *, all_: bool) \
        -> tuple[list[JobPaths], list[CompilePaths], list[FleetPaths]]:
    """The TransformJobs, CompilationJobs and EdgeFleets ``down`` stops: NAME's, every one
    (--all) or the running ones (neither). A kind's modules are imported only where local
    mode holds state of that kind."""
    jobs: list[JobPaths] = []
    compiles: list[CompilePaths] = []
    fleets: list[FleetPaths] = []
    if has_kind_state(TRANSFORM_JOBS_DIR):
        from kubeinfer_operator import cli_transform
        from kubeinfer_operator.local.transform_state import JobPaths, known_jobs

        jobs = _pick(name, JobPaths.for_job, known_jobs if all_ else cli_transform.running_jobs)
    if has_kind_state(COMPILE_JOBS_DIR):
        from kubeinfer_operator import cli_compile
        from kubeinfer_operator.local.compile_state import CompilePaths, known_compile_jobs

        compiles = _pick(name, CompilePaths.for_job,
                         known_compile_jobs if all_ else cli_compile.running_jobs)
    if has_kind_state(FLEETS_DIR):
        from kubeinfer_operator.local.edge_state import FleetPaths, known_fleets

        fleets = _pick(name, FleetPaths.for_fleet,
                       lambda: [f for f in known_fleets() if f.running()])
    return jobs, compiles, fleets


def _pick(name: str | None, named: Callable[[str], D], others: Callable[[], list[D]]) \
        -> list[D]:
    """NAME's folder when it exists (none when it does not), else ``others()``."""
    if name:
        one = named(name)
        return [one] if one.root.is_dir() else []
    return others()


# -- secret ----------------------------------------------------------------------------------

secret_app = typer.Typer(help="Local mode's Secrets (the credentials auth.secretName names).")
app.add_typer(secret_app, name="secret")


@secret_app.command("create")
def secret_create(
    name: Annotated[str, typer.Argument(help="The Secret's name (auth.secretName).")],
    literal: Annotated[list[str] | None, typer.Option(
        "--from-literal", help="KEY=VALUE, e.g. AWS_ACCESS_KEY_ID=... (repeatable).")] = None,
    from_file: Annotated[list[str] | None, typer.Option(
        "--from-file", help="KEY=PATH: the file's content under KEY, e.g. "
                            "credentials=~/.aws/credentials (repeatable).")] = None,
) -> None:
    """Write Secret NAME under $KUBEINFER_HOME/secrets (like kubectl create secret generic)."""
    from kubeinfer_operator.local.credentials import create_secret

    _private_home()

    entries: dict[str, bytes] = {}
    for item in literal or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise _fail(f"--from-literal {key!r} has no '=': write KEY=VALUE", 2)
        # Bytes that are not UTF-8 reach argv as surrogates: keep them as they were given.
        entries[key] = value.encode("utf-8", "surrogateescape")
    for item in from_file or []:
        key, sep, path = item.partition("=")
        if not sep:
            raise _fail(f"--from-file {key!r} has no '=': write KEY=PATH", 2)
        try:
            source = Path(path).expanduser()
            if source.exists() and not source.is_file() and not source.is_dir():
                entries[key] = _read_pipe(source, f"--from-file {key}")  # e.g. <(command)
            elif source.is_file() and source.stat().st_size > _SECRET_MAX_BYTES:
                raise _fail(f"--from-file {key}: {path} is over the 1 MiB a Secret may hold "
                            "(as on Kubernetes); give the key a smaller file", 2)
            else:
                entries[key] = source.read_bytes()
        except OSError as exc:
            raise _fail(f"--from-file {key}: cannot read {path}: {exc.strerror}", 2) from exc
    try:
        folder = create_secret(name, entries)
    except ValueError as exc:
        raise _fail(str(exc), 2) from exc
    out.print(f"Secret {name} written to {folder} ({len(entries)} key(s), readable by you "
              "only)")


# -- crds ----------------------------------------------------------------------------------


@app.command()
def crds(
    out_dir: Annotated[Path, typer.Option("--out", help="Directory of the CRD files.")]
    = Path("crds"),
    check: Annotated[bool, typer.Option(help="Exit 1 when the files differ from the API "
                                             "models instead of writing them.")] = False,
) -> None:
    """Write the CustomResourceDefinitions generated from the API models."""
    from kubeinfer_operator.api.crd import all_crds, to_yaml

    rendered = {name: to_yaml(obj) for name, obj in all_crds().items()}
    if check:
        stale = [name for name, text in rendered.items()
                 if not (out_dir / name).is_file()
                 or (out_dir / name).read_bytes() != text.encode()]
        if stale:
            raise _fail(f"CRDs out of date in {out_dir}: {', '.join(sorted(stale))}; "
                        f"run kubeinfer crds --out {out_dir} and commit the result")
        out.print(f"CRDs in {out_dir} are up to date")
        return
    if out_dir.exists() and not out_dir.is_dir():
        raise _fail(f"--out {out_dir} is not a folder: give a folder for the CRD files", 2)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, text in rendered.items():
            (out_dir / name).write_text(text)
            out.print(f"wrote {out_dir / name}")
    except OSError as exc:
        raise _fail(f"Cannot write the CRDs to {out_dir}: {exc.strerror or exc} "
                    f"({exc.filename}); give --out a folder you can write", 2) from exc


# -- operator ------------------------------------------------------------------------------


@app.command()
def operator() -> None:
    """Run the Kubernetes operator (in the cluster, or against the current kubeconfig)."""
    from kubeinfer_operator.settings import OperatorSettings

    try:
        # Imported lazily: local mode must not need kopf's import time or a cluster.
        module = importlib.import_module("kubeinfer_operator.main")
    except ModuleNotFoundError as exc:
        if exc.name != "kubeinfer_operator.main":
            raise
        raise _fail("The Kubernetes operator is not part of this build "
                    "(kubeinfer_operator.main is missing)") from exc
    module.run(OperatorSettings())


# -- local internals -----------------------------------------------------------------------


@local_app.command("supervise")
def supervise(
    state_dir: Annotated[Path, typer.Option(help="The endpoint's state directory.")],
) -> None:
    """Supervise one endpoint's processes (started by kubeinfer up)."""
    from kubeinfer_operator.local.supervisor import run_supervisor

    raise typer.Exit(run_supervisor(state_dir))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
