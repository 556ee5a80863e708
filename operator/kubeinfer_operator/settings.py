"""Settings of the operator process (pydantic-settings, env prefix ``KUBEINFER_``).

The Helm chart sets these as env vars on the operator Deployment; every field is
documented in charts/kubeinfer/values.yaml too.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from kubeinfer_operator.api.placement import validated as validated_pod_template
from kubeinfer_operator.reconcile.promql_scope import DEFAULT_PROMQL_NAMESPACE_LABEL
from kubeinfer_operator.render import redis_users
from kubeinfer_runtime.contract.auth import AuthMode
from kubeinfer_runtime.contract.outbound import OutboundPolicy
from kubeinfer_runtime.contract.redact import readable_redis_url


class OperatorSettings(BaseSettings):
    # hide_input_in_errors: a ValidationError's text would quote the input (for a model
    # validator the whole env dict: the Redis URL's password, the caller secret key) into
    # the operator's crash log.
    model_config = SettingsConfigDict(env_prefix="KUBEINFER_", extra="ignore",
                                      hide_input_in_errors=True)

    #: Namespaces to watch, comma-separated; empty means cluster-wide.
    namespaces: Annotated[list[str], NoDecode] = Field(default_factory=list)
    #: Image of the runtime (model server + gateway roles).
    runtime_image: str = "ghcr.io/kubeinfer/runtime:0.1.0"
    #: Image of the compile step (CompilationJobs, a variant's ``model.compile`` init
    #: container): the runtime image plus the C compiler TVM links models with, kept
    #: out of the serving image (Dockerfile target ``compiler``).
    compiler_image: str = "ghcr.io/kubeinfer/compiler:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    #: Replicas of each Endpoint's gateway Deployment.
    gateway_replicas: int = Field(default=1, ge=1)
    #: Resources applied to model servers that set none.
    default_cpu_request: str = "100m"
    default_memory_request: str = "256Mi"
    default_memory_limit: str = "1Gi"
    #: kopf peering object name (two operator replicas never both act).
    peering_name: str = "kubeinfer"
    #: How often the scaler evaluates each scaled Endpoint (scrapes its gateways, reads
    #: its queue), seconds. Deployment changes reach status through a watch, not this.
    status_interval_s: float = Field(default=10.0, gt=0)
    #: The safety net: every Endpoint is fully reconciled this often even when no event
    #: came (a missed watch event, a Service or ConfigMap edited by hand), seconds.
    resync_interval_s: float = Field(default=300.0, gt=0)
    #: Port every runtime container listens on.
    runtime_port: int = 8080
    #: Secret holding s3 credentials (keys AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY),
    #: mounted into model servers when set; with AWS_ENDPOINT_URL for non-AWS stores.
    s3_secret_name: str | None = None
    #: Redis of async endpoints (``redis://host:6379/0``): their gateways and
    #: workers get it as KUBEINFER_REDIS_URL, the operator reads the backlog there.
    redis_url: str | None = None
    #: Give each namespace its own Redis user (``ACL SETUSER``, ``render.redis_users``)
    #: confined to its own queues' keys, and put that user's URL in the namespace's
    #: runtime Secret. False: every namespace gets ``redis_url`` itself (one trust domain).
    redis_acl: bool = True
    #: Seconds after which a namespace's Redis user is set again (a restarted Redis
    #: forgets users set with ACL SETUSER).
    redis_acl_recheck_s: float = Field(default=60.0, gt=0)

    #: How callers authenticate to gateways of Endpoints whose spec.auth names no mode.
    default_auth_mode: AuthMode = AuthMode.NONE
    #: The default caller credentials (the chart generates them into a Secret and
    #: passes them here with secretKeyRef). Each namespace's runtime Secret, which
    #: gateways of Endpoints without auth.secretName mount, holds a pair and a token
    #: derived from them for that namespace (``k8s_secrets.caller_key_pair``): both
    #: the id and the secret of the pair come from ``caller_secret_access_key``, so
    #: ``caller_access_key_id`` only says a pair is configured (the chart's id is
    #: never a caller's).
    caller_access_key_id: SecretStr | None = None
    caller_secret_access_key: SecretStr | None = None
    caller_token: SecretStr | None = None
    #: Key the per-namespace scaler tokens are derived from (HMAC); gateways
    #: present their namespace's token on POST /scale. None: a random key per
    #: operator process (tokens then change when it restarts).
    scaler_signing_key: SecretStr | None = None
    #: Name of the Secret the operator keeps in each namespace with Endpoints:
    #: Redis URL, scaler token, default caller credentials. Pods read it through
    #: secretKeyRef and Secret volumes; it never appears in a literal env value.
    runtime_secret_name: str = "kubeinfer-runtime"
    #: Render NetworkPolicies: model servers accept traffic only from their
    #: Endpoint's gateway pods (and metrics scrapers on the metrics port).
    network_policy: bool = False
    #: NetworkPolicyPeers (JSON list) allowed to the runtime pods' metrics port;
    #: empty: any source (metrics carry no secret; Prometheus convention).
    metrics_from: list[dict[str, Any]] = Field(default_factory=list)
    #: Port of the runtime pods' metrics-only listener (GET /metrics).
    metrics_port: int = Field(default=9090, ge=1, le=65535)

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
    #: Outbound URLs of Endpoints (notification webhooks, autoscaling.prometheusUrl)
    #: may point at these otherwise refused addresses (link-local/metadata, the
    #: API server): comma-separated CIDRs or host names (``contract.outbound``).
    outbound_allow: str = ""
    #: The label every selector of an Endpoint's PromQL (autoscaling Custom queries,
    #: promQL alarms) must pin to the Endpoint's namespace, so a tenant reads only its
    #: own series from a shared Prometheus (``reconcile.promql_scope``); empty: not
    #: checked (a single-tenant cluster, or a Prometheus per tenant).
    promql_namespace_label: str = Field(default=DEFAULT_PROMQL_NAMESPACE_LABEL,
                                        pattern=r"^([a-zA-Z_][a-zA-Z0-9_]*)?$")
    #: Annotation/label prefix kopf keeps its handler progress under.
    kopf_state_prefix: str = "kubeinfer.io"
    #: Port of the operator's own Prometheus listener (``GET /metrics``: reconciles by
    #: kind and result, durations, scale decisions, pending scale requests); None: off.
    operator_metrics_port: int | None = Field(default=None, ge=1, le=65535)
    #: Placement and identity applied to every gateway and model-server pod (JSON of a
    #: ``podTemplate`` block: nodeSelector, tolerations, affinity,
    #: topologySpreadConstraints, priorityClassName, serviceAccountName,
    #: imagePullSecrets, labels, annotations). An Endpoint's own podTemplate wins field
    #: by field (the chart's ``runtime.podTemplate``).
    default_pod_template: dict[str, Any] = Field(default_factory=dict)
    #: Endpoints whose Deployments roll to a new runtime image at the same time (an
    #: operator upgrade); the others wait until one finishes. 0: no limit.
    max_concurrent_upgrades: int = Field(default=3, ge=0)
    #: kopf peering priority of this replica. With several operator replicas the one
    #: of highest priority acts and the others stand by; None: a random priority
    #: per process, so replicas never tie (kopf pauses every replica of a tie).
    peering_priority: int | None = Field(default=None, ge=0)
    #: Seconds a replica's peering heartbeat stays valid: a standby takes over this long
    #: after the active replica died without saying goodbye (a clean stop hands over
    #: at once). kopf renews it every 1-5 s at 10.
    peering_lifetime_s: int = Field(default=10, ge=5, le=300)

    @field_validator("namespaces", mode="before")
    @classmethod
    def _split(cls, v: object) -> object:
        if isinstance(v, str):
            return [n.strip() for n in v.split(",") if n.strip()]
        return v

    @model_validator(mode="after")
    def _distinct_ports(self) -> OperatorSettings:
        if self.metrics_port == self.runtime_port:
            raise ValueError(f"metrics_port and runtime_port are both {self.runtime_port}: "
                             "give the metrics listener its own port")
        return self

    _redis_url_readable = field_validator("redis_url")(readable_redis_url)

    @model_validator(mode="after")
    def _redis_url_takes_users(self) -> OperatorSettings:
        if self.redis_url and self.redis_acl:
            try:
                redis_users.namespace_url(self.redis_url, "check")
            except redis_users.RedisUrlError as exc:
                raise ValueError(f"KUBEINFER_REDIS_URL: {exc} (or set KUBEINFER_REDIS_ACL "
                                 "false)") from None
        return self

    @field_validator("outbound_allow")
    @classmethod
    def _allow_list_parses(cls, v: str) -> str:
        OutboundPolicy.parse(v, env={})  # ValueError naming the bad entry, at startup
        return v

    @field_validator("default_pod_template")
    @classmethod
    def _pod_template_valid(cls, v: dict[str, Any]) -> dict[str, Any]:
        # At startup, as the CRD checks an Endpoint's: syntax, reserved label keys. Not the
        # tenants' deny-list: the administrator may, e.g., turn on mesh injection for all.
        return validated_pod_template(v, "KUBEINFER_DEFAULT_POD_TEMPLATE", trusted=True)

    def outbound_policy(self) -> OutboundPolicy:
        """The outbound policy of the operator's own calls and of its admission checks."""
        return OutboundPolicy.parse(self.outbound_allow)
