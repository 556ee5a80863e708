"""An Endpoint plus a candidate search → the recommender's request, and the winner → an
Endpoint: PURE.

``recommend_request`` turns one variant of an Endpoint (its model, resolved
against the manifest's directory in local mode) and a ``CandidateSearch`` (a
candidates file or a RecommendationJob's spec) into the ``RecommendRequest``
``kubeinfer-runtime recommend`` runs. ``recommended_endpoint`` writes the chosen
candidate back into the Endpoint document: the variant's resources, replicas,
threads and workers (env), the compiled artifact when it won, and target-tracking
auto scaling on InvocationsPerReplica at the measured max throughput per replica
times the headroom (per minute, as SageMaker's InvocationsPerInstance), as
SageMaker's Inference Recommender suggests a scaling policy.
"""

from __future__ import annotations

import copy
from typing import Any

from kubeinfer_operator.api.endpoint import Endpoint, VariantFleet
from kubeinfer_operator.render.plan import resolve_file_uri
from kubeinfer_runtime.contract.recommend import (
    DEFAULT_INSTANCE_TYPES,
    Candidate,
    CandidateSearch,
    RecommendReport,
    RecommendRequest,
)

#: Env vars the runtime reads for the two per-replica settings a candidate changes.
ENV_THREADS = "KUBEINFER_INTRA_OP_THREADS"
ENV_WORKERS = "KUBEINFER_WORKERS"
#: Auto scaling's ceiling: this many times the recommended replicas.
MAX_REPLICAS_FACTOR = 4


class RecommendPlanError(ValueError):
    """The Endpoint or the search cannot be recommended for (message: the fix)."""


def pick_variant(endpoint: Endpoint, variant: str | None) -> VariantFleet:
    variants = endpoint.spec.variants
    if variant is not None:
        found = next((v for v in variants if v.name == variant), None)
        if found is None:
            raise RecommendPlanError(f"Endpoint {endpoint.name} has no variant {variant!r}; "
                                     f"pick one of {', '.join(v.name for v in variants)}")
        return found
    if not variants:
        raise RecommendPlanError(f"Endpoint {endpoint.name} has no variants")
    return variants[0]


def recommend_request(endpoint: Endpoint, search: CandidateSearch, *,
                      variant: str | None = None, base_dir: str | None = None,
                      compiled_uri: str | None = None,
                      slo_p99_ms: float | None = None,
                      max_minutes: float | None = None) -> RecommendRequest:
    v = pick_variant(endpoint, variant)
    if v.model is None:
        raise RecommendPlanError(f"Endpoint {endpoint.name} variant {v.name}: only a variant "
                                 "serving one model (model.uri) can be recommended for")
    model_uri = resolve_file_uri(v.model.uri, base_dir)
    if v.model.format.value != "onnx":
        raise RecommendPlanError(f"Endpoint {endpoint.name} variant {v.name}: point "
                                 "model.uri at the ONNX model (format: onnx) and pass the "
                                 "compiled artifact separately (--compiled, "
                                 "spec.compiledModelUri)")
    load = search.load
    updates: dict[str, Any] = {}
    if slo_p99_ms is not None:
        updates["sloP99Ms"] = slo_p99_ms
    if max_minutes is not None:
        updates["maxMinutes"] = max_minutes
    if updates:
        load = load.model_copy(update=updates)
    try:
        return RecommendRequest(
            modelUri=model_uri,
            compiledModelUri=(resolve_file_uri(compiled_uri, base_dir)
                              if compiled_uri else None),
            contentType=search.contentType, payloads=search.payloads,
            candidates=search.expand(),
            instanceTypes=list(search.instanceTypes or DEFAULT_INSTANCE_TYPES), load=load)
    except ValueError as e:
        raise RecommendPlanError(f"Invalid candidates: {e}") from e


def _set_env(env: list[dict[str, Any]], name: str, value: str) -> list[dict[str, Any]]:
    return [e for e in env if e.get("name") != name] + [{"name": name, "value": value}]


def recommended_endpoint(document: dict[str, Any], report: RecommendReport, *,
                         variant: str | None = None, compiled_uri: str | None = None,
                         model_uri: str | None = None) -> dict[str, Any]:
    """The Endpoint document with the recommended candidate's settings in its variant
    (``model_uri``: replaces the variant's, e.g. resolved when the file moves)."""
    if report.recommended is None:
        raise RecommendPlanError(f"No candidate to write: {report.reason}")
    result = report.result(report.recommended)
    cand: Candidate = result.candidate
    doc = copy.deepcopy(document)
    doc.pop("status", None)
    variants = doc.get("spec", {}).get("variants") or []
    target = next((v for v in variants if variant is None or v.get("name") == variant), None)
    if target is None:
        raise RecommendPlanError(f"Endpoint has no variant {variant!r}")
    if model_uri is not None and isinstance(target.get("model"), dict):
        target["model"] = {**target["model"], "uri": model_uri}
    apply_candidate(target, cand, compiled_uri=compiled_uri,
                    autoscaling_target=report.autoscalingTarget)
    return doc


def apply_candidate(target: dict[str, Any], cand: Candidate, *, compiled_uri: str | None,
                    autoscaling_target: float | None) -> None:
    """Write ``cand``'s settings into the variant document ``target`` (in place): replicas,
    resources, threads and workers (env), the compiled artifact, and auto scaling at
    ``autoscaling_target`` (none when unset)."""
    target["replicas"] = cand.replicas
    resources: dict[str, Any] = {}
    if cand.resources.requests:
        resources["requests"] = dict(cand.resources.requests)
    if cand.resources.limits:
        resources["limits"] = dict(cand.resources.limits)
    if resources:
        target["resources"] = resources
    env = list(target.get("env") or [])
    env = _set_env(env, ENV_THREADS, str(cand.threads))
    env = _set_env(env, ENV_WORKERS, str(cand.workers))
    target["env"] = env
    if cand.artifact == "compiled" and compiled_uri:
        target["model"] = {"uri": compiled_uri, "format": "compiled"}
    if autoscaling_target and autoscaling_target > 0:
        target["autoscaling"] = {
            "minReplicas": cand.replicas,
            "maxReplicas": cand.replicas * MAX_REPLICAS_FACTOR,
            "targetTracking": [{"metric": "InvocationsPerReplica",
                                "target": autoscaling_target}],
        }
