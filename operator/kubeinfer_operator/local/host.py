"""What the scalers of one local endpoint need from its supervisor: small Protocols.

``LocalScaler`` and ``AsyncLocal`` run inside the ``Supervisor`` and act on
its processes, but the supervisor also creates them: typing them against the
``Supervisor`` class made ``supervisor`` ↔ ``scaler`` ↔ ``async_local`` an
import cycle. They are typed against these Protocols instead, which name only
the part of the supervisor each one uses, so the arrows point one way:
``supervisor`` → ``scaler`` / ``async_local`` → ``host``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Protocol

import httpx

from kubeinfer_operator.local.backoff import BackoffPolicy
from kubeinfer_operator.local.children import Child
from kubeinfer_operator.local.paths import EndpointPaths
from kubeinfer_operator.render.plan import EndpointPlan, VariantPlan
from kubeinfer_runtime.contract.outbound import OutboundPolicy


class Scales(Protocol):
    """Starts or stops a variant's processes (``LocalScaler.scale``)."""

    async def scale(self, name: str, current: int, desired: int, reason: str) -> bool: ...


class EndpointHost(Protocol):
    """The supervisor of one endpoint, as its scalers see it."""

    paths: EndpointPaths
    policy: BackoffPolicy
    gateway: Child | None
    #: Variants the route table serves, by name.
    running: dict[str, VariantPlan]
    applying: bool
    started: bool
    stopping: bool
    outbound: OutboundPolicy
    _client: httpx.AsyncClient | None

    @property
    def name(self) -> str: ...

    def event(self, message: str, *, level: str = "info",
              process: str | None = None) -> None: ...

    def write_state(self) -> None: ...

    def current_plan(self) -> EndpointPlan: ...

    def rolling_out(self, variant: str) -> bool:
        """Whether ``variant``'s guarded rollout runs (its scaling holds meanwhile)."""
        ...

    def _variant_children(self, variant: str, *,
                          active: bool | None = None) -> list[Child]: ...

    async def drain(self, children: list[Child]) -> None: ...

    async def start_and_route(self, name: str, plan: VariantPlan, replicas: Iterable[int],
                              wait: Callable[[list[Child]], Awaitable[str | None]]
                              ) -> str | None: ...


class AsyncHost(EndpointHost, Protocol):
    """An async endpoint's supervisor: its workers scale through ``scaler``."""

    @property
    def scaler(self) -> Scales: ...
