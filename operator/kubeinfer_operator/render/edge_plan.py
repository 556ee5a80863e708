"""The plan of an EdgeFleet: its version, package builds and fleet config. PURE, no I/O.

* ``fleet_version``: the version of the fleet's model, a short hash of what its
  packages are built from (the model and every target with its compile target).
  A spec change that changes either is a new version; any other change
  (rollout, capture, heartbeat, server) is not.
* ``plan_fleet``: one ``PackageBuild`` per target (the package Job's name,
  image choice and the ``kubeinfer-runtime edge package`` arguments).
* ``fleet_config``: the ``FleetConfig`` the fleet server reads, from the
  packaged versions kept in the EdgeFleet's status (``current`` and, when
  signed by the same key, ``previous``: the rollback target).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kubeinfer_operator.api.edge_fleet import EdgeFleet, EdgeFleetSpec, VersionStatus
from kubeinfer_operator.render import k8s_meta as meta
from kubeinfer_runtime.contract.edge import FleetConfig, FleetVersion, PackageRef

#: Characters of the version hash (a NAME_PATTERN value: hex digits).
VERSION_CHARS = 10


def fleet_version(spec: EdgeFleetSpec) -> str:
    """The version of the fleet's model: a short hash of the model and the targets."""
    built_from = {
        "model": {"uri": spec.model.uri, "format": spec.model.format.value},
        "targets": sorted(
            [{"name": t.name,
              "compile": t.compile.target.value if t.compile is not None else None}
             for t in spec.targets], key=lambda t: str(t["name"])),
    }
    return meta.content_hash(built_from)[:VERSION_CHARS]


def package_job_name(fleet: str, version: str, target: str) -> str:
    """``<fleet>-pkg-<hash>``: a fleet name (<= 40) leaves room for the pods' suffix."""
    return f"{fleet}-pkg-{meta.content_hash([version, target])[:8]}"


def packages_prefix(packages_uri: str, namespace: str, fleet: str) -> str:
    """Where one fleet's packages go (``--out``): fleets never share a prefix."""
    return f"{packages_uri.rstrip('/')}/{namespace}/{fleet}"


@dataclass(frozen=True)
class PackageBuild:
    """One target's package of the plan's version."""

    target: str
    #: None: the model is shipped as is (no compiler needed).
    compile_target: str | None
    job_name: str
    args: tuple[str, ...]
    #: Hash of the arguments: a Job of other arguments under the name is never adopted.
    run_hash: str


@dataclass(frozen=True)
class FleetPlan:
    """Everything the operator needs to build and serve one EdgeFleet."""

    name: str
    namespace: str
    version: str
    model_uri: str
    builds: tuple[PackageBuild, ...]
    spec: EdgeFleetSpec

    @property
    def targets(self) -> list[str]:
        return [b.target for b in self.builds]

    def build(self, target: str) -> PackageBuild:
        return next(b for b in self.builds if b.target == target)


def plan_fleet(fleet: EdgeFleet, namespace: str) -> FleetPlan:
    spec = fleet.spec
    version = fleet_version(spec)
    out = packages_prefix(spec.packages.uri, namespace, fleet.name)
    builds = []
    for target in spec.targets:
        compile_target = target.compile.target.value if target.compile is not None else None
        args = ["edge", "package", "--fleet", fleet.name, "--version", version,
                "--target", target.name, "--model", spec.model.uri]
        if compile_target is not None:
            args += ["--compile-target", compile_target]
        args += ["--out", out]
        builds.append(PackageBuild(
            target=target.name, compile_target=compile_target,
            job_name=package_job_name(fleet.name, version, target.name), args=tuple(args),
            run_hash=meta.content_hash(args)))
    return FleetPlan(name=fleet.name, namespace=namespace, version=version,
                     model_uri=spec.model.uri, builds=tuple(builds), spec=spec)


def _fleet_version(version: VersionStatus) -> FleetVersion:
    return FleetVersion(version=version.version, packages={
        p.target: PackageRef(uri=p.uri, sha256=p.sha256, size=p.size, signature=p.signature)
        for p in version.packages})


def fleet_config(plan: FleetPlan, current: VersionStatus,
                 previous: VersionStatus | None) -> FleetConfig:
    """The fleet server's config. ``previous`` is the rollback target only when its packages
    verify with the current public key (a rotated signing key drops it)."""
    spec = plan.spec
    keep_previous = (previous is not None and previous.publicKey == current.publicKey
                     and previous.version != current.version)
    return FleetConfig(
        name=plan.name, namespace=plan.namespace, current=_fleet_version(current),
        previous=_fleet_version(previous) if keep_previous and previous else None,
        rollout=spec.rollout, heartbeatIntervalSeconds=spec.heartbeatIntervalSeconds,
        capture=spec.dataCapture, publicKey=current.publicKey)


def version_doc(version: VersionStatus | None) -> dict[str, Any] | None:
    return None if version is None else version.model_dump(mode="json")
