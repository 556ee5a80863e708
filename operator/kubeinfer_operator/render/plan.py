"""The deployment plan of an Endpoint: PURE, no I/O.

One Endpoint spec becomes one ``EndpointPlan``: the gateway, one model-server
group per variant (replicas, settings, resources) and the route table. Both
backends consume the same plan — ``render/`` turns it into Kubernetes manifests,
``local/`` into processes — so a resource behaves the same on a laptop and on a
cluster.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from typing import Any, Literal
from urllib.parse import urlparse

from kubeinfer_operator.api.data_capture import DataCapture
from kubeinfer_operator.api.endpoint import (
    AuthConfig,
    AutoScaling,
    ContainerStep,
    Endpoint,
    EndpointType,
    InferenceExecution,
    ModelSource,
    ProductionVariant,
    ServerlessConfig,
    VariantFleet,
)
from kubeinfer_operator.api.env_policy import operator_wins
from kubeinfer_operator.reconcile import autoscale
from kubeinfer_operator.reconcile.rollout import fleet_names
from kubeinfer_operator.render.async_plan import AsyncPlan, plan_async
from kubeinfer_operator.render.plan_steps import (
    FIRST_IMAGE_PORT,
    MultiModelPlan,
    StepPlan,
    describe_steps,
    pipeline_env,
)
from kubeinfer_runtime.contract import (
    REALTIME_MAX_PAYLOAD_BYTES,
    SERVERLESS_MAX_PAYLOAD_BYTES,
    EndpointRoute,
    ModelFormat,
    RouteTable,
    ServerlessRoute,
    VariantRoute,
)
from kubeinfer_runtime.contract.auth import AuthRoute
from kubeinfer_runtime.contract.capture import CaptureRoute
from kubeinfer_runtime.contract.shadow import MirrorRoute, ShadowRoute


@dataclass(frozen=True)
class VariantCompile:
    """A variant's ``model.compile``: the compiler's settings for its ONNX model.

    Where the artifact goes is each backend's choice (an emptyDir of the pod on
    Kubernetes, the local artifact cache in local mode), so it is not here.
    """

    #: ``CompileSettings`` values: model_uri, target, batch sizes, tuning, quantization.
    values: tuple[tuple[str, Any], ...]
    #: ``model.compile.cacheUri``: the artifact cache shared by replicas (None: none).
    cache_uri: str | None = None

    def settings(self) -> dict[str, Any]:
        return dict(self.values)


def variant_compile(source: ModelSource, env: dict[str, str],
                    base_dir: str | None) -> VariantCompile | None:
    """The compile step of a variant's model (None: it has no ``compile``)."""
    options = source.compile
    if options is None:
        return None
    values: dict[str, Any] = {
        "model_uri": resolve_file_uri(source.uri, base_dir),
        "target": options.target.value,
        "tuning_budget_s": options.tuning.budgetSeconds,
        "allow_quantization": options.quantization.allowed,
        "min_top1_agreement": options.quantization.minTop1Agreement,
        # Measured with the threads the model server will use.
        "threads": int(env.get("KUBEINFER_INTRA_OP_THREADS", "1") or 1),
    }
    if options.batchSizes is not None:
        values["batch_sizes"] = list(options.batchSizes)
    if options.tuning.trials is not None:
        values["tuning_trials"] = options.tuning.trials
    if options.quantization.calibrationUri is not None:
        values["calibration_uri"] = resolve_file_uri(options.quantization.calibrationUri,
                                                     base_dir)
    cache = resolve_file_uri(options.cacheUri, base_dir) if options.cacheUri else None
    return VariantCompile(values=tuple(sorted((k, tuple(v) if isinstance(v, list) else v)
                                              for k, v in values.items())), cache_uri=cache)


#: Every name ``VariantPlan.server_env`` renders, over all variant kinds (one model,
#: multi-model, containers): the spec's env may not set them (``api.env_policy``).
SERVER_ENV = frozenset({
    "KUBEINFER_MODEL_URI", "KUBEINFER_MULTI_MODEL_PREFIX", "KUBEINFER_CACHE_BYTES",
    "KUBEINFER_DISK_CACHE_BYTES", "KUBEINFER_PIPELINE", "KUBEINFER_MODEL_FORMAT",
    "KUBEINFER_MODEL_NAME", "KUBEINFER_ENDPOINT_NAME", "KUBEINFER_VARIANT_NAME",
})


@dataclass(frozen=True)
class VariantPlan:
    """One production variant: a group of identical model-server replicas."""

    name: str
    weight: float
    replicas: int
    model_uri: str
    model_format: ModelFormat
    #: Extra env from the spec, in order.
    env: tuple[tuple[str, str], ...] = ()
    requests: tuple[tuple[str, str], ...] = ()
    limits: tuple[tuple[str, str], ...] = ()
    #: Multi-model variant: the cache settings (``model_uri`` is then the prefix).
    multi_model: MultiModelPlan | None = None
    #: Multi-container variant: its steps and how they run (``model_uri`` then
    #: only describes them).
    steps: tuple[StepPlan, ...] = ()
    execution: str = "Serial"
    #: Auto scaling policy (None: replicas stay as set). Not part of
    #: ``server_hash``: changing a policy never restarts a model server.
    autoscaling: autoscale.Policy | None = None
    #: Gateway admission overrides (None: the gateway's defaults); not in ``server_hash``.
    max_in_flight_per_replica: int | None = None
    max_queue_wait_s: float | None = None
    #: ``model.compile``: compiled before it is served (``model_uri`` is then the source).
    compile: VariantCompile | None = None
    #: ``podTemplate`` as written (placement and identity; Kubernetes only, merged over
    #: the operator's default when rendered). Not in ``server_hash``.
    pod_template: dict[str, Any] = field(default_factory=dict, hash=False)
    #: One fleet of a guarded rollout (``render.rollout.expand_plan``): the production
    #: variant it serves, as clients see it (``name`` is then the fleet's slot). Not in
    #: ``server_hash``.
    production_variant: str | None = None
    #: A shadow variant (``spec.shadowVariants``): the share of answered production
    #: requests copied to it (None: a production variant). Shadows are never in the
    #: route's weights, and never scaled (``replicas`` as written). Not in ``server_hash``.
    shadow_sampling: float | None = None
    #: Shadows only: how long the gateway waits for the shadow's answer to a copy.
    shadow_timeout_s: float = 10.0

    @property
    def server_hash(self) -> str:
        """Changes exactly when the model servers must be restarted (rolled).

        Weight and replica count are not part of it: changing them must never
        restart a model server.
        """
        payload = json.dumps(
            [self.model_uri, self.model_format.value, self.env, self.requests, self.limits]
            # Appended only when set, so single-model hashes (and pods) stay unchanged.
            + ([repr(self.multi_model)] if self.multi_model else [])
            + ([repr(self.steps), self.execution] if self.steps else [])
            + ([repr(self.compile)] if self.compile else [])
            + ([[(s.requests, s.limits) for s in self.steps]]
               if any(s.requests or s.limits for s in self.steps) else [])
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def server_env(self, endpoint_name: str) -> dict[str, str]:
        """``KUBEINFER_*`` env of this variant's model server (port excluded), the spec's env
        added after the operator's and never over it."""
        if self.multi_model is not None:
            source = self.multi_model.env()
        elif self.steps:
            source = pipeline_env(self.steps, self.execution)
        else:
            source = {"KUBEINFER_MODEL_URI": self.model_uri}
        env = {
            **source,
            "KUBEINFER_MODEL_FORMAT": self.model_format.value,
            "KUBEINFER_MODEL_NAME": self.name,
            "KUBEINFER_ENDPOINT_NAME": endpoint_name,
            "KUBEINFER_VARIANT_NAME": self.name,
        }
        return operator_wins(env, dict(self.env))


@dataclass(frozen=True)
class EndpointPlan:
    name: str
    namespace: str | None
    generation: int
    variants: tuple[VariantPlan, ...] = field(default_factory=tuple)
    type: str = "RealTime"
    #: Serverless endpoints only.
    serverless: ServerlessConfig | None = None
    #: ``spec.deploymentConfig`` is set: a variant may be served by two fleets (routes
    #: ``v`` and ``v-green``, ``reconcile.rollout``), and its scaling holds while it rolls.
    guarded: bool = False
    #: Async endpoints only: queue, workers, backlog scaling.
    async_config: AsyncPlan | None = None
    #: The async queue's Redis as the gateway reaches it (None: its own setting).
    redis_url: str | None = None
    #: ``spec.auth`` as written (None: the backend's default); each backend
    #: resolves it into the route table's ``AuthRoute`` (where credentials live).
    auth: AuthConfig | None = None
    #: ``spec.gateway.podTemplate`` as written (Kubernetes only).
    gateway_pod_template: dict[str, Any] = field(default_factory=dict, hash=False)
    #: ``spec.dataCapture`` as the gateway gets it (None: off); file:// resolved.
    capture: CaptureRoute | None = None
    #: ``spec.dataCapture.destination`` as written ("" without dataCapture).
    capture_destination: str = ""
    #: Copies of one production route's requests to another (a guarded rollout's blue and
    #: green fleets while a ``disagreement`` alarm bakes: ``render.rollout.expand_plan``).
    mirrors: tuple[MirrorRoute, ...] = ()

    @property
    def serverless_policy(self) -> autoscale.Serverless | None:
        """The scale-to-zero settings the scalers apply (None: not serverless)."""
        if self.serverless is None:
            return None
        return autoscale.Serverless(provisioned=self.serverless.provisionedConcurrency,
                                    idle_timeout_s=self.serverless.idleTimeout)

    def variant(self, name: str) -> VariantPlan | None:
        return next((v for v in self.variants if v.name == name), None)

    def routes_of(self, variant: VariantPlan) -> tuple[str, ...]:
        """The gateway routes (and metric series) that serve ``variant``: both fleet slots
        of a guarded endpoint's production variant (one of them, at rest), else itself."""
        if self.guarded and variant.shadow_sampling is None:
            return fleet_names(variant.name)
        return (variant.name,)

    def scales_to_zero(self, variant: VariantPlan) -> bool:
        """Whether the serverless policy scales ``variant``: every production variant of
        a Serverless endpoint; never a shadow (its copies are not held for a cold start,
        so it keeps its replicas, or its own autoscaling with minReplicas 1 or more)."""
        return self.serverless is not None and variant.shadow_sampling is None

    def field_path(self, name: str) -> str:
        """Where variant ``name`` is written in the spec: ``spec.variants[i]`` or
        ``spec.shadowVariants[j]`` (the plan lists shadows after the variants)."""
        shadows = [v.name for v in self.variants if v.shadow_sampling is not None]
        if name in shadows:
            return f"spec.shadowVariants[{shadows.index(name)}]"
        production = [v.name for v in self.variants if v.shadow_sampling is None]
        return f"spec.variants[{production.index(name)}]"

    def route_table(self, upstreams: dict[str, list[str]],
                    discovery: Literal["static", "dns"] = "static",
                    auth: AuthRoute | None = None) -> RouteTable:
        """The gateway's route table, given each variant's upstream URLs.

        A variant missing from ``upstreams`` gets no URLs: the gateway answers
        503 for it (never routes to something that is not there). ``dns``: the
        URLs name headless Services the gateway resolves to pods (Kubernetes).
        """
        serverless = None
        if self.serverless is not None:
            serverless = ServerlessRoute(max_concurrency=self.serverless.maxConcurrency,
                                         cold_start_timeout_s=self.serverless.coldStartTimeout)
        route = EndpointRoute(
            name=self.name,
            variants=[
                VariantRoute(name=v.name, weight=v.weight,
                             upstreams=list(upstreams.get(v.name, [])), discovery=discovery,
                             max_in_flight_per_upstream=v.max_in_flight_per_replica,
                             max_queue_wait_s=v.max_queue_wait_s,
                             production_variant=v.production_variant)
                for v in self.variants if v.shadow_sampling is None
            ],
            shadows=[ShadowRoute(name=v.name, sampling_percentage=v.shadow_sampling,
                                 timeout_s=v.shadow_timeout_s,
                                 upstreams=list(upstreams.get(v.name, [])), discovery=discovery,
                                 revision=v.server_hash)
                     for v in self.variants if v.shadow_sampling is not None],
            mirrors=list(self.mirrors),
            **({"type": "Serverless", "serverless": serverless,
                "max_payload_bytes": SERVERLESS_MAX_PAYLOAD_BYTES} if serverless else
               {"max_payload_bytes": REALTIME_MAX_PAYLOAD_BYTES}),
            auth=auth,
            capture=self.capture,
        )
        if self.async_config is not None:
            route = route.model_copy(update={
                "type": "Async", "async_config": self.async_config.route(self.redis_url)})
        return RouteTable(revision=self.generation, endpoints={self.name: route})


def resolve_file_uri(uri: str, base_dir: str | None) -> str:
    """Make ``file://relative/path`` absolute against ``base_dir`` (local mode only)."""
    parsed = urlparse(uri)
    if parsed.scheme != "file" or base_dir is None:
        return uri
    path = parsed.netloc + parsed.path
    if path.startswith("/"):
        return "file://" + path
    return "file://" + str(_PurePath(base_dir) / path)


class _PurePath:
    """Tiny posix join so this module stays free of filesystem calls."""

    def __init__(self, base: str) -> None:
        self.base = base.rstrip("/")

    def __truediv__(self, other: str) -> str:
        parts: list[str] = [p for p in self.base.split("/") if p]
        for piece in other.split("/"):
            if piece in ("", "."):
                continue
            if piece == "..":
                if parts:
                    parts.pop()
            else:
                parts.append(piece)
        return "/" + "/".join(parts)


def _step_plan(index: int, c: ContainerStep, base_dir: str | None) -> StepPlan:
    return StepPlan(
        name=c.name,
        kind=c.kind,
        model_uri=resolve_file_uri(c.model.uri, base_dir) if c.model else None,
        model_format=ModelFormat(c.model.format.value) if c.model else ModelFormat.ONNX,
        handler=c.handler,
        code_uri=resolve_file_uri(c.codeUri, base_dir) if c.codeUri else None,
        image=c.image,
        port=(c.port or FIRST_IMAGE_PORT + index) if c.image else None,
        env=tuple((e.name, e.value) for e in c.env),
        requests=tuple(sorted(c.resources.requests.items())) if c.resources else (),
        limits=tuple(sorted(c.resources.limits.items())) if c.resources else (),
    )


def policy_from_spec(spec: AutoScaling) -> autoscale.Policy:
    """The pure policy of a variant's ``autoscaling`` block."""
    return autoscale.Policy(
        min_replicas=spec.minReplicas,
        max_replicas=spec.maxReplicas,
        target_tracking=tuple(
            autoscale.TargetTracking(autoscale.Metric(p.metric.value), p.target, p.query)
            for p in spec.targetTracking),
        step_scaling=tuple(
            autoscale.StepScaling(
                autoscale.Metric(p.metric.value),
                tuple(autoscale.Step(s.change, s.lowerBound, s.upperBound) for s in p.steps),
                p.query)
            for p in spec.stepScaling),
        scheduled=tuple(autoscale.Scheduled(s.cron, s.minReplicas, s.maxReplicas)
                        for s in spec.scheduled),
        scale_in_cooldown_s=spec.scaleInCooldown,
        scale_out_cooldown_s=spec.scaleOutCooldown,
        prometheus_url=spec.prometheusUrl,
    )


def _initial_replicas(v: VariantFleet, serverless: ServerlessConfig | None) -> int:
    """Replicas at creation: serverless starts with its provisioned ones (often
    zero); auto scaled variants start with ``replicas`` kept inside the bounds."""
    if serverless is not None:
        return serverless.provisionedConcurrency
    if v.autoscaling is not None:
        return min(max(v.replicas, v.autoscaling.minReplicas), v.autoscaling.maxReplicas)
    return v.replicas


def _variant_plan(v: VariantFleet, base_dir: str | None,
                  serverless: ServerlessConfig | None = None) -> VariantPlan:
    multi_model: MultiModelPlan | None = None
    steps: tuple[StepPlan, ...] = ()
    execution = (v.inferenceExecution or InferenceExecution.SERIAL).value
    if v.model is not None:
        model_uri = resolve_file_uri(v.model.uri, base_dir)
        model_format = ModelFormat(v.model.format.value)
    elif v.multiModel is not None:
        model_uri = resolve_file_uri(v.multiModel.prefix, base_dir)
        model_format = ModelFormat.ONNX
        multi_model = MultiModelPlan(model_uri, v.multiModel.cacheBytes,
                                     v.multiModel.diskCacheBytes)
    else:
        assert v.containers is not None  # the API model requires one of the three
        steps = tuple(_step_plan(i, c, base_dir) for i, c in enumerate(v.containers))
        model_uri = describe_steps(steps, execution)
        model_format = ModelFormat.ONNX
    requests = dict(v.resources.requests)
    limits = dict(v.resources.limits)
    if serverless is not None:  # SageMaker MemorySizeInMB: the replica's memory
        requests.setdefault("memory", serverless.memory)
        limits.setdefault("memory", serverless.memory)
    return VariantPlan(
        name=v.name,
        weight=v.weight if isinstance(v, ProductionVariant) else 0.0,
        replicas=_initial_replicas(v, serverless),
        model_uri=model_uri,
        model_format=model_format,
        env=tuple((e.name, e.value) for e in v.env),
        requests=tuple(sorted(requests.items())),
        limits=tuple(sorted(limits.items())),
        multi_model=multi_model,
        steps=steps,
        execution=execution,
        autoscaling=policy_from_spec(v.autoscaling) if v.autoscaling else None,
        max_in_flight_per_replica=v.admission.maxInFlightPerReplica if v.admission else None,
        max_queue_wait_s=v.admission.maxQueueWaitSeconds if v.admission else None,
        compile=variant_compile(v.model, {e.name: e.value for e in v.env}, base_dir)
        if v.model is not None else None,
        pod_template=v.podTemplate.written() if v.podTemplate else {},
    )


def plan_endpoint(endpoint: Endpoint, *, base_dir: str | None = None,
                  generation: int = 0) -> EndpointPlan:
    """Plan an Endpoint. ``base_dir`` resolves relative file:// URIs (local mode)."""
    spec = endpoint.spec
    serverless = None
    if spec.type is EndpointType.SERVERLESS:
        serverless = spec.serverless or ServerlessConfig()
    variants = tuple(_variant_plan(v, base_dir, serverless) for v in spec.variants)
    # Shadows run model servers as variants do, outside the serverless policy (never
    # scaled to zero): fixed replicas, or their own autoscaling.
    variants += tuple(replace(_variant_plan(sv, base_dir), weight=0.0,
                              shadow_sampling=sv.samplingPercentage,
                              shadow_timeout_s=sv.timeoutSeconds)
                      for sv in spec.shadowVariants)
    async_config = plan_async(endpoint)
    if async_config is not None:
        variants = tuple(replace(v, replicas=async_config.initial_replicas(v.replicas))
                         for v in variants)
    return EndpointPlan(
        name=endpoint.metadata.name,
        namespace=endpoint.metadata.namespace,
        generation=generation,
        variants=variants,
        async_config=async_config,
        type=spec.type.value,
        serverless=serverless,
        guarded=spec.deploymentConfig is not None,
        auth=spec.auth,
        gateway_pod_template=(spec.gateway.podTemplate.written()
                              if spec.gateway and spec.gateway.podTemplate else {}),
        capture=_capture(spec.dataCapture, base_dir),
        capture_destination=spec.dataCapture.destination if spec.dataCapture else "",
    )


def _capture(config: DataCapture | None, base_dir: str | None) -> CaptureRoute | None:
    """The gateway's capture settings; a relative file:// destination is resolved against
    ``base_dir`` (local mode) and otherwise left as written (``validate`` refuses it)."""
    if config is None:
        return None
    destination = resolve_file_uri(config.destination, base_dir)
    if destination.startswith("file://") and not destination.startswith("file:///"):
        return None
    return config.route(destination)
