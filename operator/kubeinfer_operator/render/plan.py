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
from dataclasses import dataclass, field
from urllib.parse import urlparse

from kubeinfer_operator.api.endpoint import (
    ContainerStep,
    Endpoint,
    InferenceExecution,
    ProductionVariant,
)
from kubeinfer_operator.render.plan_steps import (
    FIRST_IMAGE_PORT,
    MultiModelPlan,
    StepPlan,
    describe_steps,
    pipeline_env,
)
from kubeinfer_runtime.contract import (
    EndpointRoute,
    ModelFormat,
    RouteTable,
    VariantRoute,
)


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
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def server_env(self, endpoint_name: str) -> dict[str, str]:
        """``KUBEINFER_*`` env of this variant's model server (port excluded)."""
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
        env.update(dict(self.env))
        return env


@dataclass(frozen=True)
class EndpointPlan:
    name: str
    namespace: str | None
    generation: int
    variants: tuple[VariantPlan, ...] = field(default_factory=tuple)

    def variant(self, name: str) -> VariantPlan | None:
        return next((v for v in self.variants if v.name == name), None)

    def route_table(self, upstreams: dict[str, list[str]]) -> RouteTable:
        """The gateway's route table, given each variant's upstream URLs.

        A variant missing from ``upstreams`` gets no URLs: the gateway answers
        503 for it (never routes to something that is not there).
        """
        route = EndpointRoute(
            name=self.name,
            variants=[
                VariantRoute(name=v.name, weight=v.weight,
                             upstreams=list(upstreams.get(v.name, [])))
                for v in self.variants
            ],
        )
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
    )


def _variant_plan(v: ProductionVariant, base_dir: str | None) -> VariantPlan:
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
    return VariantPlan(
        name=v.name,
        weight=v.weight,
        replicas=v.replicas,
        model_uri=model_uri,
        model_format=model_format,
        env=tuple((e.name, e.value) for e in v.env),
        requests=tuple(sorted(v.resources.requests.items())),
        limits=tuple(sorted(v.resources.limits.items())),
        multi_model=multi_model,
        steps=steps,
        execution=execution,
    )


def plan_endpoint(endpoint: Endpoint, *, base_dir: str | None = None,
                  generation: int = 0) -> EndpointPlan:
    """Plan an Endpoint. ``base_dir`` resolves relative file:// URIs (local mode)."""
    return EndpointPlan(
        name=endpoint.metadata.name,
        namespace=endpoint.metadata.namespace,
        generation=generation,
        variants=tuple(_variant_plan(v, base_dir) for v in endpoint.spec.variants),
    )
