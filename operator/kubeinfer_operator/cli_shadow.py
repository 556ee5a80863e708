"""``kubeinfer shadow report`` and ``kubeinfer promote``: shadow variants from the CLI.

``shadow report NAME``: in local mode (the default) the running endpoint's
gateway ``/metrics`` is read and summed exactly as the operator does for
``status.shadow`` (``reconcile.shadow_status``); with ``--kubectl`` the
Endpoint's ``status.shadow`` is read from the cluster with ``kubectl get``.

``promote NAME SHADOW``: the spec edit of ``reconcile.promote``. With
``-f FILE`` the Endpoint document NAME in FILE is rewritten (then run
``kubeinfer up -f FILE``); with ``--kubectl`` the Endpoint on the cluster is
read and replaced (``kubectl replace`` with its resourceVersion: a concurrent
edit makes it fail rather than be lost).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
import yaml
from rich.console import Console
from rich.table import Table

from kubeinfer_operator.errors import SpecError
from kubeinfer_operator.local.manifest_io import read_manifest, yaml_documents
from kubeinfer_operator.local.paths import EndpointPaths
from kubeinfer_operator.local.state import read_desired, read_state
from kubeinfer_operator.reconcile import shadow_status
from kubeinfer_operator.reconcile.promote import PromoteError, promote

shadow_app = typer.Typer(help="Shadow variants: how a shadow compares with production.")
out = Console()
err = Console(stderr=True)

_COLUMNS = ("name", "copiesSent", "copiesFailed", "copiesDropped", "requestsCompared",
            "agreementPercent", "productionLatencyP50Ms", "productionLatencyP99Ms",
            "shadowLatencyP50Ms", "shadowLatencyP99Ms", "productionErrors", "shadowErrors",
            "meanMaxAbsDiff")


def _kubectl(args: list[str], stdin: str | None = None) -> str:
    try:
        done = subprocess.run(["kubectl", *args], input=stdin, capture_output=True, text=True,
                              timeout=60, check=False)
    except FileNotFoundError:
        raise typer.Exit(_fail("kubectl is not on PATH; install it or drop --kubectl")) from None
    if done.returncode != 0:
        raise typer.Exit(_fail(f"kubectl {' '.join(args[:2])} failed: {done.stderr.strip()}"))
    return done.stdout


def _fail(message: str, code: int = 1) -> int:
    err.print(f"[red]{message}[/red]")
    return code


def local_report(name: str) -> list[dict[str, Any]]:
    """The running local endpoint's status.shadow, from its gateway's metrics."""
    paths = EndpointPaths.for_endpoint(name)
    state = read_state(paths)
    desired = read_desired(paths)
    if state is None or not state.url or desired is None:
        raise typer.Exit(_fail(f"Endpoint {name} is not running; start it with kubeinfer up "
                               "-f FILE"))
    spec = desired.manifest.get("spec") or {}
    shadows = [str(s.get("name")) for s in spec.get("shadowVariants") or []
               if isinstance(s, dict)]
    text = httpx.get(state.url.rstrip("/") + "/metrics", timeout=5.0).text
    return shadow_status.entries(shadows, shadow_status.parse(text, name))


@shadow_app.command("report")
def report(
    name: Annotated[str, typer.Argument(help="Endpoint name.")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    kubectl: Annotated[bool, typer.Option("--kubectl", help="Read status.shadow of the "
                                          "Endpoint on the cluster (kubectl's context).")] = False,
    namespace: Annotated[str | None, typer.Option("-n", "--namespace",
                                                  help="With --kubectl.")] = None,
) -> None:
    """Each shadow's comparison with production: copies, agreement, latency, errors."""
    if kubectl:
        args = ["get", "endpoints.kubeinfer.io", name, "-o", "json"]
        obj = json.loads(_kubectl(args + (["-n", namespace] if namespace else [])))
        rows: list[dict[str, Any]] = (obj.get("status") or {}).get("shadow") or []
    else:
        rows = local_report(name)
    if as_json:
        typer.echo(json.dumps({"endpoint": name, "shadow": rows}, indent=2))
        return
    if not rows:
        out.print(f"Endpoint {name} has no shadow variant (or no comparison yet)")
        return
    table = Table(title=f"Shadow variants of {name}", title_justify="left")
    for col in _COLUMNS:
        table.add_column(col)
    for row in rows:
        table.add_row(*("-" if row.get(c) is None else str(row.get(c)) for c in _COLUMNS))
    out.print(table)


def promote_command(
    name: Annotated[str, typer.Argument(help="Endpoint name.")],
    shadow: Annotated[str, typer.Argument(help="The shadow variant to make production.")],
    file: Annotated[Path | None, typer.Option("-f", "--file", help="Rewrite the Endpoint "
                                              "NAME in this manifest file (local mode).")] = None,
    variant: Annotated[str | None, typer.Option("--variant", help="The production variant "
                                                "it replaces (default: the only one).")] = None,
    kubectl: Annotated[bool, typer.Option("--kubectl", help="Edit the Endpoint on the "
                                          "cluster (kubectl's context).")] = False,
    namespace: Annotated[str | None, typer.Option("-n", "--namespace",
                                                  help="With --kubectl.")] = None,
) -> None:
    """Make SHADOW production: its model replaces the variant's (name, weight and replicas
    stay), and it leaves spec.shadowVariants. Under a deploymentConfig this is a guarded
    rollout."""
    if kubectl == (file is not None):
        raise typer.Exit(_fail("Say where the Endpoint is: -f FILE (local mode) or --kubectl",
                               2))
    if kubectl:
        ns = ["-n", namespace] if namespace else []
        obj = json.loads(_kubectl(["get", "endpoints.kubeinfer.io", name, "-o", "json", *ns]))
        try:
            obj["spec"] = promote(obj.get("spec") or {}, shadow, variant)
        except PromoteError as exc:
            raise typer.Exit(_fail(f"Endpoint {name}: {exc}", 2)) from None
        obj.pop("status", None)
        _kubectl(["replace", "-f", "-", *ns], stdin=json.dumps(obj))
        out.print(f"Endpoint {name}: shadow {shadow} promoted on the cluster")
        return
    assert file is not None
    try:
        docs = yaml_documents(read_manifest(file), str(file))
    except SpecError as exc:
        raise typer.Exit(_fail(str(exc), 2)) from None
    hits = [d for d in docs if isinstance(d, dict) and d.get("kind") == "Endpoint"
            and (d.get("metadata") or {}).get("name") == name]
    if not hits:
        raise typer.Exit(_fail(f"{file} has no Endpoint named {name}; check the name and "
                               "the -f path", 2))
    try:
        hits[0]["spec"] = promote(hits[0].get("spec") or {}, shadow, variant)
    except PromoteError as exc:
        raise typer.Exit(_fail(f"Endpoint {name}: {exc}", 2)) from None
    file.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    out.print(f"Endpoint {name}: shadow {shadow} promoted in {file}; apply it with "
              f"kubeinfer up -f {file}")
