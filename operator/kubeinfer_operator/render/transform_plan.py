"""The plan of a TransformJob: PURE, no I/O.

One TransformJob (with its model resolved: its own, or an Endpoint variant's
copied by the caller) becomes one ``TransformPlan``: the ``BatchSettings`` every
batch process of the job reads (as ``KUBEINFER_*`` env, through the runtime's
contract so operator and runtime cannot disagree on names), the image steps
that run beside each worker, and the job's bounds. Both backends consume it —
``render.transform_jobs`` turns it into Kubernetes Jobs, ``local.transform``
into processes — so a job behaves the same on a laptop and on a cluster.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kubeinfer_operator.api import env_policy as policy
from kubeinfer_operator.api.endpoint import (
    MAX_ENV_VARS,
    ContainerStep,
    Endpoint,
    EnvVar,
    ModelSource,
    format_validation_error,
)
from kubeinfer_operator.api.env_policy import operator_wins
from kubeinfer_operator.api.transform_job import TransformJob, TransformJobSpec
from kubeinfer_operator.errors import SpecError
from kubeinfer_operator.render import k8s_meta as meta
from kubeinfer_operator.render.plan import _step_plan, resolve_file_uri
from kubeinfer_operator.render.plan_steps import BIND_TO_PORT_ENV, IMAGE_STEP_ENV, StepPlan
from kubeinfer_operator.render.settings_env import rendered_env
from kubeinfer_runtime.contract import (
    ENV_PREFIX,
    InferenceExecution,
    ModelFormat,
    PipelineSpec,
)
from kubeinfer_runtime.contract.batch import (
    DEFAULT_MAX_CONCURRENT_TRANSFORMS,
    DEFAULT_MAX_PAYLOAD_BYTES,
    BatchSettings,
    BatchStrategy,
)

MB = 1024 * 1024
#: What Kubernetes injects into Indexed Job pods (the worker's shard), and what
#: local mode sets per worker: never from the spec.
SHARD_ENV = ("JOB_COMPLETION_INDEX", f"{ENV_PREFIX}SHARDS", f"{ENV_PREFIX}REPORT_FILE",
             f"{ENV_PREFIX}PROGRESS_FILE", f"{ENV_PREFIX}HOST", f"{ENV_PREFIX}PORT",
             f"{ENV_PREFIX}START_GATE")
#: What local mode adds to every batch process's env (``local.transform_runner``).
LOCAL_BATCH_ENV = (f"{ENV_PREFIX}MODEL_CACHE_DIR",)
#: The ``BatchSettings`` fields ``job_values`` and ``_model_values`` render, whichever
#: the spec sets (tests/unit/test_env_policy.py holds this equal to what they emit).
RENDERED_FIELDS = (
    "job", "input_uri", "data_type", "split_type", "compression", "output_uri",
    "assemble_with", "batch_across_objects", "invocation_timeout_s", "invocation_retries",
    "input_filter", "join_source", "output_filter", "max_failed_records", "instance_count",
    "batch_strategy", "max_batch_payload_bytes", "max_concurrent_transforms",
    "input_content_type", "accept", "model_uri", "model_format", "model_url", "pipeline",
)
#: Every name the operator renders into a batch process (planner, workers, finalizer):
#: neither the job's environment nor the model's env may set them (``api.env_policy``).
BATCH_ENV = frozenset((*(ENV_PREFIX + f.upper() for f in RENDERED_FIELDS), *SHARD_ENV,
                       *LOCAL_BATCH_ENV))
#: What an image model's container gets from the operator (``sagemaker_batch_env``, its
#: port), whatever the spec says.
SAGEMAKER_ENV = frozenset({"SAGEMAKER_BATCH", "SAGEMAKER_MAX_PAYLOAD_IN_MB",
                           "SAGEMAKER_BATCH_STRATEGY", "SAGEMAKER_MAX_CONCURRENT_TRANSFORMS"}
                          ) | IMAGE_STEP_ENV


class ModelRefError(SpecError):
    """``spec.endpointRef`` cannot be resolved; the message names the Endpoint and the fix."""

    reason = "EndpointNotFound"


class ResolvedModel(BaseModel):
    """The model a job runs, as pinned when it starts (an Endpoint may change later)."""

    model_config = ConfigDict(extra="forbid")

    #: What ``status.model`` and ``kubeinfer status`` say: where the model came from.
    source: str
    model: ModelSource | None = None
    #: As a variant's (1 to 15 steps, unique names).
    containers: list[ContainerStep] | None = Field(default=None, min_length=1, max_length=15)
    #: The variant's extra model-server env (endpointRef), in order.
    env: list[EnvVar] = Field(default_factory=list, max_length=MAX_ENV_VARS)
    #: Local mode: the directory relative file:// URIs of this model resolve against
    #: (the Endpoint's manifest's, for endpointRef). None on Kubernetes.
    base_dir: str | None = None

    @model_validator(mode="after")
    def _one_model(self) -> ResolvedModel:
        # What a variant guarantees, checked again: a pin is read back from an annotation.
        if (self.model is None) == (self.containers is None):
            raise ValueError("set exactly one of model, containers")
        names = [c.name for c in self.containers or []]
        if len(set(names)) != len(names):
            raise ValueError("duplicate container names")
        return self

    def to_json(self) -> str:
        return self.model_dump_json(exclude_none=True)


def own_model(spec: TransformJobSpec, base_dir: str | None = None) -> ResolvedModel | None:
    """The spec's own model (None: it names an Endpoint's)."""
    if spec.model is not None:
        return ResolvedModel(source=f"model {spec.model.uri}", model=spec.model,
                             base_dir=base_dir)
    if spec.containers is not None:
        steps = " → ".join(f"{c.name} ({c.kind})" for c in spec.containers)
        return ResolvedModel(source=f"containers: {steps}", containers=spec.containers,
                             base_dir=base_dir)
    return None


def model_from_endpoint(spec: TransformJobSpec, endpoint: Endpoint | None, namespace: str | None,
                        base_dir: str | None = None) -> ResolvedModel:
    """Copy the model of the variant ``spec.endpointRef`` names; ModelRefError if it can't."""
    ref = spec.endpointRef
    assert ref is not None
    where = f"{namespace}/{ref.name}" if namespace else ref.name
    if endpoint is None:
        raise ModelRefError(f"spec.endpointRef: Endpoint {where} does not exist; create it, or "
                            "give the job its own model or containers")
    names = [v.name for v in endpoint.spec.variants]
    if ref.variant is None and len(names) > 1:
        raise ModelRefError(f"spec.endpointRef.variant: Endpoint {where} has variants "
                            f"{', '.join(names)}; name the one whose model to use")
    variant = next((v for v in endpoint.spec.variants
                    if ref.variant is None or v.name == ref.variant), None)
    if variant is None:
        raise ModelRefError(f"spec.endpointRef.variant: Endpoint {where} has no variant "
                            f"{ref.variant!r} (it has {', '.join(names)}); fix the name")
    if variant.multiModel is not None:
        raise ModelRefError(f"spec.endpointRef: variant {variant.name} of Endpoint {where} is "
                            "multi-model; a TransformJob runs one model: give it model.uri")
    label = f"Endpoint {ref.name} variant {variant.name}"
    if variant.model is not None:
        source = f"{label}: model {variant.model.uri}"
    else:
        assert variant.containers is not None
        source = f"{label}: containers " + " → ".join(
            f"{c.name} ({c.kind})" for c in variant.containers)
    return ResolvedModel(source=source, model=variant.model, containers=variant.containers,
                         env=variant.env, base_dir=base_dir)


def settings_env(values: dict[str, Any]) -> dict[str, str]:
    """``KUBEINFER_*`` env of exactly ``values`` (BatchSettings fields), validated by the
    runtime's own model; a ValueError names what the runtime would refuse."""
    return rendered_env(BatchSettings, values)


@dataclass(frozen=True)
class TransformPlan:
    """Everything both backends need to run one TransformJob."""

    name: str
    namespace: str | None
    #: ``KUBEINFER_*`` env of every batch process (planner, workers, finalizer).
    env: dict[str, str]
    #: Image steps: containers beside each worker (Kubernetes only).
    images: tuple[StepPlan, ...]
    #: Env of each image step's container (by step name).
    image_env: dict[str, dict[str, str]]
    model_description: str
    instance_count: int
    requests: tuple[tuple[str, str], ...]
    limits: tuple[tuple[str, str], ...]
    max_failed_records: int
    backoff_limit_per_index: int
    active_deadline_s: int | None
    ttl_s: int | None
    #: Hash of the spec and the resolved model: the Jobs of one run carry it.
    run_hash: str
    #: ``spec.podTemplate`` as written (placement and identity; Kubernetes only).
    pod_template: dict[str, Any] = field(default_factory=dict)

    @property
    def inputs_on_object_store(self) -> bool:
        return not any(self.env.get(f"{ENV_PREFIX}{k}", "").startswith("file://")
                       for k in ("INPUT_URI", "OUTPUT_URI"))


def sagemaker_batch_env(spec: TransformJobSpec) -> dict[str, str]:
    """What SageMaker tells a model container in a batch transform job."""
    strategy = "SINGLE_RECORD" if spec.batchStrategy is BatchStrategy.SINGLE_RECORD \
        else "MULTI_RECORD"
    payload_mb = (DEFAULT_MAX_PAYLOAD_BYTES // MB if spec.maxPayloadInMB is None
                  else spec.maxPayloadInMB)
    return {
        "SAGEMAKER_BATCH": "true",
        "SAGEMAKER_MAX_PAYLOAD_IN_MB": str(payload_mb),
        "SAGEMAKER_BATCH_STRATEGY": strategy,
        "SAGEMAKER_MAX_CONCURRENT_TRANSFORMS": str(spec.maxConcurrentTransforms
                                                  or DEFAULT_MAX_CONCURRENT_TRANSFORMS),
    }


def _model_values(model: ResolvedModel) -> tuple[dict[str, Any], tuple[StepPlan, ...]]:
    """The model's BatchSettings values, and its image steps."""
    if model.model is not None:
        return ({"model_uri": resolve_file_uri(model.model.uri, model.base_dir),
                 "model_format": ModelFormat(model.model.format.value)}, ())
    assert model.containers is not None
    steps = tuple(_step_plan(i, c, model.base_dir) for i, c in enumerate(model.containers))
    images = tuple(s for s in steps if s.kind == "image")
    if len(steps) == 1 and images:
        return {"model_url": images[0].url}, images
    pipeline = PipelineSpec(execution=InferenceExecution.SERIAL,
                            steps=[s.contract() for s in steps])
    return {"pipeline": pipeline}, images


def _location(uri: str, base_dir: str | None) -> str:
    """``resolve_file_uri``, keeping a trailing '/' (a prefix, not an object)."""
    resolved = resolve_file_uri(uri, base_dir)
    return resolved + "/" if uri.endswith("/") and not resolved.endswith("/") else resolved


def job_values(spec: TransformJobSpec, name: str, base_dir: str | None) -> dict[str, Any]:
    """The job's own BatchSettings values (everything but the model)."""
    values: dict[str, Any] = {
        "job": name,
        "input_uri": _location(spec.input.uri, base_dir),
        "data_type": spec.input.dataType,
        "split_type": spec.input.splitType,
        "compression": spec.input.compressionType,
        "output_uri": _location(spec.output.uri, base_dir),
        "assemble_with": spec.output.assembleWith,
        "batch_across_objects": spec.batchAcrossObjects,
        "invocation_timeout_s": float(spec.modelClientConfig.invocationsTimeoutInSeconds),
        "invocation_retries": spec.modelClientConfig.invocationsMaxRetries,
        "input_filter": spec.dataProcessing.inputFilter,
        "join_source": spec.dataProcessing.joinSource,
        "output_filter": spec.dataProcessing.outputFilter,
        "max_failed_records": spec.errorPolicy.maxFailedRecords,
        "instance_count": spec.resources.instanceCount,
    }
    # Unset: an image model's GET /execution-parameters decides, else the defaults.
    if spec.batchStrategy is not None:
        values["batch_strategy"] = spec.batchStrategy
    if spec.maxPayloadInMB is not None:
        values["max_batch_payload_bytes"] = spec.maxPayloadInMB * MB
    if spec.maxConcurrentTransforms is not None:
        values["max_concurrent_transforms"] = spec.maxConcurrentTransforms
    if spec.input.contentType is not None:
        values["input_content_type"] = spec.input.contentType
    if spec.output.accept is not None:
        values["accept"] = spec.output.accept
    return values


def env_problems(model: ResolvedModel, environment: dict[str, str], where: str, *,
                 kubeinfer_image: bool) -> list[str]:
    """What ``api.env_policy`` refuses in the job's environment (``kubeinfer_image``: it
    reaches the batch worker, not only an image model), the model's env (always the
    worker's) and its image steps' env (the user's images); ``where``: what the model's
    field paths start with (``spec.``, or ``spec.endpointRef`` and the variant)."""
    # The same names for both: SageMaker's batch settings (any SAGEMAKER_BATCH*) included.
    operator_env = BATCH_ENV | SAGEMAKER_ENV | {
        k for k in (*environment, *(e.name for e in model.env)) if k.startswith("SAGEMAKER_BATCH")}
    problems = policy.env_problems(policy.environment_entries(environment), operator_env,
                                   kubeinfer_image=kubeinfer_image)
    problems += policy.env_problems(
        ((f"{where}env[{j}].name", e.name) for j, e in enumerate(model.env)), operator_env)
    for k, step in enumerate(model.containers or []):
        problems += policy.env_problems(
            ((f"{where}containers[{k}].env[{j}].name", e.name) for j, e in enumerate(step.env)),
            SAGEMAKER_ENV, kubeinfer_image=False)
    return problems


def run_hash(spec: TransformJobSpec, model: ResolvedModel) -> str:
    return meta.content_hash([spec.model_dump(mode="json", by_alias=True),
                              model.model_dump(mode="json", exclude={"base_dir"})])


def plan_transform(job: TransformJob, model: ResolvedModel, *,
                   base_dir: str | None = None) -> TransformPlan:
    """Plan a TransformJob whose model is resolved. ``base_dir`` resolves the job's relative
    file:// URIs (local mode). Raises SpecError naming every problem."""
    spec = job.spec
    model_values, images = _model_values(model)
    ref = spec.endpointRef
    where = "spec." if ref is None else f"spec.endpointRef: Endpoint {ref.name}" + (
        f" variant {ref.variant}" if ref.variant else "") + ": "
    problems = env_problems(model, spec.environment, where, kubeinfer_image=not images)
    values = {**job_values(spec, job.name, base_dir), **model_values}
    try:
        env = settings_env(values)
    except ValidationError as exc:
        problems += format_validation_error(exc, "batch settings").splitlines()
        env = {}
    if problems:
        raise SpecError(f"TransformJob {job.name} is invalid: " + "; ".join(problems))
    batch = sagemaker_batch_env(spec)
    image_env = {s.name: {**dict(s.env), **spec.environment, **batch,
                          BIND_TO_PORT_ENV: str(s.port)} for s in images}
    # In-process models read the job's environment in the worker (handlers, threads); the
    # model's (an Endpoint variant's) env too. The operator's settings win either way.
    worker_env = operator_wins(env, {**{e.name: e.value for e in model.env},
                                     **({} if images else spec.environment)})
    return TransformPlan(
        name=job.name,
        namespace=job.metadata.namespace,
        env=worker_env,
        images=images,
        image_env=image_env,
        model_description=model.source,
        instance_count=spec.resources.instanceCount,
        requests=tuple(sorted(spec.resources.requests.items())),
        limits=tuple(sorted(spec.resources.limits.items())),
        max_failed_records=spec.errorPolicy.maxFailedRecords,
        backoff_limit_per_index=spec.backoffLimitPerIndex,
        active_deadline_s=spec.activeDeadlineSeconds,
        ttl_s=spec.ttlSecondsAfterFinished,
        run_hash=run_hash(spec, model),
        pod_template=spec.podTemplate.written() if spec.podTemplate else {},
    )
