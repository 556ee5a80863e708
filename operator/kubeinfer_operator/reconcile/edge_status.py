"""An EdgeFleet's next step and status, from its package Jobs and its fleet server: PURE.

One call of ``decide`` per reconcile (the clock is an argument):

* **Packaging.** The spec's version (``render.edge_plan.fleet_version``) needs
  one package per target. A target's package is known once its Job succeeded
  and its pod left a report (the termination message); known packages are kept
  in ``status.building`` as they come, so a Job cleaned up by its TTL is never
  needed again. A Job that is missing is created; one of other arguments is
  deleted (and created again next time); a failed one fails ``Packaged``,
  naming the pod, what it said and the fix. The operator does not read the
  signing key's Secret: while a Job runs, the message names that Secret (a pod
  that cannot start for want of it waits in CreateContainerConfigError).
* **Promotion.** Once every target is packaged the version becomes
  ``status.current`` and the one it replaces ``status.previous`` (the rollback
  target of the ``FleetConfig``). A spec that goes back to the previous version
  swaps the two without packaging anything.
* **Rollout.** What the fleet server reports (``FleetStatus`` of ``GET
  /v1/fleet``) becomes the device counts, the wave in progress and the
  ``RolloutComplete`` / ``RolledBack`` conditions. Both are monotonic within a
  generation: once True for the current version, a fleet server that cannot be
  reached does not turn them back.
* **Serving.** ``Ready`` follows the fleet server Deployment's available
  replicas; with none, the message names the Secrets its pods need (the
  operator never reads them: a missing one shows as pods in
  CreateContainerConfigError).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from kubeinfer_operator.api.edge_fleet import PackageStatus, VersionStatus
from kubeinfer_operator.reconcile.compile_status import PodView
from kubeinfer_operator.reconcile.status import condition, merge_conditions, timestamp
from kubeinfer_operator.reconcile.transform_observe import JobView, detail, parse_report
from kubeinfer_runtime.contract.compile import EXIT_BAD_INPUT
from kubeinfer_runtime.contract.edge import FleetStatus, RolloutPhase

READY = "Ready"
PACKAGED = "Packaged"
ROLLOUT_COMPLETE = "RolloutComplete"
ROLLED_BACK = "RolledBack"
CONDITIONS = (READY, PACKAGED, ROLLOUT_COMPLETE, ROLLED_BACK)

REASON_SERVING = "Serving"
REASON_PACKAGING = "Packaging"
REASON_PACKAGED = "Packaged"
REASON_PACKAGING_FAILED = "PackagingFailed"
REASON_BAD_INPUT = "BadInput"
REASON_DEADLINE = "DeadlineExceeded"
REASON_NO_REPORT = "NoReport"
REASON_INVALID_SPEC = "InvalidSpec"
REASON_NAME_CONFLICT = "NameConflict"
REASON_SERVER_UNAVAILABLE = "ServerUnavailable"
REASON_FLEET_STATUS_UNAVAILABLE = "FleetStatusUnavailable"
REASON_WAITING_FOR_SERVER = "WaitingForFleetServer"
REASON_NO_ROLLOUT = "NoRollout"
REASON_COMPLETE = "Complete"
REASON_PROGRESSING = "Progressing"
REASON_PAUSED = "Paused"
REASON_ROLLED_BACK = "RolledBack"
REASON_WAVE_FAILED = "WaveFailed"
REASON_NOT_ROLLED_BACK = "NotRolledBack"

PHASE_PACKAGING = "Packaging"
PHASE_ROLLING_OUT = "RollingOut"
PHASE_COMPLETE = "Complete"
PHASE_ROLLED_BACK = "RolledBack"
PHASE_PAUSED = "Paused"
PHASE_FAILED = "Failed"


class PackageReport(BaseModel):
    """What ``kubeinfer-runtime edge package`` leaves in its termination message."""

    model_config = ConfigDict(extra="ignore")

    uri: str
    sha256: str
    size: int
    signature: str
    publicKey: str
    version: str
    target: str


@dataclass(frozen=True)
class FleetInfo:
    """The EdgeFleet itself: what the decision needs of it."""

    name: str
    namespace: str
    generation: int
    #: The spec's version, and the model it is built from.
    version: str
    model: str
    #: Target → the run hash its package Job must carry, and the Job's name.
    run_hashes: Mapping[str, str]
    job_names: Mapping[str, str]
    status: Mapping[str, Any]
    replicas: int = 1
    #: The fleet server's in-cluster URL.
    url: str = ""
    #: The user's Secrets, as messages name them ("Secret ns/name key k (field)"): the
    #: signing key the package Jobs read, and what the fleet server reads (bootstrap
    #: token, Redis URL). The operator never reads them; a pod does, or fails to start.
    signing_secret: str = ""
    server_secrets: tuple[str, ...] = ()


@dataclass(frozen=True)
class Build:
    """One target's package Job of the spec's version (if any) and its pods."""

    job: JobView = field(default_factory=JobView)
    pods: tuple[PodView, ...] = ()


@dataclass(frozen=True)
class Observed:
    builds: Mapping[str, Build] = field(default_factory=dict)
    #: The fleet server Deployment: exists, available replicas.
    server_exists: bool = False
    server_available: int = 0
    #: What GET /v1/fleet answered, or why it could not be read.
    fleet: FleetStatus | None = None
    fleet_error: str | None = None
    #: Why the fleet server cannot be served (an object name taken by another owner).
    server_problem: str | None = None
    server_reason: str = "NameConflict"


@dataclass(frozen=True)
class Decision:
    status: dict[str, Any]
    #: Targets whose package Job to create, and whose (stale) Job to delete first.
    create: tuple[str, ...] = ()
    delete: tuple[str, ...] = ()
    #: The packaged versions the fleet config holds (None: nothing to serve yet).
    current: VersionStatus | None = None
    previous: VersionStatus | None = None


def _version(doc: Any) -> VersionStatus | None:
    if not isinstance(doc, Mapping):
        return None
    try:
        return VersionStatus.model_validate(doc)
    except ValidationError:
        return None


def _condition_of(status: Mapping[str, Any], type_: str) -> Mapping[str, Any] | None:
    return next((c for c in status.get("conditions") or []
                 if isinstance(c, Mapping) and c.get("type") == type_), None)


def _report(pods: tuple[PodView, ...], version: str, target: str) -> PackageReport | None:
    for pod in sorted(pods, key=lambda p: p.finished_at, reverse=True):
        if pod.phase == "Succeeded" or pod.exit_code == 0:
            report = parse_report(pod.message, PackageReport)
            if report is not None and report.version == version and report.target == target:
                return report
    return None


def _failed_pod(pods: tuple[PodView, ...]) -> PodView | None:
    failed = sorted((p for p in pods if p.phase == "Failed" or p.exit_code not in (None, 0)),
                    key=lambda p: p.finished_at, reverse=True)
    return min(failed, key=lambda p: 0 if p.exit_code == EXIT_BAD_INPUT else 1, default=None)


def _failure(info: FleetInfo, target: str, build: Build) -> tuple[str, str]:
    job = info.job_names.get(target, "?")
    where = f"Job {info.namespace}/{job}"
    retry = f"; delete Job {info.namespace}/{job} to retry"
    job_reason, job_message = build.job.failure or ("Failed", "")
    if job_reason == REASON_DEADLINE:
        return REASON_DEADLINE, (f"Packaging target {target} ran past its deadline ({where})"
                                 + _signing_hint(info) + retry)
    pod = _failed_pod(build.pods)
    if pod is None:
        return REASON_PACKAGING_FAILED, (f"Packaging target {target} failed ({where}, "
                                         f"{job_reason}): {job_message or 'no pod said why'}"
                                         + retry)
    said = detail(pod.message) or f"exit code {pod.exit_code}"
    if pod.exit_code == EXIT_BAD_INPUT:
        return REASON_BAD_INPUT, (
            f"Packaging target {target} failed: {said} (pod {info.namespace}/{pod.name}, exit "
            f"code {pod.exit_code}); fix spec.model or spec.targets and apply the EdgeFleet "
            "again")
    return REASON_PACKAGING_FAILED, (
        f"Packaging target {target} failed: {said} (pod {info.namespace}/{pod.name}, exit code "
        f"{pod.exit_code}; kubectl logs -n {info.namespace} {pod.name})" + retry)


def _signing_hint(info: FleetInfo, pod: str = "its pod") -> str:
    """What to check when a package Job's pod does not start."""
    if not info.signing_secret:
        return ""
    return (f"; if {pod} does not start (CreateContainerConfigError), check "
            f"{info.signing_secret}")


def _server_hint(info: FleetInfo) -> str:
    if not info.server_secrets:
        return ""
    return (f"; if its pods do not start (CreateContainerConfigError), check "
            f"{' and '.join(info.server_secrets)}")


def _package(report: PackageReport) -> PackageStatus:
    return PackageStatus(target=report.target, uri=report.uri, sha256=report.sha256,
                         size=report.size, signature=report.signature)


@dataclass
class _Packaging:
    """Where packaging of the spec's version stands."""

    current: VersionStatus | None
    previous: VersionStatus | None
    building: dict[str, Any] | None = None
    create: list[str] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)
    failure: tuple[str, str] | None = None
    waiting: list[str] = field(default_factory=list)


def _rolled_back(old: Mapping[str, Any], observed: Observed,
                 current: VersionStatus | None) -> bool:
    """Whether ``current``'s rollout was rolled back (the fleet server says so, or the last
    status did while the server cannot be read)."""
    if current is None:
        return False
    rollout = observed.fleet.rollout if observed.fleet is not None else None
    if rollout is not None and rollout.version == current.version:
        return rollout.phase is RolloutPhase.ROLLED_BACK
    return old.get("phase") == PHASE_ROLLED_BACK


def _package_step(info: FleetInfo, observed: Observed) -> _Packaging:
    old = info.status
    current, previous = _version(old.get("current")), _version(old.get("previous"))
    if current is not None and current.version == info.version:
        return _Packaging(current, previous)
    if previous is not None and previous.version == info.version:
        return _Packaging(previous, current)  # back to the previous version: nothing to build
    building = _version(old.get("building"))
    known: dict[str, PackageStatus] = {}
    public_key = ""
    if building is not None and building.version == info.version:
        known = {p.target: p for p in building.packages if p.target in info.run_hashes}
        public_key = building.publicKey
    step = _Packaging(current, previous)
    for target in info.run_hashes:
        if target in known:
            continue
        build = observed.builds.get(target, Build())
        if not build.job.exists:
            step.create.append(target)
            step.waiting.append(target)
        elif build.job.run_hash != info.run_hashes[target]:
            step.delete.append(target)  # another spec's Job under the name: start it again
            step.waiting.append(target)
        elif build.job.failure is not None:
            step.failure = step.failure or _failure(info, target, build)
        elif build.job.complete:
            report = _report(build.pods, info.version, target)
            if report is None:
                job = info.job_names.get(target, "?")
                step.failure = step.failure or (REASON_NO_REPORT, (
                    f"Job {info.namespace}/{job} of target {target} completed but no pod left "
                    "a package report in its termination message; check that the runtime "
                    f"image matches the operator's version, then delete Job "
                    f"{info.namespace}/{job} to retry"))
            else:
                known[target] = _package(report)
                public_key = public_key or report.publicKey
        else:
            step.waiting.append(target)
    packages = [known[t] for t in info.run_hashes if t in known]
    if len(packages) == len(info.run_hashes) and public_key:
        fresh = VersionStatus(version=info.version, model=info.model, publicKey=public_key,
                              packages=packages)
        # The rollback target is what the devices run: after a rolled-back rollout that is
        # still ``previous``, never the version the fleet just refused.
        step.previous = previous if _rolled_back(old, observed, current) and previous \
            is not None else (current if current is not None else previous)
        step.current = fresh
        step.create, step.delete, step.waiting = [], [], []
        return step
    step.building = VersionStatus(version=info.version, model=info.model,
                                  publicKey=public_key, packages=packages).model_dump(
        mode="json") if packages else None
    return step


def _percent(value: float) -> str:
    return f"{value:.0f}%" if value == int(value) else f"{value:.1f}%"


def _wave_text(wave: int, waves: int) -> str:
    return f"{min(wave + 1, waves)}/{waves}" if waves else "all"


#: At most this many ``devicesByState`` / ``devicesByVersion`` entries reach the status
#: (the largest counts; a real fleet has a handful of states and versions).
MAX_FLEET_KEYS = 32
#: Longest map key, rollout message, version text kept from a fleet server's answer.
MAX_FLEET_TEXT = 1024
#: Largest count kept (fits the status' int64 and a JSON number exactly).
MAX_FLEET_COUNT = 2 ** 53


def _count(value: int) -> int:
    return min(max(0, value), MAX_FLEET_COUNT)


def _top(counts: Mapping[str, int]) -> dict[str, int]:
    ranked = sorted(counts.items(), key=lambda kv: (-_count(kv[1]), kv[0]))[:MAX_FLEET_KEYS]
    return {k[:MAX_FLEET_TEXT]: _count(v) for k, v in ranked}


def bounded_fleet(fleet: FleetStatus) -> FleetStatus:
    """``fleet`` as the status may carry it: at most ``MAX_FLEET_KEYS`` entries per map,
    texts cut at ``MAX_FLEET_TEXT``, counts within [0, 2**53].

    The answer comes from a pod under the fleet server's labels in the EdgeFleet's
    namespace (anyone who can create pods there): up to 1 MiB of map entries, a huge
    message or a 5,000-digit count would otherwise be written into the status every
    refresh (or refused by the API server every refresh)."""
    rollout = fleet.rollout
    if rollout is not None:
        wave = rollout.currentWave
        rollout = rollout.model_copy(update={
            "version": rollout.version[:MAX_FLEET_TEXT],
            "previousVersion": (rollout.previousVersion[:MAX_FLEET_TEXT]
                                if rollout.previousVersion is not None else None),
            "message": rollout.message[:MAX_FLEET_TEXT],
            "wave": _count(rollout.wave), "waves": _count(rollout.waves),
            "currentWave": wave.model_copy(update={
                k: _count(getattr(wave, k))
                for k in ("index", "devices", "succeeded", "failed", "pending")}
                | {k: min(max(0.0, getattr(wave, k)), 100.0)
                   for k in ("successPercent", "failurePercent")})
            if wave is not None else None})
    return fleet.model_copy(update={
        "fleet": fleet.fleet[:MAX_FLEET_TEXT], "devices": _count(fleet.devices),
        "byState": _top(fleet.byState), "byVersion": _top(fleet.byVersion),
        "counters": _top(fleet.counters), "rollout": rollout})


def _fleet_fields(fleet: FleetStatus, now: datetime) -> dict[str, Any]:
    rollout = fleet.rollout
    wave = rollout.currentWave if rollout is not None else None
    return {
        "devices": fleet.devices,
        "online": fleet.byState.get("Online", 0),
        "devicesByState": dict(sorted(fleet.byState.items())),
        "devicesByVersion": dict(sorted(fleet.byVersion.items())),
        "wave": _wave_text(rollout.wave, rollout.waves) if rollout is not None else None,
        "currentWave": wave.model_dump(mode="json") if wave is not None else None,
        "rolloutMessage": (rollout.message or None) if rollout is not None else None,
        "lastFleetStatusTime": timestamp(now),
    }


def _kept(old: Mapping[str, Any], type_: str, generation: int, version: str) -> bool:
    """Whether a True condition stays True: same generation, same current version."""
    c = _condition_of(old, type_)
    return (c is not None and c.get("status") == "True"
            and c.get("observedGeneration") == generation and old.get("version") == version)


def _rollout_conditions(info: FleetInfo, observed: Observed, current: VersionStatus,
                        previous: VersionStatus | None) -> tuple[list[dict[str, Any]], str]:
    """RolloutComplete and RolledBack, and the phase they make."""
    gen, old, version = info.generation, info.status, current.version
    fleet = observed.fleet
    rollout = fleet.rollout if fleet is not None else None
    back_to = previous.version if previous is not None else "the previous version"
    no_rollback = condition(ROLLED_BACK, False, REASON_NOT_ROLLED_BACK,
                            f"No rollback of version {version} reported", gen)
    phase = PHASE_ROLLING_OUT
    if fleet is None:
        why = observed.fleet_error or "not read yet"
        complete = {**condition(ROLLOUT_COMPLETE, False, REASON_FLEET_STATUS_UNAVAILABLE,
                                f"Fleet server status unavailable ({why}); the operator "
                                "retries every refresh", gen), "status": "Unknown"}
        back = no_rollback
        phase = str(old.get("phase") or PHASE_ROLLING_OUT)
    elif rollout is None:
        complete = condition(ROLLOUT_COMPLETE, False, REASON_NO_ROLLOUT,
                             f"The fleet server has not started rolling out version "
                             f"{version} yet", gen)
        back = no_rollback
    elif rollout.version != version:
        complete = condition(ROLLOUT_COMPLETE, False, REASON_WAITING_FOR_SERVER, (
            f"The fleet server still rolls out version {rollout.version}; version {version} "
            f"reaches it when ConfigMap {info.namespace}/{info.name}-fleet-config is "
            "refreshed in its pods (up to a minute)"), gen)
        back = no_rollback
    else:
        wave = rollout.currentWave
        progress = (f"wave {_wave_text(rollout.wave, rollout.waves)}"
                    + (f": {_percent(wave.successPercent)} of its {wave.devices} devices "
                       f"succeeded, {_percent(wave.failurePercent)} failed"
                       if wave is not None else ""))
        said = f" ({rollout.message})" if rollout.message else ""
        fix = ("fix spec.model and apply a new version, or raise the wave's "
               "spec.rollout.waves[].maxFailurePercent")
        back = no_rollback
        if rollout.phase is RolloutPhase.COMPLETE:
            complete = condition(ROLLOUT_COMPLETE, True, REASON_COMPLETE,
                                 f"Version {version} rolled out to the fleet "
                                 f"({fleet.devices} devices)", gen)
            phase = PHASE_COMPLETE
        elif rollout.phase is RolloutPhase.ROLLED_BACK:
            complete = condition(ROLLOUT_COMPLETE, False, REASON_ROLLED_BACK,
                                 f"Version {version} was rolled back to {back_to}", gen)
            back = condition(ROLLED_BACK, True, REASON_WAVE_FAILED,
                             f"Version {version} was rolled back to {back_to} at "
                             f"{progress}{said}; {fix}", gen)
            phase = PHASE_ROLLED_BACK
        elif rollout.phase is RolloutPhase.PAUSED:
            complete = condition(ROLLOUT_COMPLETE, False, REASON_PAUSED,
                                 f"Rollout of version {version} paused at {progress}{said}; "
                                 f"{fix}", gen)
            phase = PHASE_PAUSED
        else:
            complete = condition(ROLLOUT_COMPLETE, False, REASON_PROGRESSING,
                                 f"Rolling out version {version}: {progress}", gen)
    # Monotonic within a generation: True for the current version stays True.
    if _kept(old, ROLLED_BACK, gen, version):
        back = _without_time(_condition_of(old, ROLLED_BACK))
        phase = PHASE_ROLLED_BACK
    elif _kept(old, ROLLOUT_COMPLETE, gen, version):
        complete = _without_time(_condition_of(old, ROLLOUT_COMPLETE))
        phase = PHASE_COMPLETE
    return [complete, back], phase


def _without_time(c: Mapping[str, Any] | None) -> dict[str, Any]:
    out = dict(c or {})
    out.pop("lastTransitionTime", None)
    return out


def _merge(old: Mapping[str, Any], fresh: list[dict[str, Any]],
           now: datetime) -> list[dict[str, Any]]:
    """``fresh`` conditions over ``old``: the transition time stays while a status holds."""
    # merge_conditions keeps other writers' types; ours are always all present here.
    return merge_conditions(old.get("conditions") or [], fresh, now)


def decide(info: FleetInfo, observed: Observed, now: datetime) -> Decision:
    """The status of the EdgeFleet and what to do next."""
    gen = info.generation
    step = _package_step(info, observed)
    current, previous = step.current, step.previous
    status: dict[str, Any] = {
        "observedGeneration": gen,
        "desiredVersion": info.version,
        "version": current.version if current else None,
        "previousVersion": previous.version if previous else None,
        "current": current.model_dump(mode="json") if current else None,
        "previous": previous.model_dump(mode="json") if previous else None,
        "building": step.building,
        "fleetServer": info.url or None,
    }
    conditions: list[dict[str, Any]] = []
    targets = ", ".join(info.run_hashes)
    if step.failure is not None:
        conditions.append(condition(PACKAGED, False, *step.failure, gen))
    elif current is not None and current.version == info.version:
        conditions.append(condition(PACKAGED, True, REASON_PACKAGED,
                                    f"Version {info.version} packaged for targets {targets}",
                                    gen))
    else:
        built = len(info.run_hashes) - len(step.waiting)
        running = any(observed.builds.get(t, Build()).job.exists for t in step.waiting
                      if t not in step.create and t not in step.delete)
        conditions.append(condition(PACKAGED, False, REASON_PACKAGING, (
            f"Packaging version {info.version}: {built} of {len(info.run_hashes)} targets "
            f"built (waiting for {', '.join(step.waiting)})"
            + (_signing_hint(info, "a package Job's pod") if running else "")), gen))
    if current is None:
        why = (step.failure[1] if step.failure is not None
               else f"Packaging version {info.version} for targets {targets}")
        conditions += [
            condition(READY, False, REASON_PACKAGING, f"Nothing to serve yet: {why}", gen),
            condition(ROLLOUT_COMPLETE, False, REASON_PACKAGING,
                      f"Version {info.version} is not packaged yet", gen),
            condition(ROLLED_BACK, False, REASON_NOT_ROLLED_BACK, "Nothing rolled out yet",
                      gen)]
        status["phase"] = PHASE_FAILED if step.failure is not None else PHASE_PACKAGING
    else:
        if observed.server_problem is not None:
            conditions.append(condition(READY, False, observed.server_reason,
                                        observed.server_problem, gen))
        elif observed.server_available > 0:
            conditions.append(condition(READY, True, REASON_SERVING, (
                f"Fleet server serves version {current.version} ({observed.server_available}/"
                f"{info.replicas} replicas available)"), gen))
        else:
            conditions.append(condition(READY, False, REASON_SERVER_UNAVAILABLE, (
                f"Fleet server Deployment {info.namespace}/{info.name}-fleet-server has no "
                f"available replica (0/{info.replicas}){_server_hint(info)}; kubectl describe "
                f"deployment -n {info.namespace} {info.name}-fleet-server says why"), gen))
        rollout, phase = _rollout_conditions(info, observed, current, previous)
        conditions += rollout
        if step.failure is not None:
            phase = PHASE_FAILED
        elif current.version != info.version:
            phase = PHASE_PACKAGING
        status["phase"] = phase
    if observed.fleet is not None:
        status.update(_fleet_fields(observed.fleet, now))
    status["conditions"] = _merge(info.status, conditions, now)
    return Decision(status=status, create=tuple(step.create), delete=tuple(step.delete),
                    current=current, previous=previous)


def invalid_status(info: FleetInfo, message: str, now: datetime) -> dict[str, Any]:
    """The spec cannot be planned: Ready and Packaged say so; what was packaged stays."""
    gen = info.generation
    fresh = [condition(PACKAGED, False, REASON_INVALID_SPEC, message, gen),
             condition(READY, False, REASON_INVALID_SPEC, message, gen)]
    old = {str(c.get("type")): c for c in info.status.get("conditions") or []
           if isinstance(c, Mapping)}
    kept = [dict(old[t]) for t in (ROLLOUT_COMPLETE, ROLLED_BACK) if t in old]
    return {"observedGeneration": gen, "phase": PHASE_FAILED,
            "conditions": merge_conditions(info.status.get("conditions") or [], fresh + kept,
                                           now)}
