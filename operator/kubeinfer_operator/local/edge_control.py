"""Starting, updating, waiting for and stopping a local EdgeFleet's runner.

``up -f`` writes the fleet's ``job.json`` (a ``LocalFleet``) and starts the runner
when none runs; a running runner picks the new ``job.json`` up by itself (a new
version is packaged and rolled out). Waiting means: the runner serves the
version this ``up`` asked for, or says why it cannot.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from pydantic import ValidationError

from kubeinfer_operator.api.edge_fleet import API_VERSION, KIND, EdgeFleetSpec, SecretKeyRef
from kubeinfer_operator.api.endpoint import format_validation_error
from kubeinfer_operator.errors import SpecError
from kubeinfer_operator.local.edge_state import (
    FleetPaths,
    FleetPhase,
    LocalFleet,
    LocalTarget,
    read_fleet_state,
    write_fleet,
)
from kubeinfer_operator.local.job_control import spawn_runner, stop_runner
from kubeinfer_operator.local.manifest_io import read_manifest, yaml_documents
from kubeinfer_operator.local.paths import secret_dir
from kubeinfer_operator.local.process import tail
from kubeinfer_operator.render.edge_plan import fleet_version
from kubeinfer_operator.render.plan import resolve_file_uri
from kubeinfer_runtime.contract.edge import valid_name


@dataclass(frozen=True)
class LoadedFleet:
    fleet: LocalFleet


def _local_secret(ref: SecretKeyRef) -> str | None:
    """The file of a local Secret's key (``kubeinfer secret create``), or None."""
    try:
        path = secret_dir(ref.name) / ref.key
    except ValueError:
        return None
    return str(path) if path.is_file() else None


def parse_fleets(text: str, *, source: str, base_dir: str,
                 port: int | None = None) -> list[LoadedFleet]:
    """Every EdgeFleet in ``text`` as a ``LocalFleet``; SpecError listing every problem.

    Locally the fleet's folder replaces what a cluster provides: packages are written
    under it (``spec.packages.uri`` is for the cluster), Redis is a private
    redis-server unless ``KUBEINFER_REDIS_URL`` names one, and the Secrets come from
    ``kubeinfer secret create`` when they exist there (else made on first start).
    """
    docs = yaml_documents(text, source)
    problems: list[str] = []
    loaded: list[LoadedFleet] = []
    for index, doc in enumerate(docs):
        label = f"{source} document {index + 1}"
        if not isinstance(doc, dict) or doc.get("kind") != KIND:
            problems.append(f"{label}: kind: {doc.get('kind') if isinstance(doc, dict) else None!r}"
                            " cannot run beside an EdgeFleet; put it in a file of its own")
            continue
        meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
        name = str((meta or {}).get("name") or "")
        if doc.get("apiVersion") != API_VERSION:
            problems.append(f"{label}: apiVersion must be {API_VERSION}")
            continue
        if not valid_name(name) or len(name) > 40:
            problems.append(f"{label}: metadata.name: {name!r} is not a valid fleet name "
                            "(lower-case letters, digits and '-', at most 40)")
            continue
        try:
            spec = EdgeFleetSpec.model_validate(doc.get("spec"))
        except ValidationError as exc:
            problems += [f"{label}: {p}" for p in
                         format_validation_error(exc, "spec").splitlines()]
            continue
        model_uri = resolve_file_uri(spec.model.uri, base_dir)
        if urlparse(model_uri).scheme not in ("file", "s3"):
            problems.append(f"{label}: spec.model.uri: {spec.model.uri!r} is neither file:// "
                            "nor s3://")
            continue
        capture = spec.dataCapture.model_copy(update={
            "destination": resolve_file_uri(spec.dataCapture.destination, base_dir)})
        if capture.samplingPercentage > 0 and not capture.destination:
            problems.append(f"{label}: spec.dataCapture.destination: empty while "
                            "samplingPercentage is set; set file:///dir or s3://bucket/prefix")
            continue
        fleet = LocalFleet(
            name=name, source=source, version=fleet_version(spec), model_uri=model_uri,
            targets=[LocalTarget(name=t.name, compile_target=(
                t.compile.target.value if t.compile is not None else None))
                for t in spec.targets],
            rollout=spec.rollout, heartbeat_interval_seconds=spec.heartbeatIntervalSeconds,
            capture=capture, port=port,
            redis_url=os.environ.get("KUBEINFER_REDIS_URL") or None,
            host=os.environ.get("KUBEINFER_EDGE_HOST", "127.0.0.1"),
            signing_key_file=_local_secret(spec.signing.keySecret),
            bootstrap_token_file=_local_secret(spec.registration.bootstrapTokenSecret))
        loaded.append(LoadedFleet(fleet))
    names = [item.fleet.name for item in loaded]
    problems += [f"{source}: metadata.name: EdgeFleet {n!r} appears twice"
                 for n in sorted({n for n in names if names.count(n) > 1})]
    if problems:
        raise SpecError("\n".join(problems))
    if not loaded:
        raise SpecError(f"{source} holds no EdgeFleet (apiVersion: {API_VERSION}, kind: {KIND})")
    if port is not None and len(loaded) > 1:
        raise SpecError(f"--port sets one fleet server port but {source} holds "
                        f"{len(loaded)} EdgeFleets; drop --port")
    return loaded


def load_fleet_file(path: Path, *, port: int | None = None) -> list[LoadedFleet]:
    text = read_manifest(path)
    return parse_fleets(text, source=str(path), base_dir=str(path.resolve().parent), port=port)


def start_fleet(paths: FleetPaths, fleet: LocalFleet, *,
                detach: bool) -> subprocess.Popen[bytes] | None:
    """Hand ``fleet`` over; the runner started (None when one runs and takes it up)."""
    write_fleet(paths, fleet)
    if paths.running():
        return None
    paths.logs.mkdir(parents=True, exist_ok=True)
    return spawn_runner(paths, [sys.executable, "-m", "kubeinfer_operator.local.edge_runner",
                                "--state-dir", str(paths.root)], detach=detach)


def wait_applied(paths: FleetPaths, version: str, proc: subprocess.Popen[bytes] | None,
                 timeout: float) -> tuple[bool, str]:
    """(True, "") once the runner serves ``version``; (False, why) when it cannot."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = read_fleet_state(paths)
        if state is not None and (proc is None or state.runner_pid == proc.pid):
            if state.failed_version == version or state.phase is FleetPhase.FAILED:
                return False, state.message or f"see {paths.runner_log}"
            if (state.phase is FleetPhase.SERVING and state.current is not None
                    and state.current.version == version):
                return True, ""
        if proc is not None and proc.poll() is not None:
            last = tail(paths.runner_log, lines=6)
            return False, (f"Its runner exited ({proc.returncode}); see {paths.runner_log}"
                           + (f":\n{last}" if last else ""))
        time.sleep(0.1)
    return False, (f"Version {version} was not serving within {timeout:.0f} s (packaging "
                   f"may still run); follow it with kubeinfer edge status {paths.name}")


def stop_fleet(paths: FleetPaths, *, timeout: float,
               proc: subprocess.Popen[bytes] | None = None) -> bool:
    """Stop the fleet's runner (it stops the server and Redis); False when none ran."""
    stopped = stop_runner(paths, read_fleet_state, "EdgeFleet", timeout=timeout, proc=proc)
    return stopped is not None


