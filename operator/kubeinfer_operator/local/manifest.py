"""Read ``Endpoint`` documents from a YAML file, with errors that name the field.

A file may hold several documents (``---``); each must be a kubeinfer.io
Endpoint. All problems of all documents are reported at once, each line naming
the document and the field path (``spec.variants[0].weight: ...``), so a user
fixes the file in one go. Parsing is pure; only ``load_manifest_file`` reads.

Outbound URLs (notification webhooks, ``autoscaling.prometheusUrl``) are held
to the same policy as on Kubernetes (``reconcile.validate.outbound_problems``),
with the allow-list from ``KUBEINFER_OUTBOUND_ALLOW`` in the environment of
``kubeinfer up`` (which the supervisor, its scaler and the workers inherit), and
variants' env to the same ``api.env_policy`` (``reconcile.validate.env_spec_problems``):
local mode trusts its user, but a manifest must mean the same on both backends.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from kubeinfer_operator.api.endpoint import API_VERSION, KIND, Endpoint, format_validation_error
from kubeinfer_operator.errors import SpecError
from kubeinfer_operator.local.manifest_io import read_manifest, yaml_documents
from kubeinfer_operator.local.memory import limit_problem
from kubeinfer_operator.reconcile.validate import env_spec_problems, outbound_problems
from kubeinfer_runtime.contract.outbound import ALLOW_ENV, OutboundPolicy


@dataclass(frozen=True)
class LoadedEndpoint:
    endpoint: Endpoint
    #: The document as written (handed to the supervisor, which validates it again).
    document: dict[str, Any]
    #: Directory relative file:// model URIs resolve against.
    base_dir: str

    @property
    def name(self) -> str:
        return self.endpoint.name

    @property
    def compiles(self) -> bool:
        """Whether a variant or shadow says ``model.compile`` (``up`` compiles it first):
        a check that needs none of the compile step's modules."""
        spec = self.endpoint.spec
        return any(v.model is not None and v.model.compile is not None
                   for v in (*spec.variants, *spec.shadowVariants))


def _doc_label(source: str, index: int, doc: Any) -> str:
    name = None
    if isinstance(doc, dict) and isinstance(doc.get("metadata"), dict):
        raw = doc["metadata"].get("name")
        name = raw if isinstance(raw, str) else None
    label = f"{source} document {index + 1}"
    return f"{label} (Endpoint {name!r})" if name else label


def outbound_policy(env: Mapping[str, str] | None = None) -> OutboundPolicy:
    """Local mode's outbound policy: allow-list from ``KUBEINFER_OUTBOUND_ALLOW`` of ``env``.

    Raises SpecError naming the bad entry.
    """
    env = os.environ if env is None else env
    try:
        return OutboundPolicy.parse(env.get(ALLOW_ENV, ""), env=env)
    except ValueError as exc:
        raise SpecError(f"{ALLOW_ENV}: {exc}") from exc


def parse_endpoint(doc: dict[str, Any]) -> Endpoint:
    """Validate one document; raises pydantic's ValidationError."""
    return Endpoint.model_validate(doc)


def parse_manifests(text: str, *, source: str, base_dir: str,
                    outbound: OutboundPolicy | None = None) -> list[LoadedEndpoint]:
    """Every Endpoint in ``text``; raises SpecError listing every problem found.

    ``outbound``: the policy spec URLs must obey (default: ``outbound_policy()``).
    """
    outbound = outbound if outbound is not None else outbound_policy()
    docs = yaml_documents(text, source)
    if not docs:
        raise SpecError(f"{source} holds no document; add an Endpoint "
                        f"(apiVersion: {API_VERSION}, kind: {KIND})")
    problems: list[str] = []
    loaded: list[LoadedEndpoint] = []
    for index, doc in enumerate(docs):
        label = _doc_label(source, index, doc)
        if not isinstance(doc, dict):
            problems.append(f"{label}: (root): expected a mapping (apiVersion, kind, metadata, "
                            f"spec), got {type(doc).__name__}")
            continue
        kind = doc.get("kind")
        if kind != KIND:
            problems.append(f"{label}: kind: {kind!r} is not supported in local mode; "
                            f"use kind: {KIND}")
            continue
        try:
            endpoint = parse_endpoint(doc)
        except ValidationError as exc:
            for line in format_validation_error(exc).splitlines():
                problems.append(f"{label}: {line}")
            continue
        local = (local_problems(endpoint) + outbound_problems(endpoint.spec, outbound)
                 + env_spec_problems(endpoint.spec))
        if local:
            problems += [f"{label}: {p}" for p in local]
            continue
        loaded.append(LoadedEndpoint(endpoint, doc, base_dir))
    seen: set[str] = set()
    for item in loaded:
        if item.name in seen:
            problems.append(f"{source}: metadata.name: Endpoint {item.name!r} appears twice; "
                            "give each Endpoint a unique name")
        seen.add(item.name)
    if problems:
        raise SpecError("\n".join(problems))
    return loaded


def local_problems(endpoint: Endpoint) -> list[str]:
    """What a valid Endpoint uses that local mode cannot run (image steps need a pod),
    or a memory limit it could not enforce (the operator refuses those too)."""
    problems: list[str] = []
    for i, variant in enumerate(endpoint.spec.variants):
        memory = variant.resources.limits.get("memory")
        problem = None if memory is None else limit_problem(
            f"spec.variants[{i}].resources.limits.memory", memory)
        if problem:
            problems.append(problem)
        for j, step in enumerate(variant.containers or []):
            if step.image is not None:
                problems.append(
                    f"spec.variants[{i}].containers[{j}].image: image steps run only on "
                    f"Kubernetes (as extra containers of the pod); locally, replace step "
                    f"{step.name!r} with a model or handler step, or deploy with kubectl")
    return problems


def load_manifest_file(path: Path) -> list[LoadedEndpoint]:
    text = read_manifest(path)
    return parse_manifests(text, source=str(path), base_dir=str(path.resolve().parent))
