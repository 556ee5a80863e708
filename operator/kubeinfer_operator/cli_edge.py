"""The ``kubeinfer`` commands of edge fleets: ``up -f`` of an EdgeFleet, ``edge agent``,
``edge status`` and ``edge devices``.

An EdgeFleet runs locally as a runner process (``local.edge_runner``): it packages
the model per target, keeps a Redis and the fleet server up, and starts a
rollout when ``up -f`` hands it a changed manifest. Devices — other machines,
or processes here — run ``kubeinfer edge agent`` against the server's URL.
``edge status``/``edge devices`` read the fleet server's own view (the same
``GET /v1/fleet`` the operator reads on a cluster).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Annotated, TypeVar
from urllib.parse import quote

import httpx
import typer
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

from kubeinfer_operator.agent_exec import exec_agent
from kubeinfer_operator.cli_jobs import Refused
from kubeinfer_operator.local.edge_control import (
    LoadedFleet,
    load_fleet_file,
    start_fleet,
    stop_fleet,
    wait_applied,
)
from kubeinfer_operator.local.edge_state import (
    FleetPaths,
    FleetPhase,
    known_fleets,
    read_fleet_state,
)
from kubeinfer_runtime.contract.edge import DeviceHistory, DeviceList, FleetStatus

M = TypeVar("M", bound=BaseModel)

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

edge_app = typer.Typer(help="Edge fleets: the device agent and a fleet's devices and rollout.")

#: Seconds between the rollout lines ``up`` prints while it follows a fleet.
FOLLOW_INTERVAL_S = 2.0


# -- up ------------------------------------------------------------------------------------


def up(file: Path, *, detach: bool, port: int | None, timeout: float,
       interrupts: tuple[type[BaseException], ...]) -> int:
    """Start or update the EdgeFleets of ``file``; the exit status."""
    loaded = load_fleet_file(file, port=port)
    started: list[tuple[LoadedFleet, subprocess.Popen[bytes] | None]] = []
    try:
        for item in loaded:
            paths = FleetPaths.for_fleet(item.fleet.name)
            proc = start_fleet(paths, item.fleet, detach=detach)
            started.append((item, proc))
            out.print(("Starting" if proc is not None else "Updating")
                      + f" EdgeFleet {item.fleet.name} version {item.fleet.version} "
                      f"(logs in {paths.logs})", soft_wrap=True)
        failed = False
        for item, proc in started:
            paths = FleetPaths.for_fleet(item.fleet.name)
            ok, message = wait_applied(paths, item.fleet.version, proc, timeout)
            if not ok:
                err.print(f"[red]EdgeFleet {item.fleet.name}:[/red] {message}", soft_wrap=True)
                failed = True
                continue
            _print_ready(paths)
        if failed:
            for item, proc in started:
                if proc is not None:
                    stop_fleet(FleetPaths.for_fleet(item.fleet.name), timeout=30, proc=proc)
            return 1
        if detach or all(proc is None for _, proc in started):
            names = " ".join(i.fleet.name for i, _ in started)
            out.print(f"Running in the background; follow with: kubeinfer edge status "
                      f"{names}; stop with: kubeinfer down {names}", soft_wrap=True)
            return 0
        return _follow([i.fleet.name for i, p in started if p is not None])
    except interrupts:
        err.print("Stopping...")
        for item, proc in started:
            if proc is not None:
                stop_fleet(FleetPaths.for_fleet(item.fleet.name), timeout=30, proc=proc)
        return 130


def _print_ready(paths: FleetPaths) -> None:
    state = read_fleet_state(paths)
    if state is None or state.current is None:
        return
    out.print(f"[green]EdgeFleet {state.name} serves version {state.current.version}[/green] "
              f"on {state.url} (targets: {', '.join(sorted(state.current.packages))})",
              soft_wrap=True)
    target = next(iter(sorted(state.current.packages)), "TARGET")
    out.print("Connect a device (bootstrap token in "
              f"{state.token_file}):\n  KUBEINFER_EDGE_BOOTSTRAP_TOKEN=$(cat "
              f"{state.token_file}) kubeinfer edge agent --server {state.url} "
              f"--device-id DEVICE --target {target} --state-dir /var/lib/kubeinfer-edge",
              soft_wrap=True, markup=False)


def _follow(names: list[str]) -> int:
    """Print each fleet's rollout as it changes until Ctrl-C (raised to the caller)."""
    last: dict[str, str] = {}
    while True:
        for name in names:
            paths = FleetPaths.for_fleet(name)
            state = read_fleet_state(paths)
            if state is None or not paths.running():
                err.print(f"[red]EdgeFleet {name}: its runner stopped; see "
                          f"{paths.runner_log}[/red]", soft_wrap=True)
                return 1
            line = _status_line(name)
            if line and line != last.get(name):
                last[name] = line
                out.print(line, soft_wrap=True, markup=False)
        time.sleep(FOLLOW_INTERVAL_S)


def _status_line(name: str) -> str:
    try:
        status = fleet_status(name)
    except Refused:
        return ""
    rollout = status.rollout
    phase = (f"{rollout.phase.value} {rollout.version}, wave {rollout.wave}/{rollout.waves}"
             if rollout else "no rollout")
    states = ", ".join(f"{k} {v}" for k, v in sorted(status.byState.items()) if v)
    return f"  {name}: {status.devices} device(s) ({states or 'none'}); {phase}"


# -- the fleet server's view -------------------------------------------------------------------


def _server(name: str) -> tuple[str, str]:
    paths = FleetPaths.for_fleet(name)
    state = read_fleet_state(paths)
    if state is None or not paths.running() or state.url is None:
        raise Refused(f"EdgeFleet {name} is not running locally; start it with kubeinfer up "
                      "-f FLEET.yaml (on a cluster: kubectl get edgefleet " + name + ")")
    try:
        token = Path(state.token_file).read_text().strip()
    except OSError as exc:
        raise Refused(f"Cannot read the bootstrap token of EdgeFleet {name} "
                      f"({state.token_file}: {exc.strerror})") from None
    return state.url, token


def _get(name: str, path: str, params: dict[str, str] | None = None) -> bytes:
    url, token = _server(name)
    try:
        response = httpx.get(url + path, params=params,
                             headers={"Authorization": f"Bearer {token}"}, timeout=10)
    except httpx.HTTPError as exc:
        raise Refused(f"The fleet server of {name} at {url} did not answer ({exc})") from None
    if response.status_code != 200:
        raise Refused(f"The fleet server of {name} answered {response.status_code}: "
                      f"{response.text[:300]}")
    return response.content


def fleet_status(name: str) -> FleetStatus:
    return FleetStatus.model_validate_json(_get(name, "/v1/fleet"))


def _read_or_exit(model: type[M], name: str, path: str,
                  params: dict[str, str] | None = None) -> M:
    """A command's read of the fleet server: on refusal, the reason and exit 1."""
    try:
        return model.model_validate_json(_get(name, path, params))
    except Refused as exc:
        err.print(f"[red]Error:[/red] {exc}", soft_wrap=True)
        raise typer.Exit(1) from None


def fleet_rows(name: str | None) -> list[dict[str, object]]:
    """Local fleets for ``kubeinfer status``: name, phase, version, URL."""
    rows: list[dict[str, object]] = []
    for paths in known_fleets():
        if name and paths.name != name:
            continue
        state = read_fleet_state(paths)
        if state is None:
            continue
        running = paths.running()
        rows.append({"name": state.name,
                     "phase": state.phase.value if running else FleetPhase.STOPPED.value,
                     "version": state.current.version if state.current else None,
                     "previous": state.previous.version if state.previous else None,
                     "url": state.url if running else None,
                     "message": state.message})
    return rows


@edge_app.command("status")
def status_command(
    name: Annotated[str, typer.Argument(help="The EdgeFleet's name.")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """A local fleet's devices by state and version, and its rollout."""
    status = _read_or_exit(FleetStatus, name, "/v1/fleet")
    if as_json:
        typer.echo(status.model_dump_json(indent=2))
        return
    out.print(f"EdgeFleet {name}: {status.devices} device(s)")
    for title, counts in (("state", status.byState), ("version", status.byVersion)):
        table = Table(title=f"by {title}")
        table.add_column(title)
        table.add_column("devices", justify="right")
        for key, count in sorted(counts.items()):
            table.add_row(key, str(count))
        out.print(table)
    rollout = status.rollout
    if rollout is None:
        out.print("No rollout yet")
        return
    wave = rollout.currentWave
    out.print(f"Rollout of {rollout.version} (from {rollout.previousVersion or '-'}): "
              f"{rollout.phase.value}, wave {rollout.wave}/{rollout.waves}"
              + (f" ({wave.succeeded}/{wave.devices} succeeded, {wave.failed} failed)"
                 if wave else "") + (f"; {rollout.message}" if rollout.message else ""),
              soft_wrap=True)


@edge_app.command("devices")
def devices_command(
    name: Annotated[str, typer.Argument(help="The EdgeFleet's name.")],
    limit: Annotated[int, typer.Option(help="Devices per page.", min=1, max=10_000)] = 1000,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """A local fleet's devices: state, version, desired version, last heartbeat."""
    page = _read_or_exit(DeviceList, name, "/v1/devices", {"limit": str(limit)})
    if as_json:
        typer.echo(page.model_dump_json(indent=2))
        return
    table = Table()
    for column in ("device", "target", "state", "version", "desired", "last seen"):
        table.add_column(column)
    now = time.time()
    for d in page.devices:
        table.add_row(d.deviceId, d.target, d.state.value, d.version or "-",
                      d.desiredVersion or "-", f"{now - d.lastSeen:.0f}s ago")
    out.print(table)
    if page.next:
        out.print(f"More devices: --limit {limit} and the server's next page ({page.next})")


@edge_app.command("history")
def history_command(
    name: Annotated[str, typer.Argument(help="The EdgeFleet's name.")],
    device: Annotated[str, typer.Argument(help="The device's id.")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """A device's recent versions and deployment results, newest first (what the fleet
    server kept: the last entries, each a heartbeat that changed something)."""
    history = _read_or_exit(DeviceHistory, name,
                            f"/v1/devices/{quote(device, safe='')}/history")
    if as_json:
        typer.echo(history.model_dump_json(indent=2))
        return
    table = Table(title=f"{name} / {history.deviceId}", title_justify="left")
    for column in ("when (UTC)", "version", "updating to", "last deployment"):
        table.add_column(column)
    for e in history.entries:
        result = e.lastDeployment
        table.add_row(time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e.at)), e.version or "-",
                      e.updatingTo or "-",
                      f"{result.version} {result.outcome}" + (f": {result.message}"
                                                              if result.message else "")
                      if result is not None else "-")
    out.print(table)


@edge_app.command("agent", context_settings={"allow_extra_args": True,
                                             "ignore_unknown_options": True})
def agent_command(
    ctx: typer.Context,
    server: Annotated[str, typer.Option(help="The fleet server's URL.")],
    device_id: Annotated[str, typer.Option(help="This device's id (lower-case letters, "
                                                "digits, '-', '.').")],
    target: Annotated[str, typer.Option(help="The package target this device runs "
                                             "(one of the EdgeFleet's targets).")],
    state_dir: Annotated[Path, typer.Option(help="Where the agent keeps its credential, "
                                                 "slots and capture buffer.")],
    bootstrap_token: Annotated[str | None, typer.Option(
        help="The fleet's bootstrap token (better: KUBEINFER_EDGE_BOOTSTRAP_TOKEN, which "
             "other users cannot read in the process list).")] = None,
    labels: Annotated[str | None, typer.Option(help="k=v,... for wave deviceSelectors.")] = None,
    listen: Annotated[str | None, typer.Option(
        help="host:port local apps call (SageMaker container contract).")] = None,
    public_key: Annotated[str | None, typer.Option(
        help="The fleet's package signing key (base64, or @FILE); default: the one the "
             "server names at first registration, pinned after.")] = None,
) -> None:
    """Run the device agent: register, heartbeat, install signed packages, serve locally."""
    # `kubeinfer edge agent` reaches this only for --help (kubeinfer_operator.entry hands
    # the agent over before the CLI is imported); `python -m kubeinfer_operator.cli` here.
    args = ["--server", server, "--device-id", device_id, "--target", target,
            "--state-dir", str(state_dir)]
    for flag, value in (("--bootstrap-token", bootstrap_token), ("--labels", labels),
                        ("--listen", listen), ("--public-key", public_key)):
        if value is not None:
            args += [flag, value]
    exec_agent([*args, *ctx.args])


def down(paths: FleetPaths, *, timeout: float) -> str:
    stopped = stop_fleet(paths, timeout=timeout)
    return f"Stopped EdgeFleet {paths.name}" if stopped else \
        f"EdgeFleet {paths.name} is not running"


def print_fleets(rows: list[dict[str, object]]) -> None:
    table = Table(title="EdgeFleets", title_justify="left")
    for col in ("name", "phase", "version", "previous", "url", "message"):
        table.add_column(col)
    for row in rows:
        table.add_row(*(str(row.get(c) or "-") for c in ("name", "phase", "version",
                                                          "previous", "url", "message")))
    out.print(table)
