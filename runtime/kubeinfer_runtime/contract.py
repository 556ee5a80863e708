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
"""

from __future__ import annotations

import os
import tempfile
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

CONTRACT_VERSION: Literal["v1alpha1"] = "v1alpha1"
ENV_PREFIX = "KUBEINFER_"

#: SageMaker's synchronous payload limit (InvokeEndpoint): 6 MB.
REALTIME_MAX_PAYLOAD_BYTES = 6 * 1024 * 1024

#: Header names of the SageMaker Runtime API (lower case, as ASGI gives them).
H_TARGET_VARIANT = "x-amzn-sagemaker-target-variant"
H_INVOKED_VARIANT = "x-amzn-invoked-production-variant"
H_CUSTOM_ATTRIBUTES = "x-amzn-sagemaker-custom-attributes"
H_INFERENCE_ID = "x-amzn-sagemaker-inference-id"
H_TARGET_MODEL = "x-amzn-sagemaker-target-model"
H_TARGET_CONTAINER = "x-amzn-sagemaker-target-container-hostname"
H_ERROR_TYPE = "x-amzn-errortype"

#: Headers the gateway forwards from the client to the model server.
FORWARDED_REQUEST_HEADERS = (
    "content-type",
    "accept",
    H_CUSTOM_ATTRIBUTES,
    H_INFERENCE_ID,
    H_TARGET_MODEL,
    H_TARGET_CONTAINER,
)


class Role(StrEnum):
    """The roles one runtime image can play (``kubeinfer-runtime serve --role``)."""

    MODEL_SERVER = "model-server"
    GATEWAY = "gateway"


class ModelFormat(StrEnum):
    ONNX = "onnx"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class VariantRoute(_Strict):
    """One production variant as the gateway sees it."""

    name: str
    weight: Annotated[float, Field(ge=0)]
    #: Base URLs of the variant's model servers (``http://host:port``). On
    #: Kubernetes this is the variant Service (kube-proxy balances pods); in local
    #: mode one URL per replica process and the gateway balances itself.
    upstreams: list[str] = Field(default_factory=list)


class EndpointRoute(_Strict):
    name: str
    type: Literal["RealTime"] = "RealTime"
    variants: list[VariantRoute]
    max_payload_bytes: int = REALTIME_MAX_PAYLOAD_BYTES

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
        return self.model_dump_json(indent=2)

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


#: Name of the route-table file inside the ConfigMap / local state directory.
ROUTE_TABLE_FILENAME = "routes.json"


class S3Settings(BaseModel):
    """Object-store access shared by every role that reads s3:// URIs.

    Falls back to the standard AWS variable names so users' existing
    credentials work unchanged.
    """

    endpoint_url: str | None = None
    access_key: str | None = None
    secret_key: str | None = None
    region: str | None = None


class _RoleSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    host: str = "0.0.0.0"
    port: int = 8080
    #: uvicorn worker processes. One is the default: scale with replicas.
    workers: int = Field(default=1, ge=1)
    log_level: Literal["debug", "info", "warning", "error"] = "info"

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
        for name, value in self.model_dump().items():
            if value is None:
                continue
            env[ENV_PREFIX + name.upper()] = str(value)
        return env


class ModelServerSettings(_RoleSettings):
    """Settings of the model-server role (one model, one variant)."""

    #: Where the model comes from: ``file:///abs/path`` or ``s3://bucket/key``.
    model_uri: str
    model_format: ModelFormat = ModelFormat.ONNX
    #: Name served under the V2 protocol (``/v2/models/{model_name}``).
    model_name: str = "model"
    #: Local directory models are downloaded into before loading.
    model_cache_dir: str = "/tmp/kubeinfer/models"
    endpoint_name: str = ""
    variant_name: str = ""
    max_payload_bytes: int = REALTIME_MAX_PAYLOAD_BYTES
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


class GatewaySettings(_RoleSettings):
    """Settings of the gateway role (SageMaker Runtime API front door)."""

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
