"""The plan of a CompilationJob: PURE, no I/O.

One CompilationJob becomes one ``CompilePlan``: the ``CompileSettings`` the
compiler process reads (as ``KUBEINFER_*`` env, rendered through the runtime's
own settings class so operator and runtime cannot disagree on names or values)
and the job's bounds. Both backends consume it: ``render.compile_jobs`` turns
it into a Kubernetes Job, ``local.compile_runner`` into a local process, so a
compilation behaves the same on a laptop and on a cluster.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from kubeinfer_operator.api.compilation_job import CompilationJob, CompilationJobSpec
from kubeinfer_operator.api.endpoint import format_validation_error
from kubeinfer_operator.api.env_policy import env_problems, environment_entries, operator_wins
from kubeinfer_operator.errors import SpecError
from kubeinfer_operator.render import k8s_meta as meta
from kubeinfer_operator.render.plan import resolve_file_uri
from kubeinfer_operator.render.settings_env import rendered_env
from kubeinfer_runtime.contract import ENV_PREFIX
from kubeinfer_runtime.contract.compile import ARTIFACT_TARBALL, CompileSettings

#: What each backend sets per process (where the report goes, scratch space): never
#: from the spec.
PROCESS_ENV = tuple(ENV_PREFIX + n for n in ("REPORT_FILE", "WORK_DIR", "TUNING_CACHE_DIR"))
#: The ``CompileSettings`` fields ``compile_values`` renders, whichever the spec sets
#: (tests/unit/test_env_policy.py holds this equal to what it emits). The others
#: (``measure_s``, ``max_abs_diff``, ``min_speedup``, ...) are the user's tuning.
RENDERED_FIELDS = (
    "model_uri", "target", "output_uri", "tuning_budget_s", "allow_quantization",
    "min_top1_agreement", "threads", "batch_sizes", "tuning_trials", "tuning_cache_uri",
    "calibration_uri",
)
#: Every name the operator renders into the compiler: ``spec.environment`` may not set
#: them (``api.env_policy``).
COMPILER_OPERATOR_ENV = frozenset((*(ENV_PREFIX + f.upper() for f in RENDERED_FIELDS),
                                   *PROCESS_ENV))


@dataclass(frozen=True)
class CompilePlan:
    """Everything both backends need to run one CompilationJob."""

    name: str
    namespace: str | None
    #: ``KUBEINFER_*`` env of the compiler (plus the spec's ``environment``).
    env: dict[str, str]
    model_description: str
    target: str
    #: The output folder, resolved (local mode: relative file:// URIs made absolute).
    output_uri: str
    threads: int
    requests: tuple[tuple[str, str], ...]
    limits: tuple[tuple[str, str], ...]
    backoff_limit: int
    active_deadline_s: int
    ttl_s: int | None
    #: Hash of the spec: the Job carries it, so a Job of another spec is never adopted.
    run_hash: str
    #: ``spec.podTemplate`` as written (placement and identity; Kubernetes only).
    pod_template: dict[str, Any] = field(default_factory=dict)

    @property
    def artifact_uri(self) -> str:
        return f"{self.output_uri.rstrip('/')}/{ARTIFACT_TARBALL}"


def compile_values(spec: CompilationJobSpec, base_dir: str | None) -> dict[str, Any]:
    """The spec's CompileSettings values (``base_dir`` resolves relative file:// URIs)."""
    values: dict[str, Any] = {
        "model_uri": resolve_file_uri(spec.model.uri, base_dir),
        "target": spec.target,
        "output_uri": resolve_file_uri(spec.output.uri, base_dir),
        "tuning_budget_s": spec.tuning.budgetSeconds,
        "allow_quantization": spec.quantization.allowed,
        "min_top1_agreement": spec.quantization.minTop1Agreement,
        "threads": spec.threads,
    }
    if spec.batchSizes is not None:
        values["batch_sizes"] = spec.batchSizes
    if spec.tuning.trials is not None:
        values["tuning_trials"] = spec.tuning.trials
    if spec.tuning.cacheUri is not None:
        values["tuning_cache_uri"] = resolve_file_uri(spec.tuning.cacheUri, base_dir)
    if spec.quantization.calibrationUri is not None:
        values["calibration_uri"] = resolve_file_uri(spec.quantization.calibrationUri, base_dir)
    return values


def run_hash(spec: CompilationJobSpec) -> str:
    return meta.content_hash(spec.model_dump(mode="json", by_alias=True))


def compile_env(values: dict[str, Any]) -> dict[str, str]:
    """``KUBEINFER_*`` env of exactly ``values``, validated by ``CompileSettings``."""
    return rendered_env(CompileSettings, values)


def plan_compile(job: CompilationJob, *, base_dir: str | None = None) -> CompilePlan:
    """Plan a CompilationJob. ``base_dir`` resolves its relative file:// URIs (local mode).
    Raises SpecError naming every problem."""
    spec = job.spec
    values = compile_values(spec, base_dir)
    problems: list[str] = []
    try:
        env = compile_env(values)
    except ValidationError as exc:
        problems += format_validation_error(exc, "compile settings").splitlines()
        env = {}
    problems += env_problems(environment_entries(spec.environment),
                             COMPILER_OPERATOR_ENV | set(env), compiler=True)
    if problems:
        raise SpecError(f"CompilationJob {job.name} is invalid: " + "; ".join(problems))
    return CompilePlan(
        name=job.name,
        namespace=job.metadata.namespace,
        env=operator_wins(env, spec.environment),
        model_description=f"model {spec.model.uri}",
        target=spec.target.value,
        output_uri=values["output_uri"],
        threads=spec.threads,
        requests=tuple(sorted(spec.resources.requests.items())),
        limits=tuple(sorted(spec.resources.limits.items())),
        backoff_limit=spec.backoffLimit,
        active_deadline_s=spec.max_runtime_s,
        ttl_s=spec.ttlSecondsAfterFinished,
        run_hash=run_hash(spec),
        pod_template=spec.podTemplate.written() if spec.podTemplate else {},
    )
