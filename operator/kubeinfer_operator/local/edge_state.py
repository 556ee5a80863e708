"""A local EdgeFleet's folder: what ``up`` hands the fleet runner and what the runner reports.

``$KUBEINFER_HOME/fleets/<name>/`` holds ``job.json`` (the ``LocalFleet``:
rewritten by every ``kubeinfer up -f``; the runner picks a new version up
while it runs), ``state.json`` (the ``FleetState``: the server's URL, the
versions, the processes), ``runner.lock``, the fleet's signing key pair and
bootstrap token (mode 0600, made on first start unless given), the packages
built per version and target, the FleetConfig the fleet server reads, the
private Redis's data and one log per process. The same ``JobDir`` layout as
the batch kinds, so ``job_control`` starts and stops the runner alike.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from kubeinfer_operator.local.job_state import (
    JobDir,
    known_job_dirs,
    read_model,
    write_model,
)
from kubeinfer_operator.local.paths import FLEETS_DIR, kubeinfer_home
from kubeinfer_runtime.contract.edge import EdgeCapture, FleetVersion, RolloutSpec


def fleets_root(home: Path | None = None) -> Path:
    return (home or kubeinfer_home()) / FLEETS_DIR


class FleetPaths(JobDir):
    @classmethod
    def for_fleet(cls, name: str, home: Path | None = None) -> FleetPaths:
        return cls(fleets_root(home) / name)

    @property
    def config(self) -> Path:
        """The FleetConfig the fleet server reads (what a ConfigMap holds on Kubernetes)."""
        return self.root / "fleet-config.json"

    @property
    def signing_key(self) -> Path:
        return self.root / "keys" / "signing.key"

    @property
    def public_key(self) -> Path:
        return self.root / "keys" / "signing.pub"

    @property
    def token(self) -> Path:
        return self.root / "keys" / "bootstrap-token"

    @property
    def packages(self) -> Path:
        return self.root / "packages"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def redis(self) -> Path:
        return self.root / "redis"

    def log_file(self, process: str) -> Path:
        return self.logs / f"{process}.log"

    def report_file(self, version: str, target: str) -> Path:
        return self.reports / f"package-{version}-{target}.json"


class LocalTarget(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    #: The compile target of the package (None: the ONNX model shipped as is).
    compile_target: str | None = None


class LocalFleet(BaseModel):
    """What ``kubeinfer up -f`` hands the runner (from the EdgeFleet manifest)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    source: str = ""
    #: The version of (model, targets): a new one starts a rollout.
    version: str
    model_uri: str
    targets: list[LocalTarget]
    rollout: RolloutSpec = RolloutSpec()
    heartbeat_interval_seconds: int = 30
    capture: EdgeCapture = EdgeCapture()
    host: str = "127.0.0.1"
    port: int | None = None
    #: An existing Redis; None: a private redis-server in the fleet's folder.
    redis_url: str | None = None
    #: Seconds between two steps of the fleet server's rollout controller.
    controller_interval_seconds: float = 1.0
    #: Local Secrets' files (``kubeinfer secret create``) named by the spec; None: the
    #: runner makes a key / token of its own on first start.
    signing_key_file: str | None = None
    bootstrap_token_file: str | None = None


class FleetPhase(StrEnum):
    STARTING = "Starting"
    PACKAGING = "Packaging"
    SERVING = "Serving"
    FAILED = "Failed"
    STOPPED = "Stopped"


class FleetState(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    runner_pid: int
    runner_start_time: int | None = None
    phase: FleetPhase = FleetPhase.STARTING
    message: str = ""
    #: The fleet server's base URL (devices' --server), once it listens.
    url: str | None = None
    port: int | None = None
    server_pid: int | None = None
    server_restarts: int = 0
    #: The fleet's Redis as shown (redacted: the private one's password, or one in
    #: ``KUBEINFER_REDIS_URL``, stays out of this file).
    redis_url: str | None = None
    current: FleetVersion | None = None
    previous: FleetVersion | None = None
    #: The version the runner failed to package (the fleet keeps serving ``current``).
    failed_version: str | None = None
    started_at: float = 0.0
    updated_at: float = 0.0
    #: The fleet server's last word on the rollout (``GET /v1/fleet``, every few seconds).
    rollout_version: str | None = None
    rollout_phase: str | None = None
    devices: int = 0
    token_file: str = ""
    public_key: str = ""
    events: list[str] = Field(default_factory=list)


def read_fleet(paths: FleetPaths) -> LocalFleet | None:
    return read_model(paths.job, LocalFleet)


def write_fleet(paths: FleetPaths, fleet: LocalFleet) -> None:
    paths.root.mkdir(parents=True, exist_ok=True)
    write_model(paths.job, fleet)


def read_fleet_state(paths: FleetPaths) -> FleetState | None:
    return read_model(paths.state, FleetState)


def write_fleet_state(paths: FleetPaths, state: FleetState) -> None:
    write_model(paths.state, state)


def known_fleets(home: Path | None = None) -> list[FleetPaths]:
    return known_job_dirs(fleets_root(home), FleetPaths)
