"""Pydantic models of the ``EdgeFleet`` custom resource (kubeinfer.io/v1alpha1).

SageMaker Edge Manager as a Kubernetes resource: one model for a fleet of
devices. The operator builds one signed package per device target (a package
Job per target, compiled for the target's CPU when ``targets[].compile`` says
so), hands the fleet server a ``FleetConfig`` (``kubeinfer_runtime.contract.edge``)
in a ConfigMap, and runs the fleet server (a Deployment + Service of the runtime's
``fleet-server`` role) that devices register with, heartbeat to and download
packages from. The fleet server rolls a new version out in waves
(``spec.rollout``) and rolls back when a wave's failures trip.

A version of the fleet's model is a short hash of what the packages are built
from (the model and the targets): a spec change that changes them is a new
version, packaged and rolled out; the version it replaces stays the rollback
target (``FleetConfig.previous``). Other changes (rollout, capture, heartbeat,
server) only rewrite the config or the Deployment.

Secrets are only ever referenced: the bootstrap token devices register with,
the ed25519 signing key and (optionally) the Redis URL reach the pods through
``secretKeyRef``. These models are the single source of
``crds/edgefleets.kubeinfer.io.yaml`` and of the operator's parsing.
"""

from __future__ import annotations

from typing import Annotated, Literal
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kubeinfer_operator.api.endpoint import (
    LIST_MAP_BY_TYPE,
    Condition,
    ModelFormat,
    ObjectMeta,
    ResourceRequirements,
    _Spec,
    model_uri_problem,
)
from kubeinfer_operator.api.placement import PodTemplate, dns_subdomain_problem
from kubeinfer_operator.api.transform_job import _DATA_URI, data_uri_problem
from kubeinfer_runtime.contract.compile import CompileTarget
from kubeinfer_runtime.contract.edge import EdgeCapture, RolloutSpec

GROUP = "kubeinfer.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "EdgeFleet"
PLURAL = "edgefleets"
SINGULAR = "edgefleet"
SHORT_NAMES = ["kef"]

#: Device target names: the contract's NAME_PATTERN less '.', '_' (they become label values
#: and parts of object names).
TARGET_NAME = r"^[a-z0-9]([-a-z0-9]{0,30}[a-z0-9])?$"
#: A Secret data key as the API server checks a secretKeyRef's (apimachinery IsConfigMapKey):
#: letters, digits, '-', '_', '.', and not '.', '..' nor starting with '..'.
_SECRET_KEY = r"^\.?[-_a-zA-Z0-9][-._a-zA-Z0-9]*$"
MAX_TARGETS = 16
DEFAULT_SERVER_REPLICAS = 2


class SecretKeyRef(_Spec):
    """One key of a Secret in the EdgeFleet's namespace (read by the pods, never copied)."""

    name: Annotated[str, Field(description="The Secret's name, in the EdgeFleet's namespace.",
                               min_length=1, max_length=253)]
    key: Annotated[str, Field(description="The key in the Secret's data.", min_length=1,
                              max_length=253, pattern=_SECRET_KEY)]

    @field_validator("name")
    @classmethod
    def _dns(cls, name: str) -> str:
        problem = dns_subdomain_problem(name)
        if problem:
            raise ValueError(problem)
        return name


class EdgeModel(_Spec):
    """The model the fleet runs."""

    uri: Annotated[
        str,
        Field(description="The model: s3://bucket/key (an ONNX model, or a compiled artifact "
                          "with format: compiled), or file:///absolute/path inside the "
                          "packaging image.", min_length=1, max_length=1024,
              json_schema_extra={"pattern": "^(s3|file)://.+"}),
    ]
    format: Annotated[
        ModelFormat,
        Field(description="onnx (an ONNX model) or compiled (an artifact of kubeinfer compile "
                          "or a CompilationJob, shipped as is: no target may then set "
                          "compile)."),
    ] = ModelFormat.ONNX

    @field_validator("uri")
    @classmethod
    def _check_uri(cls, uri: str) -> str:
        problem = model_uri_problem(uri)
        if problem:
            raise ValueError(problem)
        return uri


class TargetCompile(_Spec):
    """Compile the ONNX model for the target's CPU (SageMaker Neo) before packaging it."""

    target: Annotated[
        CompileTarget,
        Field(description="The devices' CPU: x86-64, x86-64-v3, haswell, skylake-avx512, "
                          "znver4, aarch64 or armv7 (native, the packaging node's CPU, is "
                          "refused: devices are not that node)."),
    ]


class EdgeTarget(_Spec):
    """One kind of device: devices register with this target name and get its package."""

    name: Annotated[str, Field(description="Target name devices register with (e.g. "
                                           "jetson-arm64): lowercase letters, digits and "
                                           "'-', at most 32 characters.",
                               min_length=1, max_length=32, pattern=TARGET_NAME)]
    compile: Annotated[
        TargetCompile | None,
        Field(description="Compile the model for this target's CPU; omitted: the ONNX "
                          "model is shipped as is (served by onnxruntime on the device)."),
    ] = None


class Registration(_Spec):
    """How devices register."""

    bootstrapTokenSecret: Annotated[
        SecretKeyRef,
        Field(description="The bootstrap token devices register with (at least 16 "
                          "characters); it also authorizes the fleet server's fleet-wide "
                          "reads. The operator never reads it: it asks for this status with "
                          "a read-only status token of its own."),
    ]


class Signing(_Spec):
    """How packages are signed."""

    keySecret: Annotated[
        SecretKeyRef,
        Field(description="The ed25519 private key packages are signed with: base64 of the "
                          "raw 32-byte key. Only the package Jobs read it; devices get the "
                          "public key."),
    ]


class Packages(_Spec):
    """Where packages are written."""

    uri: Annotated[
        str,
        Field(description="Object-store prefix the package Jobs write to and the fleet "
                          "server reads from: s3://bucket/prefix (packages go under "
                          "<uri>/<namespace>/<fleet>/).", min_length=1, max_length=1024,
              json_schema_extra={"pattern": _DATA_URI}),
    ]

    @field_validator("uri")
    @classmethod
    def _check_uri(cls, uri: str) -> str:
        problem = data_uri_problem("packages.uri", uri)
        if problem:
            raise ValueError(problem)
        if "?" in uri or "#" in uri:
            # The package Job parses <uri>/<namespace>/<fleet>/...: a query or fragment
            # would end the key before the namespace, so a fleet could write another
            # namespace's packages.
            raise ValueError(f"packages.uri: {uri!r} holds '?' or '#', which would end the "
                             "object key before <namespace>/<fleet>/ (fleets never share a "
                             "prefix); name a plain prefix, e.g. s3://bucket/packages")
        return uri


class RedisConfig(_Spec):
    """The fleet server's durable state (devices, credentials, the rollout, history).

    Every replica of the fleet server shares it; losing it loses the devices'
    registrations (they register again with the bootstrap token). Use a Redis
    with persistence (AOF) for a fleet that matters.
    """

    url: Annotated[
        str | None,
        Field(description="redis://host:6379/0 without a password (one with a password "
                          "goes in urlSecret).", min_length=1, max_length=1024,
              json_schema_extra={"pattern": "^rediss?://.+"}),
    ] = None
    urlSecret: Annotated[
        SecretKeyRef | None,
        Field(description="A Secret key holding the Redis URL (use it when the URL carries "
                          "a password)."),
    ] = None

    @field_validator("url")
    @classmethod
    def _no_password(cls, url: str | None) -> str | None:
        if url is None:
            return url
        parsed = urlparse(url)
        if parsed.scheme not in ("redis", "rediss") or not parsed.hostname:
            raise ValueError(f"redis.url {url!r} must look like redis://host:6379/0")
        if parsed.password:
            raise ValueError("redis.url carries a password, which would show in the "
                             "EdgeFleet and its pods' spec; put the URL in a Secret and name "
                             "it in redis.urlSecret")
        return url

    @model_validator(mode="after")
    def _one(self) -> RedisConfig:
        if (self.url is None) == (self.urlSecret is None):
            given = "url and urlSecret" if self.url else "neither url nor urlSecret"
            raise ValueError(f"redis sets {given}; set exactly one")
        return self


class FleetServer(_Spec):
    """The fleet server's pods."""

    replicas: Annotated[int, Field(description="Replicas of the fleet server (one holds the "
                                               "rollout controller's lease at a time); two or "
                                               "more also get a PodDisruptionBudget.",
                                   ge=1, le=20)] = DEFAULT_SERVER_REPLICAS
    podTemplate: Annotated[
        PodTemplate | None,
        Field(description="Placement and identity of the fleet server pods, over the "
                          "operator's default podTemplate."),
    ] = None
    resources: Annotated[
        ResourceRequirements,
        Field(description="Requests and limits of the fleet server container (default: the "
                          "operator's defaults)."),
    ] = Field(default_factory=ResourceRequirements)


class EdgeFleetSpec(_Spec):
    """Desired state of an edge fleet (SageMaker Edge Manager)."""

    model: Annotated[EdgeModel, Field(description="The model the fleet runs.")]
    targets: Annotated[
        list[EdgeTarget],
        Field(description="The kinds of device in the fleet: one package per target.",
              min_length=1, max_length=MAX_TARGETS,
              json_schema_extra={"x-kubernetes-list-type": "map",
                                 "x-kubernetes-list-map-keys": ["name"]}),
    ]
    rollout: Annotated[
        RolloutSpec,
        Field(description="How a new version reaches the devices: waves, and what a wave "
                          "that trips does."),
    ] = Field(default_factory=RolloutSpec)
    heartbeatIntervalSeconds: Annotated[
        int, Field(description="Seconds between two heartbeats of a device.", ge=1, le=3600),
    ] = 30
    dataCapture: Annotated[
        EdgeCapture,
        Field(description="Capture of device requests, uploaded to the fleet server."),
    ] = Field(default_factory=EdgeCapture)
    registration: Annotated[Registration, Field(description="How devices register.")]
    signing: Annotated[Signing, Field(description="How packages are signed.")]
    packages: Annotated[Packages, Field(description="Where packages are written.")]
    redis: Annotated[
        RedisConfig,
        Field(description="The fleet server's durable state: a Redis shared by its replicas "
                          "(use persistence; losing it makes devices register again)."),
    ]
    server: Annotated[FleetServer, Field(description="The fleet server's pods.")] = Field(
        default_factory=FleetServer)

    @field_validator("targets")
    @classmethod
    def _unique(cls, targets: list[EdgeTarget]) -> list[EdgeTarget]:
        names = [t.name for t in targets]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"targets: {', '.join(dup)} named more than once; give each "
                             "target its own name")
        return targets

    @model_validator(mode="after")
    def _compiled_ships_as_is(self) -> EdgeFleetSpec:
        compiling = [t.name for t in self.targets if t.compile is not None]
        if compiling and self.model.format is ModelFormat.COMPILED:
            raise ValueError(f"targets {', '.join(compiling)} set compile, and model.format "
                             "compiled is already compiled; remove compile or point "
                             "model.uri at the ONNX model")
        native = [t.name for t in self.targets
                  if t.compile is not None and t.compile.target is CompileTarget.NATIVE]
        if native:
            raise ValueError(f"targets {', '.join(native)}: compile.target native compiles "
                             "for the packaging Job's node, not for the devices; name the "
                             "devices' CPU (x86-64, aarch64, ...)")
        return self


# -- status -------------------------------------------------------------------------------------


class _Status(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PackageStatus(_Status):
    """One target's package of one version."""

    target: str = Field(description="The target (spec.targets[].name).")
    uri: str = Field(description="Where the package is.")
    sha256: str = Field(description="sha256 of the package.")
    size: int = Field(description="Size of the package, bytes.")
    signature: str = Field(description="base64 of the package's ed25519 signature.")


class VersionStatus(_Status):
    """A packaged version of the fleet's model."""

    version: str = Field(description="The version (a short hash of the model and targets).")
    model: str = Field(default="", description="The model it was packaged from.")
    publicKey: str = Field(description="base64 of the ed25519 public key that verifies its "
                                       "packages.")
    packages: list[PackageStatus] = Field(
        description="One package per target.",
        json_schema_extra={"x-kubernetes-list-type": "map",
                           "x-kubernetes-list-map-keys": ["target"]})


class WaveProgress(_Status):
    """The wave in progress, as the fleet server counts it."""

    index: int = Field(description="The wave's index (0 first).")
    devices: int = Field(description="Devices in the wave.")
    succeeded: int = Field(description="Devices of the wave running the new version.")
    failed: int = Field(description="Devices of the wave that failed or stalled.")
    pending: int = Field(description="Devices of the wave still updating.")
    successPercent: float = Field(description="Share of the wave's devices that succeeded.")
    failurePercent: float = Field(description="Share of the wave's devices that failed.")


class EdgeFleetStatus(_Status):
    """What the fleet runs (rolled up from the package Jobs and the fleet server)."""

    observedGeneration: int | None = Field(
        default=None, description="The metadata.generation the operator last acted on.")
    conditions: list[Condition] = Field(
        default_factory=list, json_schema_extra=LIST_MAP_BY_TYPE,
        description="Ready: the fleet server serves the current version. Packaged: every "
                    "target's package of the spec's version is built. RolloutComplete: every "
                    "device runs the current version. RolledBack: the current version's "
                    "rollout tripped and the devices went back to the previous one.")
    phase: str | None = Field(default=None, description="Packaging, RollingOut, Complete, "
                                                        "RolledBack, Paused or Failed.")
    version: str | None = Field(default=None, description="The version the fleet server "
                                                          "rolls out (current).")
    previousVersion: str | None = Field(default=None, description="The version it replaced "
                                                                  "(the rollback target).")
    desiredVersion: str | None = Field(default=None, description="The spec's version (being "
                                                                 "packaged when it differs "
                                                                 "from version).")
    current: VersionStatus | None = Field(default=None, description="The current version's "
                                                                    "packages.")
    previous: VersionStatus | None = Field(default=None, description="The previous version's "
                                                                     "packages.")
    building: VersionStatus | None = Field(default=None, description="Packages of the "
                                                                     "spec's version built so "
                                                                     "far, while others are "
                                                                     "still being built.")
    fleetServer: str | None = Field(default=None, description="The fleet server's in-cluster "
                                                              "URL (devices need a route to "
                                                              "it: an Ingress or a "
                                                              "LoadBalancer of your own).")
    devices: int | None = Field(default=None, description="Registered devices.")
    online: int | None = Field(default=None, description="Devices heartbeating on time.")
    devicesByState: dict[str, int] | None = Field(default=None, description="Devices by "
                                                  "state (Online, Offline, Updating, Stalled, "
                                                  "Failed).")
    devicesByVersion: dict[str, int] | None = Field(default=None, description="Devices by "
                                                    "the version they run.")
    wave: str | None = Field(default=None, description="The wave in progress, as i/n (n/n "
                                                       "once all passed; all: no waves).")
    currentWave: WaveProgress | None = Field(default=None, description="The wave in "
                                                                       "progress.")
    rolloutMessage: str | None = Field(default=None, description="What the fleet server says "
                                                                 "of the rollout.")
    lastFleetStatusTime: str | None = Field(default=None, description="When the operator last "
                                                                      "read the fleet "
                                                                      "server's status "
                                                                      "(RFC 3339).")


class EdgeFleet(BaseModel):
    """A whole EdgeFleet object as read from YAML or the Kubernetes API."""

    model_config = ConfigDict(extra="forbid")

    apiVersion: Literal["kubeinfer.io/v1alpha1"]
    kind: Literal["EdgeFleet"]
    metadata: ObjectMeta
    spec: EdgeFleetSpec
    status: EdgeFleetStatus | None = None

    @property
    def name(self) -> str:
        return self.metadata.name

