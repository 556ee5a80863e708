"""Edge fleets' contract: the fleet config, the device API and the fleet's status.

Three processes share it (DESIGN.md, Edge):

* the **operator** (or ``kubeinfer up -f fleet.yaml``) builds one signed package
  per device target and hands the **fleet server** a ``FleetConfig`` (a JSON file:
  a ConfigMap on Kubernetes), rewriting it when the EdgeFleet's spec changes;
* the **fleet server** (``kubeinfer-runtime serve --role fleet-server``) keeps
  devices, credentials and the rollout in Redis, answers the device API and
  advances the rollout in waves (``kubeinfer_runtime.edge.waves``, pure);
* the **device agent** (``kubeinfer edge agent``) registers, heartbeats, installs
  what ``DesiredState`` names after checking its sha256 and ed25519 signature,
  serves it on 127.0.0.1, and uploads captured records.

The device API (JSON over HTTP, ``/v1/...``; OpenAPI at ``/openapi.json``):

* ``POST /v1/register`` with ``Authorization: Bearer <bootstrap token>`` and a
  ``RegisterRequest`` → ``RegisterResponse`` (a per-device credential, stored
  hashed by the server). An id already registered is registered again only with
  its current credential in ``X-Kubeinfer-Device-Credential`` or once its device
  has been silent ``reregister_after_seconds`` (409 otherwise): the bootstrap
  token alone cannot take over a live device;
* ``POST /v1/devices/{id}/heartbeat`` with ``Authorization: Bearer <credential>``
  and a ``Heartbeat`` → ``HeartbeatResponse`` (the desired state);
* ``GET /v1/packages/{version}/{target}`` (credential) → the package bytes;
* ``POST /v1/devices/{id}/captures`` (credential) → JSON Lines of capture
  records, ``CaptureUploadResponse``;
* ``GET /v1/fleet`` → ``FleetStatus`` and ``GET /v1/devices`` → ``DeviceList`` (the
  operator's and the CLI's view; ``Authorization: Bearer <bootstrap token>`` or
  ``<status token>``: the status token authorizes these two reads and nothing else).

Field names are camelCase: the EdgeFleet CRD embeds ``RolloutSpec`` and
``EdgeCapture``. The operator imports this module (no heavy dependencies here).
"""

from __future__ import annotations

import base64
import re
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

from kubeinfer_runtime.contract import HttpSettings, S3Settings
from kubeinfer_runtime.contract.redact import readable_redis_url

#: Device ids, target names and versions: DNS-label-like, so they are safe in keys,
#: paths and label values.
NAME_PATTERN = r"^[a-z0-9]([-a-z0-9._]{0,61}[a-z0-9])?$"
_NAME_RE = re.compile(NAME_PATTERN)
#: Bytes signed for a package (``signing_payload``); a version of the format.
SIGNATURE_DOMAIN = "kubeinfer-edge-package-v1"
#: Largest JSON body the device API reads (heartbeats, registrations).
MAX_DEVICE_REQUEST_BYTES = 64 * 1024
#: Largest capture upload in one request.
MAX_CAPTURE_UPLOAD_BYTES = 8 * 1024 * 1024
#: Labels a device may declare (count) and their length.
MAX_LABELS = 32
#: Header in which a registering device proves it holds the id's current credential.
DEVICE_CREDENTIAL_HEADER = "X-Kubeinfer-Device-Credential"
#: Longest ``DesiredState.packageUrl`` and package signature (an ed25519 signature is 88
#: base64 characters): a reply over them is refused, not carried into an install.
MAX_PACKAGE_URL_LENGTH = 2048
MAX_SIGNATURE_LENGTH = 512


def valid_name(value: str) -> bool:
    return bool(_NAME_RE.match(value))


def signing_payload(fleet: str, version: str, target: str, sha256: str) -> bytes:
    """The exact bytes a package signature covers: the fleet, the version, the target and the
    package's sha256, so a signature cannot be replayed for another fleet, version or target."""
    return f"{SIGNATURE_DOMAIN}\n{fleet}\n{version}\n{target}\n{sha256}\n".encode()


class _Strict(BaseModel):
    # Non-finite floats (1e400, NaN, Infinity) are refused naming the field: JSON cannot
    # write them back (pydantic stores null), so an accepted one made the record unreadable.
    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)


class _Open(BaseModel):
    """Device-sent models: unknown fields are ignored, so a newer agent talks to an older
    server. Non-finite floats are refused, as in ``_Strict``."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True, allow_inf_nan=False)


# -- the rollout (embedded in the EdgeFleet CRD) ------------------------------------------------


class OnFailure(StrEnum):
    ROLLBACK = "Rollback"
    PAUSE = "Pause"


class Wave(_Strict):
    """One wave: a share of the fleet (or the devices matching labels) that must succeed
    before the next wave starts."""

    percentage: Annotated[float | None, Field(
        description="Cumulative share of the fleet updated once this wave is done (0-100]. "
                    "Exactly one of percentage and deviceSelector.", gt=0, le=100)] = None
    deviceSelector: Annotated[dict[str, str] | None, Field(
        description="Devices whose labels include all of these are this wave's.")] = None
    minDevices: Annotated[int, Field(
        description="Devices that must report before the wave may trip or pass.", ge=0,
        le=1_000_000)] = 1
    bakeSeconds: Annotated[int, Field(
        description="Seconds the wave's devices run the new version before the next wave.",
        ge=0, le=7 * 24 * 3600)] = 0
    maxFailurePercent: Annotated[float, Field(
        description="Share of the wave's devices that may fail (stalled ones count) before "
                    "the rollout trips.", ge=0, le=100)] = 0

    @model_validator(mode="after")
    def _one_choice(self) -> Wave:
        if (self.percentage is None) == (self.deviceSelector is None):
            raise ValueError("a wave takes exactly one of percentage and deviceSelector")
        return self


class RolloutSpec(_Strict):
    waves: Annotated[list[Wave], Field(
        description="The waves in order; devices not in any wave update after the last "
                    "one. Empty: every device at once.", max_length=20)] = []
    onFailure: Annotated[OnFailure, Field(
        description="Rollback: every device that took the new version goes back to the "
                    "previous one. Pause: the rollout stops where it is.")] = OnFailure.ROLLBACK
    deviceDeploymentTimeoutSeconds: Annotated[int, Field(
        description="A device that neither succeeds nor fails within this is Stalled and "
                    "counts as a failure.", ge=5, le=7 * 24 * 3600)] = 600


class OnFull(StrEnum):
    DROP_OLDEST = "DropOldest"
    REJECT_NEW = "RejectNew"


class EdgeCapture(_Strict):
    samplingPercentage: Annotated[float, Field(
        description="Share of device requests captured (0-100).", ge=0, le=100)] = 0
    destination: Annotated[str, Field(
        description="Where the fleet server writes uploaded records: s3://bucket/prefix or "
                    "file:///dir.", max_length=1024)] = ""
    bufferBytes: Annotated[int, Field(
        description="The on-device buffer's bound, bytes.", ge=4096,
        le=16 * 1024 ** 3)] = 64 * 1024 * 1024
    onFull: Annotated[OnFull, Field(
        description="When the buffer is full: DropOldest drops the oldest records, "
                    "RejectNew drops the new one.")] = OnFull.DROP_OLDEST


# -- what the operator hands the fleet server ---------------------------------------------------


class PackageRef(_Strict):
    """One target's package of one version."""

    uri: str = Field(description="Where the fleet server reads it (file:// or s3://).")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)
    #: base64 of the ed25519 signature of ``signing_payload(fleet, version, target, sha256)``.
    signature: str = Field(max_length=MAX_SIGNATURE_LENGTH)


class FleetVersion(_Strict):
    """A version of the fleet's model: one package per target."""

    version: str = Field(pattern=NAME_PATTERN)
    packages: dict[str, PackageRef]


class FleetConfig(_Strict):
    """The fleet server's whole configuration, rewritten by the operator on each spec change.

    ``current`` is what the fleet should run; ``previous`` what it ran before (the
    rollback target; None for a fleet's first version).
    """

    name: str
    namespace: str = "default"
    current: FleetVersion
    previous: FleetVersion | None = None
    rollout: RolloutSpec = RolloutSpec()
    heartbeatIntervalSeconds: int = Field(default=30, ge=1, le=3600)
    capture: EdgeCapture = EdgeCapture()
    #: base64 of the raw 32-byte ed25519 public key packages are signed with.
    publicKey: str

    @model_validator(mode="after")
    def _key(self) -> FleetConfig:
        try:
            raw = base64.b64decode(self.publicKey, validate=True)
        except ValueError:
            raise ValueError("publicKey is not base64") from None
        if len(raw) != 32:
            raise ValueError("publicKey is not a raw 32-byte ed25519 key")
        return self


class FleetServerSettings(HttpSettings):
    """Settings of the fleet-server role (``KUBEINFER_*``; S3 from ``AWS_*`` too)."""

    host: str = "0.0.0.0"
    port: int = 8080
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    #: The FleetConfig JSON file (a mounted ConfigMap); re-read when it changes.
    fleet_config_file: str
    #: Durable state: devices, credentials, the rollout, device history.
    redis_url: str
    _redis_url_readable = field_validator("redis_url")(readable_redis_url)
    #: The bootstrap token devices register with (from a Secret); it also authorizes the
    #: fleet-wide reads (``GET /v1/fleet``, ``GET /v1/devices``). Compared in constant time.
    bootstrap_token: SecretStr = Field(min_length=16)
    #: A read-only token (``KUBEINFER_STATUS_TOKEN``): it authorizes ``GET /v1/fleet`` and
    #: ``GET /v1/devices`` only, never registering, heartbeats, packages or captures. On
    #: Kubernetes the operator generates it per fleet and keeps it in the namespace's
    #: ``kubeinfer-runtime`` Secret, so it polls status without reading the user's
    #: bootstrap-token Secret. None: only the bootstrap token reads. Constant-time compare.
    status_token: SecretStr | None = Field(default=None, min_length=16)
    #: Seconds between two steps of the rollout controller.
    controller_interval_seconds: float = Field(default=1.0, gt=0, le=60)
    #: A replica holds the controller's lease this long without renewing it.
    controller_lease_seconds: float = Field(default=10.0, gt=0, le=600)
    #: Device history entries kept per device.
    history_length: int = Field(default=50, ge=1, le=10_000)
    #: Seconds a registered device must have been silent before its id may be registered
    #: again without its current credential (a reflashed device that lost it). Until then
    #: a registration of the id answers 409, so the bootstrap token alone cannot take over
    #: a live device.
    reregister_after_seconds: float = Field(default=600.0, ge=1, le=30 * 24 * 3600)
    #: Devices the fleet holds; registering a new id beyond it answers 403.
    max_devices: int = Field(default=100_000, ge=1, le=10_000_000)
    s3_endpoint_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("KUBEINFER_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                                      "AWS_ENDPOINT_URL"))
    s3_access_key: str | None = Field(
        default=None, validation_alias=AliasChoices("KUBEINFER_S3_ACCESS_KEY",
                                                    "AWS_ACCESS_KEY_ID"))
    s3_secret_key: str | None = Field(
        default=None, validation_alias=AliasChoices("KUBEINFER_S3_SECRET_KEY",
                                                    "AWS_SECRET_ACCESS_KEY"))
    s3_region: str | None = Field(
        default=None, validation_alias=AliasChoices("KUBEINFER_S3_REGION", "AWS_REGION",
                                                    "AWS_DEFAULT_REGION"))

    def s3(self) -> S3Settings:
        return S3Settings(endpoint_url=self.s3_endpoint_url, access_key=self.s3_access_key,
                          secret_key=self.s3_secret_key, region=self.s3_region)


# -- the device API -----------------------------------------------------------------------------


class DeviceState(StrEnum):
    """A device's state in the fleet's status (``Stalled`` and ``Offline`` are decided by the
    server from time; the others are what the device reports)."""

    ONLINE = "Online"
    OFFLINE = "Offline"
    UPDATING = "Updating"
    STALLED = "Stalled"
    FAILED = "Failed"


class RegisterRequest(_Open):
    deviceId: str = Field(pattern=NAME_PATTERN)
    target: str = Field(pattern=NAME_PATTERN)
    labels: dict[str, str] = Field(default_factory=dict, max_length=MAX_LABELS)
    agentVersion: str = Field(default="", max_length=64)


class RegisterResponse(_Strict):
    deviceId: str
    #: The device's own credential; the server keeps only its hash.
    credential: str
    heartbeatIntervalSeconds: int
    publicKey: str
    fleet: str


class DeploymentOutcome(StrEnum):
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class DeploymentResult(_Open):
    """What happened to the last version the device was asked to run."""

    version: str = Field(pattern=NAME_PATTERN)
    outcome: DeploymentOutcome
    message: str = Field(default="", max_length=1024)
    at: float = 0.0


class Heartbeat(_Open):
    #: The version the device serves now ("" before its first install).
    version: str = Field(default="", max_length=63)
    #: True while the device installs and warms up a version.
    updating: bool = False
    #: The version being installed, while ``updating``.
    updatingTo: str = Field(default="", max_length=63)
    lastDeployment: DeploymentResult | None = None
    #: Unix time of the last inference the device served; 0 if none.
    lastInferenceAt: float = 0.0
    #: Requests served, errors, and the p99 latency (ms) since the agent started.
    requests: int = Field(default=0, ge=0)
    errors: int = Field(default=0, ge=0)
    latencyP99Ms: float = Field(default=0.0, ge=0)
    #: Capture records the device dropped because its buffer was full.
    capturesDropped: int = Field(default=0, ge=0)
    capturesBuffered: int = Field(default=0, ge=0)
    uptimeSeconds: float = Field(default=0.0, ge=0)


class DesiredState(_Strict):
    """The version a device should run, and where to get it. Validated as strictly as what
    the device reports back (``DeploymentResult``): a reply naming a version the device
    could not report is refused with the reply, not discovered mid-install."""

    version: str = Field(pattern=NAME_PATTERN)
    target: str = Field(pattern=NAME_PATTERN)
    #: Path on the fleet server (``/v1/packages/{version}/{target}``).
    packageUrl: str = Field(min_length=1, max_length=MAX_PACKAGE_URL_LENGTH)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)
    signature: str = Field(max_length=MAX_SIGNATURE_LENGTH)


class HeartbeatResponse(_Strict):
    desired: DesiredState | None
    heartbeatIntervalSeconds: int
    capture: EdgeCapture


class CaptureUploadResponse(_Strict):
    accepted: int
    uri: str


# -- the fleet's status -------------------------------------------------------------------------


class RolloutPhase(StrEnum):
    PROGRESSING = "Progressing"
    COMPLETE = "Complete"
    ROLLED_BACK = "RolledBack"
    PAUSED = "Paused"


class WaveStatus(_Strict):
    index: int
    devices: int
    succeeded: int
    failed: int
    pending: int
    successPercent: float
    failurePercent: float


class RolloutStatus(_Strict):
    version: str
    previousVersion: str | None
    phase: RolloutPhase
    #: Index of the wave in progress (== len(waves) once every wave passed).
    wave: int
    waves: int
    currentWave: WaveStatus | None = None
    message: str = ""
    startedAt: float = 0.0
    finishedAt: float | None = None


class FleetStatus(_Strict):
    fleet: str
    devices: int
    byState: dict[str, int]
    byVersion: dict[str, int]
    rollout: RolloutStatus | None
    #: Server-side counters (heartbeats answered, registrations, refused requests).
    counters: dict[str, int] = {}


class DeviceSummary(_Strict):
    deviceId: str
    target: str
    labels: dict[str, str]
    state: DeviceState
    version: str
    desiredVersion: str | None
    lastSeen: float
    lastDeployment: DeploymentResult | None = None


class DeviceList(_Strict):
    devices: list[DeviceSummary]
    #: Set when the list was cut at the request's ``limit``: pass it as ``after``.
    next: str | None = None


class HistoryEntry(_Strict):
    """A heartbeat that changed what the device runs or its last deployment's result."""

    #: When the fleet server received it (epoch seconds).
    at: float
    version: str
    updatingTo: str = ""
    lastDeployment: DeploymentResult | None = None


class DeviceHistory(_Strict):
    """``GET /v1/devices/{id}/history``: newest first, the fleet server's last entries."""

    deviceId: str
    entries: list[HistoryEntry]
