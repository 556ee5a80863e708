"""Which variant and which model server answer a request: PURE, no I/O.

The gateway compiles each ``contract.RouteTable`` into ``RouteState`` once per
reload, so the hot path does dictionary lookups and one random draw, never
pydantic work. Choosing follows SageMaker:

* ``X-Amzn-SageMaker-Target-Variant`` pins a variant, even one whose weight is
  0 (that is how a zero-weight variant is tested in production);
* otherwise variants are drawn by weight, among those with a weight above 0.
  A drawn variant with no healthy model server is skipped by drawing again
  among the variants that have one, so a dead canary does not fail its share
  of the traffic while the primary is fine.

During a guarded rollout a production variant is served by two routes (its
blue and green fleets, ``VariantRoute.production_variant``): answers name the
production variant, and pinning it draws between its routes by their weights
(the first healthy one when the variant's weight is 0).

Inside a variant, requests go round-robin over its healthy upstreams. Health
comes in as the set of upstream URLs that are down (``HealthTable.down``), so
this module stays testable with plain sets and a seeded ``random.Random``.
"""

from __future__ import annotations

import random
from collections.abc import Container, Sequence
from dataclasses import dataclass, field, replace

from kubeinfer_runtime.contract import EndpointRoute, RouteTable, ServerlessRoute, VariantRoute
from kubeinfer_runtime.errors import NotFound, NotReady, RuntimeServiceError
from kubeinfer_runtime.gateway.shedding import ShedPolicy
from kubeinfer_runtime.gateway.taps import Tap


@dataclass(slots=True, eq=False)
class VariantState:
    """One variant of one endpoint, plus its round-robin cursor."""

    name: str
    weight: float
    upstreams: tuple[str, ...]
    #: The variant name as a header value, encoded once per reload.
    header_value: bytes = b""
    _cursor: int = 0
    #: Admission bounds (None: none, e.g. serverless endpoints, bounded by the activator).
    admission: ShedPolicy | None = None
    #: The production variant clients see (``VariantRoute.production_variant``); "": ``name``.
    production: str = ""

    def __post_init__(self) -> None:
        self.production = self.production or self.name
        self.header_value = self.production.encode("latin-1", "replace")

    def has_healthy(self, down: Container[str]) -> bool:
        return any(u not in down for u in self.upstreams)

    def healthy_count(self, down: Container[str]) -> int:
        return sum(1 for u in self.upstreams if u not in down)

    def next_upstream(self, down: Container[str], exclude: str | None = None) -> str | None:
        """The next healthy upstream in round-robin order (None when none is)."""
        n = len(self.upstreams)
        start = self._cursor
        for i in range(n):
            url = self.upstreams[(start + i) % n]
            if url not in down and url != exclude:
                self._cursor = (start + i + 1) % n
                return url
        return None


@dataclass(slots=True, eq=False)
class EndpointState:
    name: str
    variants: tuple[VariantState, ...]
    max_payload_bytes: int
    #: Serverless endpoints: the activator's limits (None: real-time routing).
    serverless: ServerlessRoute | None = None
    by_name: dict[str, VariantState] = field(default_factory=dict)
    #: Variants that take unpinned traffic (weight above 0), in table order.
    weighted: tuple[VariantState, ...] = ()
    weights: tuple[float, ...] = ()
    #: What sees each answered invocation (``gateway.taps``); set by ``GatewayCore.apply``.
    #: Empty for most endpoints: the hot path checks it and does nothing more.
    taps: tuple[Tap, ...] = ()
    #: Production variant name -> its routes (two during a guarded rollout), for
    #: ``TargetVariant``.
    targets: dict[str, tuple[VariantState, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.by_name = {v.name: v for v in self.variants}
        for v in self.variants:
            self.targets[v.production] = (*self.targets.get(v.production, ()), v)
        self.weighted = tuple(v for v in self.variants if v.weight > 0)
        self.weights = tuple(v.weight for v in self.weighted)

    def variant_names(self) -> str:
        return ", ".join(self.targets) or "(none)"


@dataclass(slots=True, eq=False)
class RouteState:
    """A compiled route table: what the hot path reads."""

    revision: int = 0
    endpoints: dict[str, EndpointState] = field(default_factory=dict)

    def upstreams(self) -> set[str]:
        return {u for ep in self.endpoints.values() for v in ep.variants for u in v.upstreams}


def compile_endpoint(route: EndpointRoute, admission: ShedPolicy | None = None) -> EndpointState:
    """``admission``: the gateway's default bounds for real-time variants (None: none)."""
    def bounds(v: VariantRoute) -> ShedPolicy | None:
        if admission is None or route.serverless is not None or route.type == "Async":
            return None
        wait = admission.max_wait_s if v.max_queue_wait_s is None else v.max_queue_wait_s
        return replace(admission, fixed_per_upstream=v.max_in_flight_per_upstream,
                       max_wait_s=wait)

    return EndpointState(
        name=route.name,
        variants=tuple(
            VariantState(name=v.name, weight=v.weight, upstreams=tuple(dict.fromkeys(v.upstreams)),
                         admission=bounds(v), production=v.production_variant or "")
            for v in route.variants
        ),
        max_payload_bytes=route.max_payload_bytes,
        serverless=route.serverless,
    )


def compile_table(table: RouteTable, admission: ShedPolicy | None = None) -> RouteState:
    """Turn a validated route table into the state the hot path reads.

    Endpoints are keyed by their ``name`` field (what clients put in the URL),
    not by the dictionary key, so a table whose key and name differ still
    routes by the name users know.
    """
    endpoints = {route.name: compile_endpoint(route, admission)
                 for route in table.endpoints.values()}
    return RouteState(revision=table.revision, endpoints=endpoints)


def pick_weighted(weights: Sequence[float], r: float) -> int | None:
    """Index drawn with probability proportional to its weight.

    ``r`` is a uniform draw in [0, 1). Weights of 0 (or below) are never
    drawn; None when no weight is above 0.
    """
    total = 0.0
    for w in weights:
        if w > 0:
            total += w
    if total <= 0:
        return None
    x = r * total
    acc = 0.0
    last = None
    for i, w in enumerate(weights):
        if w <= 0:
            continue
        acc += w
        last = i
        if x < acc:
            return i
    # Only float rounding lands here (r * total == total): the last positive one.
    return last


@dataclass(frozen=True, slots=True)
class Pick:
    variant: VariantState
    upstream: str


#: Why a request cannot be routed. Returned, not raised: refusing is a normal
#: outcome of choosing, and the hot path renders it with ``errors.render_error``.
Refusal = RuntimeServiceError


def unknown_endpoint(name: str) -> Refusal:
    return NotFound(f'Endpoint "{name}" not found: check EndpointName, or wait until the '
                    "endpoint is Ready")


def _no_healthy(endpoint: EndpointState, variant: VariantState) -> Refusal:
    return NotReady(f'Variant "{variant.name}" of endpoint "{endpoint.name}" has no healthy '
                    "model server: retry later, or set TargetVariant to another variant")


def _pick_in(group: tuple[VariantState, ...], down: Container[str],
             rng: random.Random) -> VariantState:
    """One route of a production variant served by several (a guarded rollout): drawn by
    weight among the healthy ones; the first healthy (else the first) when none weighs."""
    healthy = [v for v in group if v.has_healthy(down)] or list(group)
    i = pick_weighted([v.weight for v in healthy], rng.random())
    return healthy[i if i is not None else 0]


def choose(endpoint: EndpointState, target: str | None, down: Container[str],
           rng: random.Random) -> Pick | Refusal:
    """Choose the variant and upstream for one request."""
    if target is not None:
        group = endpoint.targets.get(target)
        if group is None:
            return NotFound(f'Variant "{target}" not found on endpoint "{endpoint.name}": set '
                            f"TargetVariant to one of {endpoint.variant_names()}")
        variant = group[0] if len(group) == 1 else _pick_in(group, down, rng)
        url = variant.next_upstream(down)
        if url is None:
            return _no_healthy(endpoint, variant)
        return Pick(variant, url)

    weighted = endpoint.weighted
    if not weighted:
        return NotReady(f'Endpoint "{endpoint.name}" has no variant with a weight above 0: set '
                        f"TargetVariant to one of {endpoint.variant_names()}, or give a variant "
                        "a weight")
    if len(weighted) == 1:
        first = weighted[0]
    else:
        i = pick_weighted(endpoint.weights, rng.random())
        assert i is not None  # every weighted variant has a weight above 0
        first = weighted[i]
    url = first.next_upstream(down)
    if url is not None:
        return Pick(first, url)

    # The drawn variant has nothing healthy: draw again among those that do.
    healthy = [v for v in weighted if v is not first and v.has_healthy(down)]
    if not healthy:
        return _no_healthy(endpoint, first)
    j = pick_weighted([v.weight for v in healthy], rng.random())
    assert j is not None
    second = healthy[j]
    url = second.next_upstream(down)
    assert url is not None  # has_healthy() said so, and nothing ran in between
    return Pick(second, url)
