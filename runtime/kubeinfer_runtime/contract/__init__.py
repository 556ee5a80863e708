"""The contract between the operator (control plane) and the runtime (data plane).

The operator renders these models into a ConfigMap / env vars on Kubernetes, or
into a JSON file / process environment in local mode; the runtime reads them
back. This module is the only part of the runtime the operator may import, so it
must stay free of heavy dependencies (no numpy, onnxruntime, FastAPI).

Two kinds of things live here:

* ``RouteTable``: what the gateway needs to route requests (endpoints, variants,
  weights, upstream URLs). It changes at run time; the gateway reloads it from a
  file when the file changes (a mounted ConfigMap is updated by kubelet with an
  atomic symlink swap, local mode rewrites it atomically).
* Process settings (``ModelServerSettings``, ``GatewaySettings``): one
  pydantic-settings class per runtime role, env prefix ``KUBEINFER_``. The
  operator builds them and calls ``to_env()`` to render the container env.

Policies both sides must apply the same way live in submodules of this
package (``contract.outbound``: which addresses outbound calls may reach;
``contract.auth``: how callers authenticate), so the operator's admission
checks and the runtime's checks before each call can never disagree.
"""

from __future__ import annotations

import json
import os
import tempfile
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

from kubeinfer_runtime.contract.auth import AuthRoute
from kubeinfer_runtime.contract.capture import CaptureRoute
from kubeinfer_runtime.contract.env_settings import EnvSettings
from kubeinfer_runtime.contract.locations import default_input_paths, normalize_prefix
from kubeinfer_runtime.contract.redact import readable_redis_url
from kubeinfer_runtime.contract.shadow import MirrorRoute, ShadowRoute

# Re-exported (`X as X`): the contract's plain names live in wire.py, which says why.
from kubeinfer_runtime.wire import ENV_PREFIX as ENV_PREFIX
from kubeinfer_runtime.wire import FORWARDED_REQUEST_HEADERS as FORWARDED_REQUEST_HEADERS
from kubeinfer_runtime.wire import GRACEFUL_SHUTDOWN_S as GRACEFUL_SHUTDOWN_S
from kubeinfer_runtime.wire import H_ASYNC_ACCEPT as H_ASYNC_ACCEPT
from kubeinfer_runtime.wire import H_ASYNC_CONTENT_TYPE as H_ASYNC_CONTENT_TYPE
from kubeinfer_runtime.wire import H_CUSTOM_ATTRIBUTES as H_CUSTOM_ATTRIBUTES
from kubeinfer_runtime.wire import H_ERROR_TYPE as H_ERROR_TYPE
from kubeinfer_runtime.wire import H_FAILURE_LOCATION as H_FAILURE_LOCATION
from kubeinfer_runtime.wire import H_FILENAME as H_FILENAME
from kubeinfer_runtime.wire import H_INFERENCE_ID as H_INFERENCE_ID
from kubeinfer_runtime.wire import H_INPUT_LOCATION as H_INPUT_LOCATION
from kubeinfer_runtime.wire import H_INVOCATION_TIMEOUT as H_INVOCATION_TIMEOUT
from kubeinfer_runtime.wire import H_INVOKED_VARIANT as H_INVOKED_VARIANT
from kubeinfer_runtime.wire import H_OUTPUT_LOCATION as H_OUTPUT_LOCATION
from kubeinfer_runtime.wire import H_REQUEST_TTL as H_REQUEST_TTL
from kubeinfer_runtime.wire import H_S3_OUTPUT_PATH_EXTENSION as H_S3_OUTPUT_PATH_EXTENSION
from kubeinfer_runtime.wire import H_TARGET_CONTAINER as H_TARGET_CONTAINER
from kubeinfer_runtime.wire import H_TARGET_MODEL as H_TARGET_MODEL
from kubeinfer_runtime.wire import H_TARGET_VARIANT as H_TARGET_VARIANT
from kubeinfer_runtime.wire import REALTIME_MAX_PAYLOAD_BYTES as REALTIME_MAX_PAYLOAD_BYTES
from kubeinfer_runtime.wire import ROUTE_TABLE_FILENAME as ROUTE_TABLE_FILENAME
from kubeinfer_runtime.wire import SERVERLESS_MAX_PAYLOAD_BYTES as SERVERLESS_MAX_PAYLOAD_BYTES
from kubeinfer_runtime.wire import ModelFormat as ModelFormat
from kubeinfer_runtime.wire import Role as Role

CONTRACT_VERSION: Literal["v1alpha1"] = "v1alpha1"


class _Strict(BaseModel):
    # defer_build: a model's validator is built when first used, not at import. Most
    # of these models are the gateway's (route tables); a model server, whose start
    # every scale-from-zero pays, uses none of them (~15 ms of imports, issue 18).
    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)


class VariantRoute(_Strict):
    """One production variant as the gateway sees it."""

    name: str
    weight: Annotated[float, Field(ge=0)]
    #: Base URLs of the variant's model servers (``http://host:port``). On
    #: Kubernetes this is the variant's headless Service (see ``discovery``); in
    #: local mode one URL per replica process. The gateway balances over them.
    upstreams: list[str] = Field(default_factory=list)
    #: ``static``: use ``upstreams`` as they are. ``dns``: each upstream's host is
    #: a headless Service; the gateway resolves it to the ready pods' addresses
    #: and routes, balances and health-checks per pod.
    discovery: Literal["static", "dns"] = "static"
    #: Admission (real-time endpoints): a fixed number of requests in flight per
    #: model server instead of the adaptive limit, and the longest wait for a slot
    #: before 429; None: the gateway's defaults.
    max_in_flight_per_upstream: int | None = Field(default=None, ge=1)
    max_queue_wait_s: float | None = Field(default=None, ge=0)
    #: The production variant this route serves when it is one fleet of a guarded rollout
    #: (``<variant>`` and ``<variant>-green`` split its weight): answers carry it in
    #: ``x-Amzn-Invoked-Production-Variant`` and ``TargetVariant=<variant>`` reaches
    #: every route of it, split by their weights. None: the route's own ``name``.
    #: Metrics stay labelled by ``name``, so each fleet keeps its own series.
    production_variant: str | None = None


#: SageMaker's limits for asynchronous requests (RequestTTLSeconds up to 6 h,
#: InvocationTimeoutSeconds up to 1 h; defaults 6 h and 15 min).
ASYNC_MAX_REQUEST_TTL_S = 21600
ASYNC_MAX_INVOCATION_TIMEOUT_S = 3600
ASYNC_DEFAULT_INVOCATION_TIMEOUT_S = 900
#: Requests an async endpoint holds queued or in progress (ours; SageMaker throttles
#: callers instead). Each holds about 1 KB in a Redis every async endpoint may share.
ASYNC_DEFAULT_MAX_QUEUED = 100_000
ASYNC_MAX_QUEUED = 10_000_000


class AsyncQueueKeys(_Strict):
    """The Redis keys of one asynchronous endpoint's queue.

    Here, not in the runtime's ``queue`` package, because the operator reads the
    backlog from the same keys to scale the workers.
    """

    #: Unique per Redis server: ``<namespace>.<endpoint>`` on Kubernetes.
    queue: str

    @property
    def stream(self) -> str:
        return f"kubeinfer:async:{{{self.queue}}}:requests"

    @property
    def group(self) -> str:
        return "workers"

    @property
    def dead_letter(self) -> str:
        return f"kubeinfer:async:{{{self.queue}}}:dead-letter"

    def inference(self, inference_id: str) -> str:
        """Hash of one request (idempotency record, attempts, state, and ``writes``: the
        output or failure objects written, an audit). It expires with the request's
        idempotency window, so nothing here grows with the number of requests."""
        return f"kubeinfer:async:{{{self.queue}}}:id:{inference_id}"


#: A consumer idle longer than this (ms) is not counted as a live worker.
LIVE_CONSUMER_IDLE_MS = 10_000


class AsyncBacklog(_Strict):
    """The scaling signal of an async endpoint, as gateway, supervisor and operator read it.

    Backlog = entries not yet delivered to any worker (the group's lag) +
    entries delivered but not acknowledged (pending). Per instance it is
    divided by the live workers: consumers that talked to Redis recently (a
    worker blocks on XREADGROUP for at most a second at a time; a SIGKILLed one
    stays listed, idle, until it is cleaned up).
    """

    queued: int = 0
    in_flight: int = 0
    workers: int = 0

    @property
    def total(self) -> int:
        return self.queued + self.in_flight

    @property
    def per_instance(self) -> float:
        """SageMaker's ApproximateBacklogSizePerInstance (the total with no worker)."""
        return self.total / max(self.workers, 1)

    @classmethod
    def from_xinfo(cls, groups: list[dict[Any, Any]], consumers: list[dict[Any, Any]],
                   group: str, stream_length: int) -> AsyncBacklog:
        """From XINFO GROUPS / XINFO CONSUMERS replies (redis-py dicts)."""
        for g in groups:
            name = g.get("name", "")
            if (name.decode() if isinstance(name, bytes) else str(name)) != group:
                continue
            lag = g.get("lag")
            # Redis answers lag None when it cannot tell (after deletions): use
            # the stream length, an upper bound, rather than under-scale.
            queued = int(lag) if lag is not None else stream_length
            live = sum(1 for c in consumers if int(c.get("idle", 0)) < LIVE_CONSUMER_IDLE_MS)
            return cls(queued=queued, in_flight=int(g.get("pending", 0)), workers=live)
        return cls(queued=stream_length)


class AsyncRoute(_Strict):
    """What the gateway needs to accept asynchronous requests for an endpoint."""

    queue: str
    #: The queue's Redis; None: the gateway's own ``KUBEINFER_REDIS_URL`` (on
    #: Kubernetes, so a password can come from a Secret, not this ConfigMap).
    redis_url: str | None = None
    #: Output objects are ``<output_path>/<InferenceId>.out`` (see ``output_location``
    #: for the client's S3OutputPathExtension and Filename).
    output_path: str
    #: Failure objects are ``<failure_path>/<InferenceId>-error.out``.
    failure_path: str
    #: Folder prefixes every InputLocation must be below (``contract.locations``);
    #: empty: the default derived from ``output_path``.
    input_paths: list[str] = Field(default_factory=list)
    request_ttl_s: int = Field(default=ASYNC_MAX_REQUEST_TTL_S, ge=60,
                               le=ASYNC_MAX_REQUEST_TTL_S)
    invocation_timeout_s: int = Field(default=ASYNC_DEFAULT_INVOCATION_TIMEOUT_S, ge=1,
                                      le=ASYNC_MAX_INVOCATION_TIMEOUT_S)
    #: Requests queued or in progress at once (the stream's length): past it a new
    #: request is refused with 429 instead of queued (spec.async.maxQueuedRequests).
    max_queued: int = Field(default=ASYNC_DEFAULT_MAX_QUEUED, ge=1, le=ASYNC_MAX_QUEUED)

    @model_validator(mode="after")
    def _confined(self) -> AsyncRoute:
        paths = self.input_paths or default_input_paths(self.output_path)
        object.__setattr__(self, "input_paths", [normalize_prefix(p) for p in paths])
        return self

    @property
    def keys(self) -> AsyncQueueKeys:
        return AsyncQueueKeys(queue=self.queue)


def output_location(output_path: str, inference_id: str, *, extension: str = "",
                    filename: str = "") -> str:
    """Deterministic, so a re-processed request overwrites its one output object.

    ``<output_path>[/<extension>]/<filename or InferenceId.out>``: ``extension`` and
    ``filename`` are the client's S3OutputPathExtension and Filename, already
    validated and normalised (a relative folder without ``..``; a plain name).
    """
    name = filename or f"{inference_id}.out"
    return "/".join(p for p in (output_path.rstrip("/"), extension, name) if p)


def failure_location(failure_path: str, inference_id: str, *, extension: str = "",
                     filename: str = "") -> str:
    """``<failure_path>[/<extension>]/<name>``: the output's name with ``-error`` before
    its suffix (``<InferenceId>-error.out``, or ``result-error.json`` for Filename
    ``result.json``), so output and failure never share a key even when both paths
    are the same folder."""
    if filename:
        stem, dot, suffix = filename.partition(".")
        name = f"{stem}-error{dot}{suffix}"
    else:
        name = f"{inference_id}-error.out"
    return "/".join(p for p in (failure_path.rstrip("/"), extension, name) if p)


class ServerlessRoute(_Strict):
    """What the gateway's activator needs for a serverless endpoint."""

    #: Requests in flight (held ones included) across the endpoint; more get 429.
    max_concurrency: int = Field(default=20, ge=1)
    #: Seconds a request is held while a replica starts before it answers 503.
    cold_start_timeout_s: float = Field(default=60.0, gt=0)


class ScaleRequest(_Strict):
    """Body of the activator's ``POST <scaler_url>``: a variant needs a replica now.

    The receiver (the local supervisor, or the operator's scaler on Kubernetes)
    answers 202 and starts a replica if none runs; repeating it is harmless.
    """

    endpoint: str
    variant: str
    namespace: str | None = None
    #: Requests held for the variant when it was sent.
    waiting: int = Field(default=1, ge=0)


class EndpointRoute(_Strict):
    name: str
    type: Literal["RealTime", "Async", "Serverless"] = "RealTime"
    variants: list[VariantRoute]
    max_payload_bytes: int = REALTIME_MAX_PAYLOAD_BYTES
    #: How callers authenticate (None: nobody is asked to).
    auth: AuthRoute | None = None
    #: Set exactly when ``type`` is Async.
    async_config: AsyncRoute | None = None
    #: Set exactly when ``type`` is Serverless.
    serverless: ServerlessRoute | None = None
    #: Data capture (``contract.capture``); None: nothing is captured.
    capture: CaptureRoute | None = None
    #: Shadow variants (``contract.shadow``): sampled copies, never a client's answer.
    shadows: list[ShadowRoute] = Field(default_factory=list)
    #: Mirrors between production variants (``contract.shadow``), e.g. blue to green.
    mirrors: list[MirrorRoute] = Field(default_factory=list)

    @field_validator("variants")
    @classmethod
    def _unique_variants(cls, v: list[VariantRoute]) -> list[VariantRoute]:
        names = [x.name for x in v]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate variant names: {', '.join(dupes)}")
        return v

    def variant(self, name: str) -> VariantRoute | None:
        for v in self.variants:
            if v.name == name:
                return v
        return None


class RouteTable(_Strict):
    """Everything the gateway routes, keyed by endpoint name."""

    contract_version: Literal["v1alpha1"] = CONTRACT_VERSION
    #: Monotonic revision (the Endpoint's metadata.generation on Kubernetes), so
    #: the gateway can log which revision it serves.
    revision: int = 0
    endpoints: dict[str, EndpointRoute] = Field(default_factory=dict)

    def to_json(self) -> str:
        # Defaults left out: during a staged upgrade a gateway still on the older image
        # reads tables the newer operator writes, and its strict models refuse a field
        # they do not know; written only when set, a new field breaks only the Endpoints
        # that use it, not every one.
        return self.model_dump_json(indent=2, exclude_defaults=True)

    @classmethod
    def from_json(cls, data: str | bytes) -> RouteTable:
        return cls.model_validate_json(data)

    def write_atomic(self, path: Path) -> None:
        """Replace ``path`` atomically so a polling reader never sees half a file."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".routes-", suffix=".json")
        with os.fdopen(fd, "w") as fh:
            fh.write(self.to_json())
        os.replace(tmp, path)


class S3Settings(BaseModel):
    """Object-store access shared by every role that reads s3:// URIs.

    Falls back to the standard AWS variable names so users' existing
    credentials work unchanged.
    """

    endpoint_url: str | None = None
    access_key: str | None = None
    secret_key: str | None = None
    region: str | None = None


class HttpSettings(EnvSettings):
    """The HTTP server's own bounds, shared by every role (``http_limits`` enforces them).

    Every connection and every request head has a bound in size, count and
    time, so slow or oversized clients cost a bounded amount and are closed.
    """

    env_prefix = ENV_PREFIX

    #: Answer clean inference requests inside the HTTP protocol, without ASGI
    #: (``inline_http``). False serves every request through uvicorn's ASGI
    #: path: a switch for A/B measurements, or to rule the inline path out.
    inline_http: bool = True
    #: The request line and headers together, bytes (over: 431, closed).
    http_max_header_bytes: int = Field(default=64 * 1024, ge=1024)
    #: One header (name and value), bytes (over: 431, closed).
    http_max_header_line_bytes: int = Field(default=16 * 1024, ge=256)
    #: Headers per request (over: 431, closed).
    http_max_headers: int = Field(default=100, ge=8)
    #: From a request's first byte (or the connection's opening) to the end of its
    #: headers, seconds (over: 408, closed): slow headers (slowloris) end here.
    http_header_timeout_s: float = Field(default=10.0, gt=0)
    #: Longest silence while a request body is expected, seconds (over: 408,
    #: closed): a body shorter than its Content-Length ends here.
    http_body_timeout_s: float = Field(default=10.0, gt=0)
    #: Slowest average rate a request body may arrive at, bytes per second, once
    #: twice ``http_body_timeout_s`` has passed (Apache's ``MinRate``: each byte buys
    #: ``1/rate`` seconds more; over: 408, closed): a body trickled a byte just
    #: inside every silence would otherwise hold its connection for days. 0: off.
    http_body_min_rate_bytes_s: float = Field(default=1024.0, ge=0)
    #: Idle time allowed between requests on a kept-alive connection, seconds.
    http_keepalive_timeout_s: float = Field(default=5.0, gt=0)
    #: Open connections per process; beyond it the longest-idle connection is
    #: closed, or the new one answered 503 when none is idle. None: three
    #: quarters of the open-file limit, at most 10,000.
    http_max_connections: int | None = Field(default=None, ge=1)
    #: Bytes of requests (heads and bodies) a process holds at once: received, their
    #: answer not yet sent. Past it the upload that began longest ago is answered 503
    #: and closed. None: a quarter of the process's memory limit (its cgroup's, else
    #: the machine's), at least 16 MiB.
    http_max_body_bytes_held: int | None = Field(default=None, ge=1)
    #: Time a peer may take none of its answer's bytes, seconds: past it the
    #: connection is cut (an answer nobody reads otherwise stays in memory for as long
    #: as the peer keeps the connection open, closing included).
    http_send_timeout_s: float = Field(default=30.0, gt=0)


class _RoleSettings(HttpSettings):
    host: str = "0.0.0.0"
    port: int = 8080
    #: uvicorn worker processes. One is the default: scale with replicas.
    workers: int = Field(default=1, ge=1)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    #: A second listener serving only ``GET /metrics`` (NetworkPolicies let
    #: scrapers reach it and nothing else); None: metrics on ``port`` only.
    metrics_port: int | None = Field(default=None, ge=1, le=65535)

    s3_endpoint_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("KUBEINFER_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                                      "AWS_ENDPOINT_URL"),
    )
    s3_access_key: str | None = Field(
        default=None,
        validation_alias=AliasChoices("KUBEINFER_S3_ACCESS_KEY", "AWS_ACCESS_KEY_ID"),
    )
    s3_secret_key: str | None = Field(
        default=None,
        validation_alias=AliasChoices("KUBEINFER_S3_SECRET_KEY", "AWS_SECRET_ACCESS_KEY"),
    )
    s3_region: str | None = Field(
        default=None,
        validation_alias=AliasChoices("KUBEINFER_S3_REGION", "AWS_REGION", "AWS_DEFAULT_REGION"),
    )

    def s3(self) -> S3Settings:
        return S3Settings(endpoint_url=self.s3_endpoint_url, access_key=self.s3_access_key,
                          secret_key=self.s3_secret_key, region=self.s3_region)

    def to_env(self) -> dict[str, str]:
        """Render as ``KUBEINFER_*`` environment variables (None values omitted)."""
        env: dict[str, str] = {}
        for name, value in self.model_dump(mode="json").items():
            if value is None:
                continue
            # Nested settings (the pipeline) travel as JSON, as pydantic-settings reads them.
            text = json.dumps(value) if isinstance(value, dict | list) else str(value)
            env[ENV_PREFIX + name.upper()] = text
        return env


class InferenceExecution(StrEnum):
    """How a multi-container variant runs its steps (SageMaker InferenceExecutionConfig)."""

    SERIAL = "Serial"
    DIRECT = "Direct"


class PipelineStep(_Strict):
    """One step of a multi-container variant, as the model server runs it.

    Exactly one of ``model_uri`` (a model served in-process), ``handler``
    (``module:function``, see ``kubeinfer_runtime.pipeline.handlers``) or ``url``
    (a container in the same pod speaking the SageMaker contract) is set.
    """

    name: str
    model_uri: str | None = None
    model_format: ModelFormat = ModelFormat.ONNX
    handler: str | None = None
    #: Directory put on ``sys.path`` before importing ``handler``.
    code_dir: str | None = None
    url: str | None = None

    @property
    def kind(self) -> Literal["model", "handler", "url"]:
        if self.model_uri is not None:
            return "model"
        return "handler" if self.handler is not None else "url"


class PipelineSpec(_Strict):
    """The steps of a multi-container variant (``KUBEINFER_PIPELINE``, JSON)."""

    execution: InferenceExecution = InferenceExecution.SERIAL
    steps: Annotated[list[PipelineStep], Field(min_length=1, max_length=15)]

    @field_validator("steps")
    @classmethod
    def _one_kind_each(cls, steps: list[PipelineStep]) -> list[PipelineStep]:
        for s in steps:
            if sum(x is not None for x in (s.model_uri, s.handler, s.url)) != 1:
                raise ValueError(f"step {s.name!r} must set exactly one of model_uri, handler, url")
        names = [s.name for s in steps]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate step names: {', '.join(dupes)}")
        return steps


class ModelServerSettings(_RoleSettings):
    """Settings of the model-server role (one variant).

    A variant serves one model (``model_uri``), many models from a prefix
    (``multi_model_prefix``: a multi-model endpoint) or a chain of steps
    (``pipeline``: a multi-container endpoint); exactly one is set.
    """

    #: Where the model comes from: ``file:///abs/path`` or ``s3://bucket/key``.
    model_uri: str = ""
    #: Multi-model: ``s3://bucket/prefix/`` or ``file:///dir/``; the request
    #: header ``X-Amzn-SageMaker-Target-Model`` names a model relative to it.
    multi_model_prefix: str | None = None
    #: Multi-model: in-memory budget of loaded models, bytes (measured model size).
    cache_bytes: int = Field(default=1 << 30, ge=1)
    #: Multi-model: budget of downloaded model files on local disk, bytes.
    disk_cache_bytes: int = Field(default=4 << 30, ge=1)
    #: Multi-container: the steps, as JSON in ``KUBEINFER_PIPELINE``.
    pipeline: PipelineSpec | None = None
    model_format: ModelFormat = ModelFormat.ONNX
    #: Name served under the V2 protocol (``/v2/models/{model_name}``).
    model_name: str = "model"
    #: Local directory models are downloaded into before loading.
    model_cache_dir: str = "/tmp/kubeinfer/models"
    #: Bound on one downloaded (``s3://``) model, bytes: a bigger object is refused
    #: from its announced length before a byte is written (``/ping`` says so), so a
    #: wrong or hostile URI cannot fill the node's disk. The default is above
    #: anything one object can serve (an ONNX file stops at 2 GiB, a compiled
    #: artifact unpacks to at most 8 GiB).
    max_model_bytes: int = Field(default=10 << 30, ge=1)
    #: A single model that fails to load ends the process (exit code
    #: ``LOAD_FAILED_EXIT_CODE``, the reason in ``termination_message_path``) instead of
    #: serving not-ready for ever. The operator sets it on Kubernetes: the kubelet then
    #: restarts the container with back-off (a model that appears, an S3 outage that
    #: ends, is picked up), ``kubectl describe pod`` shows why, and the scaler answers
    #: a serverless variant's held requests at once. Local mode keeps the process, whose
    #: ``/ping`` its supervisor reads.
    exit_on_load_failure: bool = False
    #: Where that reason is written (Kubernetes' default terminationMessagePath).
    termination_message_path: str = "/dev/termination-log"
    endpoint_name: str = ""
    variant_name: str = ""
    max_payload_bytes: int = REALTIME_MAX_PAYLOAD_BYTES
    #: Bound on what one request may decode to (elements x item size, inflated
    #: .npz members, parsed JSON/CSV values), bytes. None: 4 x max_payload_bytes.
    #: Over it the request is refused with 413 before anything that size is allocated.
    max_decoded_bytes: int | None = Field(default=None, ge=1)
    #: Serve the model-management routes that change what is loaded (multi-model
    #: ``POST/DELETE /models``, V2 repository load/unload). Off by default: any
    #: caller that reaches a model server could otherwise load and unload models.
    admin_api: bool = False
    #: Threads running inference; onnxruntime releases the GIL while it runs.
    inference_threads: int = Field(default=1, ge=1)
    #: Threads inside one onnxruntime session (intra-op). 1 suits small models
    #: behind many replicas; raise for big models.
    intra_op_threads: int = Field(default=1, ge=1)
    #: Relative ``file://models/x.onnx`` URIs resolve against this directory
    #: (where the runtime image bakes its example models).
    model_base_dir: str = "/srv/kubeinfer"
    #: Where predict runs: ``inline`` on the event loop (fastest for µs models),
    #: ``thread`` in the inference thread pool (slow models must not block the
    #: loop), ``auto`` picks by the warm-up latency measured at load.
    inference_mode: Literal["auto", "inline", "thread"] = "auto"

    @model_validator(mode="after")
    def _one_source(self) -> ModelServerSettings:
        given = [bool(self.model_uri), self.multi_model_prefix is not None,
                 self.pipeline is not None]
        if sum(given) != 1:
            raise ValueError(
                "set exactly one of KUBEINFER_MODEL_URI (one model), "
                "KUBEINFER_MULTI_MODEL_PREFIX (multi-model) or KUBEINFER_PIPELINE "
                "(multi-container)")
        return self


class GatewaySettings(_RoleSettings):
    """Settings of the gateway role (SageMaker Runtime API front door)."""

    model_config = ConfigDict(defer_build=True)  # _Strict says why

    #: Path of the route-table JSON (a mounted ConfigMap on Kubernetes).
    route_table_path: str = "/etc/kubeinfer/" + ROUTE_TABLE_FILENAME
    #: How often the route-table file is checked for changes, seconds.
    route_reload_interval_s: float = Field(default=1.0, gt=0)
    #: How often upstream model servers are health-checked, seconds.
    health_interval_s: float = Field(default=1.0, gt=0)
    #: Upstream request timeout (SageMaker: 60 s for real-time).
    upstream_timeout_s: float = Field(default=60.0, gt=0)
    #: Keep-alive connections per upstream.
    upstream_pool_size: int = Field(default=100, ge=1)
    #: Longest answer read from a model server, bytes (four times SageMaker's 6 MB
    #: payload); past it the connection is closed and the client gets a 424 ModelError.
    #: A shadow's or mirror's answer is read up to twice production's answer to the same
    #: request (at least 1 MiB), within this bound; past it the copy failed.
    max_response_bytes: int = Field(default=4 * REALTIME_MAX_PAYLOAD_BYTES, ge=1024)
    #: Redis of asynchronous endpoints (``redis://host:6379/0``); None when the
    #: gateway serves none (async requests then answer 503).
    redis_url: str | None = None
    #: Where the activator POSTs a ``ScaleRequest`` when a serverless variant has
    #: no ready replica (the local supervisor's or the operator's scaler). None:
    #: held requests wait for the idle scaler to notice them on its own.
    scaler_url: str | None = None
    #: Namespace of the gateway's Endpoint, sent with scale requests (Kubernetes).
    namespace: str | None = None
    #: Admission of real-time variants (``gateway.shedding``): as many requests in
    #: flight as the model servers finish within ``admission_target_latency_s`` (at
    #: least ``admission_floor_per_upstream`` per ready model server), a line of
    #: waiting requests bounded in time, count per model server and body bytes;
    #: beyond them, 429 at once. False: everything is forwarded.
    admission: bool = True
    admission_target_latency_s: float = Field(default=0.5, gt=0)
    admission_floor_per_upstream: int = Field(default=8, ge=1)
    admission_max_wait_s: float = Field(default=1.0, ge=0)
    admission_queue_per_upstream: int = Field(default=256, ge=0)
    admission_max_queue_bytes: int = Field(default=64 << 20, ge=0)
    #: Bearer token of scale requests: the scaler honours them only for Endpoints
    #: of the namespace the token was issued for (the operator's runtime Secret, or
    #: the local supervisor).
    scaler_token: SecretStr | None = None
    #: Data capture (``gateway.capture``): captured records held in memory at most, bytes,
    #: across endpoints; past it (a slow or unreachable store) the oldest are dropped and
    #: counted. Uploads go in objects of up to ``capture_batch_bytes``, at least every
    #: ``capture_flush_interval_s``; on shutdown what is left gets
    #: ``capture_shutdown_timeout_s`` to be written.
    capture_buffer_bytes: int = Field(default=32 << 20, ge=1024)
    capture_batch_bytes: int = Field(default=4 << 20, ge=1024)
    capture_flush_interval_s: float = Field(default=10.0, gt=0)
    capture_shutdown_timeout_s: float = Field(default=10.0, ge=0)

    _redis_url_readable = field_validator("redis_url")(readable_redis_url)


class AsyncWorkerSettings(ModelServerSettings):
    """Settings of the async-worker role: the model server's, plus its queue.

    The worker still listens on ``host:port`` for ``/ping`` and ``/metrics``.
    """

    model_config = ConfigDict(defer_build=True)  # _Strict says why

    redis_url: str
    _redis_url_readable = field_validator("redis_url")(readable_redis_url)
    #: The endpoint's queue (``AsyncQueueKeys.queue``).
    queue: str
    output_path: str
    failure_path: str
    #: Webhooks POSTed a JSON notification per request (SageMaker's SNS topics).
    success_url: str | None = None
    error_url: str | None = None
    #: Requests one worker processes at once (maxConcurrentInvocationsPerInstance).
    max_concurrency: int = Field(default=4, ge=1, le=1000)
    #: Processing attempts after the first before a request is dead-lettered.
    max_retries: int = Field(default=3, ge=0, le=100)
    #: A request pending this long on a worker that stopped acking is reclaimed.
    visibility_timeout_s: float = Field(default=30.0, gt=0)
    #: Default per-request timeout when the client sent none.
    invocation_timeout_s: float = Field(default=ASYNC_DEFAULT_INVOCATION_TIMEOUT_S, gt=0)
    #: Notification delivery: attempts and the first backoff (doubles each time).
    notify_attempts: int = Field(default=8, ge=1)
    notify_backoff_s: float = Field(default=0.2, gt=0)
    #: Seconds in-flight requests may finish after SIGTERM before being released.
    drain_timeout_s: float = Field(default=20.0, ge=0)
    #: Prefixes (s3://bucket/prefix/ or file:///dir/) inputs may be read from,
    #: comma-separated; the worker refuses any other InputLocation it dequeues.
    input_paths: str = ""
    #: The outputPath/failurePath pairs the endpoint had before, each writable until its
    #: ``until`` (``contract.async_paths``, JSON): requests accepted under them are still
    #: written where their callers look.
    former_paths: str = ""
    #: Largest input object read, bytes (SageMaker: 1 GB); bigger inputs fail.
    max_input_bytes: int = Field(default=1 << 30, ge=1)
    #: Outbound calls (notification webhooks) may reach these otherwise refused
    #: addresses: comma-separated CIDRs or host names (``contract.outbound``).
    outbound_allow: str = ""
    #: Transient failures (object store or Redis unreachable, a 5xx from S3) are
    #: retried with exponential backoff and jitter, from ``transient_backoff_s`` up
    #: to ``transient_backoff_max_s``, without using up ``max_retries``, until a
    #: request has spent this long failing that way; then they count as attempts.
    transient_budget_s: float = Field(default=600.0, ge=0)
    transient_backoff_s: float = Field(default=1.0, gt=0)
    transient_backoff_max_s: float = Field(default=30.0, gt=0)
    #: Seconds every inference thread may be held by model calls past their timeout
    #: (calls that cannot be interrupted) before ``/v2/health/live`` fails, so the
    #: worker is restarted. None: max(60, 2 x ``invocation_timeout_s``).
    held_threads_liveness_s: float | None = Field(default=None, gt=0)
