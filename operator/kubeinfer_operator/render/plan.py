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

from kubeinfer_runtime.contract import (
    EndpointRoute,
    ModelFormat,
    RouteTable,
    VariantRoute,
)

from kubeinfer_operator.api.endpoint import Endpoint, ProductionVariant


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

    @property
    def server_hash(self) -> str:
        """Changes exactly when the model servers must be restarted (rolled).

        Weight and replica count are not part of it: changing them must never
        restart a model server.
        """
        payload = json.dumps(
            [self.model_uri, self.model_format.value, self.env, self.requests, self.limits]
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def server_env(self, endpoint_name: str) -> dict[str, str]:
        """``KUBEINFER_*`` env of this variant's model server (port excluded)."""
        env = {
            "KUBEINFER_MODEL_URI": self.model_uri,
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
                VariantRoute(name=v.name, weight=v.weight, upstreams=list(upstreams.get(v.name, [])))
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
    return "file://" + str((_PurePath(base_dir) / path))


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


def _variant_plan(v: ProductionVariant, base_dir: str | None) -> VariantPlan:
    return VariantPlan(
        name=v.name,
        weight=v.weight,
        replicas=v.replicas,
        model_uri=resolve_file_uri(v.model.uri, base_dir),
        model_format=ModelFormat(v.model.format.value),
        env=tuple((e.name, e.value) for e in v.env),
        requests=tuple(sorted(v.resources.requests.items())),
        limits=tuple(sorted(v.resources.limits.items())),
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
