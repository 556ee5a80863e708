"""Settings of the operator process (pydantic-settings, env prefix ``KUBEINFER_``).

The Helm chart sets these as env vars on the operator Deployment; every field is
documented in charts/kubeinfer/values.yaml too.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class OperatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KUBEINFER_", extra="ignore")

    #: Namespaces to watch, comma-separated; empty means cluster-wide.
    namespaces: Annotated[list[str], NoDecode] = Field(default_factory=list)
    #: Image of the runtime (model server + gateway roles).
    runtime_image: str = "ghcr.io/kubeinfer/runtime:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    #: Replicas of each Endpoint's gateway Deployment.
    gateway_replicas: int = Field(default=1, ge=1)
    #: Resources applied to model servers that set none.
    default_cpu_request: str = "100m"
    default_memory_request: str = "256Mi"
    default_memory_limit: str = "1Gi"
    #: kopf peering object name (two operator replicas never both act).
    peering_name: str = "kubeinfer"
    #: How often actual state (Deployment availability) is re-checked, seconds.
    status_interval_s: float = Field(default=10.0, gt=0)
    #: Port every runtime container listens on.
    runtime_port: int = 8080
    #: Secret holding s3 credentials (keys AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY),
    #: mounted into model servers when set; with AWS_ENDPOINT_URL for non-AWS stores.
    s3_secret_name: str | None = None
    #: Redis of async endpoints (``redis://host:6379/0``): their gateways and
    #: workers get it as KUBEINFER_REDIS_URL, the operator reads the backlog there.
    redis_url: str | None = None

    #: kopf's liveness probe URL (``http://0.0.0.0:8080/healthz``); None disables it.
    liveness_endpoint: str | None = None
    #: Run without peering (a single replica, e.g. in tests). With peering, the
    #: KopfPeering/ClusterKopfPeering object ``peering_name`` must exist.
    standalone: bool = False
    #: uid/gid the runtime containers run as (the image's non-root user).
    runtime_uid: int = Field(default=65532, ge=1)
    #: Resources of each Endpoint's gateway container.
    gateway_cpu_request: str = "100m"
    gateway_memory_request: str = "128Mi"
    gateway_memory_limit: str = "512Mi"
    #: Port of the operator's scaler (``POST /scale`` from gateways holding requests
    #: for a serverless variant with no replica); None: no scaler server.
    scaler_port: int | None = Field(default=None, ge=1, le=65535)
    #: URL gateways POST scale requests to (the chart's scaler Service), e.g.
    #: ``http://kubeinfer-scaler.kubeinfer-system.svc:8090/scale``.
    scaler_url: str | None = None
    #: Annotation/label prefix kopf keeps its handler progress under.
    kopf_state_prefix: str = "kubeinfer.io"

    @field_validator("namespaces", mode="before")
    @classmethod
    def _split(cls, v: object) -> object:
        if isinstance(v, str):
            return [n.strip() for n in v.split(",") if n.strip()]
        return v
