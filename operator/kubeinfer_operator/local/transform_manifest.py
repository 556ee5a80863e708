"""Read ``TransformJob`` documents from a YAML file for local mode, model resolved.

A file may hold several documents. TransformJobs are validated as the operator
validates them, with local mode's own limits (``file://`` data is fine here;
image steps need a pod). An ``endpointRef`` resolves against an Endpoint in the
same file (used for its model only: it is not started) or, failing that, the
spec of a local endpoint ``kubeinfer up`` started; relative ``file://`` model
URIs then resolve against that Endpoint's manifest's folder. Every problem of
every document is reported at once, each naming the document and the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from kubeinfer_operator.api import transform_job as tj
from kubeinfer_operator.api.endpoint import Endpoint, format_validation_error
from kubeinfer_operator.errors import SpecError
from kubeinfer_operator.local.manifest_io import read_manifest, yaml_documents
from kubeinfer_operator.local.paths import EndpointPaths
from kubeinfer_operator.local.state import read_desired
from kubeinfer_operator.reconcile.transform_validate import (
    InvalidTransformJob,
    model_problems,
    validate_transform_job,
)
from kubeinfer_operator.render.transform_plan import (
    ModelRefError,
    ResolvedModel,
    TransformPlan,
    model_from_endpoint,
    own_model,
    plan_transform,
)


@dataclass(frozen=True)
class LoadedJob:
    job: tj.TransformJob
    model: ResolvedModel
    plan: TransformPlan
    #: Endpoints of the file used only to resolve this job's endpointRef.
    borrowed: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.job.name


def _label(source: str, index: int, doc: Any) -> str:
    name = ((doc.get("metadata") or {}).get("name") if isinstance(doc, dict)
            and isinstance(doc.get("metadata"), dict) else None)
    kind = doc.get("kind") if isinstance(doc, dict) else None
    label = f"{source} document {index + 1}"
    return f"{label} ({kind} {name!r})" if name and kind else label


def _local_endpoint(name: str, home: Path | None) -> tuple[Endpoint, str] | None:
    """The spec ``kubeinfer up`` handed the local endpoint ``name`` (running or not)."""
    desired = read_desired(EndpointPaths.for_endpoint(name, home))
    if desired is None:
        return None
    try:
        return Endpoint.model_validate(desired.manifest), desired.base_dir
    except ValidationError:
        return None


def _resolve(job: tj.TransformJob, base_dir: str, endpoints: dict[str, Endpoint],
             home: Path | None, source: str) -> tuple[ResolvedModel, tuple[str, ...]]:
    own = own_model(job.spec, base_dir)
    if own is not None:
        return own, ()
    ref = job.spec.endpointRef
    assert ref is not None
    if ref.name in endpoints:
        found: tuple[Endpoint, str] | None = (endpoints[ref.name], base_dir)
        borrowed: tuple[str, ...] = (ref.name,)
    else:
        found, borrowed = _local_endpoint(ref.name, home), ()
    if found is None:
        raise ModelRefError(f"spec.endpointRef: no Endpoint {ref.name!r} in {source} and no "
                            f"local endpoint {ref.name!r} (kubeinfer up); add it to the file, "
                            "start it, or give the job its own model")
    model = model_from_endpoint(job.spec, found[0], None, found[1])
    problems = model_problems(model.containers, f"Endpoint {ref.name}", on_kubernetes=False)
    if problems:
        raise ModelRefError("spec.endpointRef: " + "; ".join(problems))
    return model, borrowed


def parse_transform_jobs(text: str, *, source: str, base_dir: str,
                         home: Path | None = None) -> list[LoadedJob]:
    """Every TransformJob in ``text``, planned; SpecError listing every problem."""
    docs = yaml_documents(text, source)
    problems: list[str] = []
    endpoints: dict[str, Endpoint] = {}
    jobs: list[tuple[str, tj.TransformJob]] = []
    for index, doc in enumerate(docs):
        label = _label(source, index, doc)
        kind = doc.get("kind") if isinstance(doc, dict) else None
        if kind == "Endpoint":
            try:
                endpoints[str(doc["metadata"]["name"])] = Endpoint.model_validate(doc)
            except (ValidationError, KeyError, TypeError) as exc:
                detail = (format_validation_error(exc).replace("\n", "; ")
                          if isinstance(exc, ValidationError) else "no metadata.name")
                problems.append(f"{label}: {detail}")
            continue
        if kind != tj.KIND or not isinstance(doc, dict):
            problems.append(f"{label}: kind: {kind!r} cannot run beside a TransformJob; put "
                            "Endpoints a job does not name in a file of their own")
            continue
        raw_meta = doc.get("metadata")
        meta: dict[str, Any] = raw_meta if isinstance(raw_meta, dict) else {}
        extra = set(doc) - {"apiVersion", "kind", "metadata", "spec", "status"}
        if doc.get("apiVersion") != tj.API_VERSION or extra:
            problems.append(f"{label}: apiVersion must be {tj.API_VERSION}"
                            + (f" (unknown field(s) {', '.join(sorted(extra))})" if extra else ""))
            continue
        try:
            job = validate_transform_job(str(meta.get("name") or ""),
                                         meta.get("namespace"), doc.get("spec"),
                                         on_kubernetes=False)
        except InvalidTransformJob as exc:
            problems += [f"{label}: {p}" for p in exc.problems]
            continue
        jobs.append((label, job))
    if not jobs and not problems:
        raise SpecError(f"{source} holds no TransformJob (apiVersion: {tj.API_VERSION}, "
                        f"kind: {tj.KIND})")
    loaded: list[LoadedJob] = []
    for label, job in jobs:
        try:
            model, borrowed = _resolve(job, base_dir, endpoints, home, source)
            plan = plan_transform(job, model, base_dir=base_dir)
        except SpecError as exc:
            problems.append(f"{label}: {exc}")
            continue
        loaded.append(LoadedJob(job, model, plan, borrowed))
    names = [item.name for item in loaded]
    problems += [f"{source}: metadata.name: TransformJob {n!r} appears twice; give each job a "
                 "unique name" for n in sorted({n for n in names if names.count(n) > 1})]
    if problems:
        raise SpecError("\n".join(problems))
    return loaded


def load_transform_file(path: Path, home: Path | None = None) -> list[LoadedJob]:
    text = read_manifest(path)
    return parse_transform_jobs(text, source=str(path), base_dir=str(path.resolve().parent),
                                home=home)
