"""Backlog scaling of async endpoints' worker Deployments on Kubernetes.

The operator's ``ClusterScaler`` is the one writer of variant replicas; for a
``type: Async`` endpoint it hands the decision to :func:`evaluate_async`,
which reads the queue backlog from Redis (``KUBEINFER_REDIS_URL`` of the
operator, the same Redis the gateway and workers use), asks the pure
``reconcile.async_scaling.decide`` and stores the desired replicas where
``ClusterScaler.replicas_for`` picks them up when ``sync`` renders the worker
Deployment — down to zero when idle, up from zero when work arrives.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from kubeinfer_operator.queue_backlog import read_backlog
from kubeinfer_operator.reconcile.async_scaling import BacklogState, decide
from kubeinfer_operator.render.plan import EndpointPlan
from kubeinfer_runtime.contract import AsyncBacklog

if TYPE_CHECKING:
    from kubeinfer_operator.handlers.scaler import ClusterScaler

log = logging.getLogger(__name__)

ReadBacklog = Callable[[str], Awaitable[AsyncBacklog]]


class BacklogReader:
    """Reads queue backlogs from one Redis (async client made on first use)."""

    def __init__(self, redis_url: str | None) -> None:
        self.redis_url = redis_url
        self._client: Any = None
        #: The policy's memory per (namespace, endpoint), between rounds.
        self.states: dict[tuple[str, str], BacklogState] = {}

    async def __call__(self, queue: str) -> AsyncBacklog:
        import redis.asyncio

        if self.redis_url is None:
            raise RuntimeError("Async endpoints need the operator's KUBEINFER_REDIS_URL: set "
                               "redis.url in the Helm values")
        if self._client is None:
            self._client = redis.asyncio.from_url(self.redis_url, decode_responses=True)
        return await read_backlog(self._client, queue)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


async def evaluate_async(scaler: ClusterScaler, plan: EndpointPlan, namespace: str,
                         current: Mapping[str, int], read: ReadBacklog,
                         states: dict[tuple[str, str], BacklogState],
                         now: float | None = None) -> list[str]:
    """Decide the worker replicas of an async ``plan``; returns the change messages."""
    cfg = plan.async_config
    if cfg is None or not plan.variants:
        return []
    variant = plan.variants[0]  # Async endpoints have exactly one variant
    try:
        backlog = await read(cfg.queue)
    except Exception as exc:
        log.warning("Endpoint %s/%s: cannot read the async backlog (%s); replicas unchanged",
                    namespace, plan.name, exc)
        return []
    key = (namespace, plan.name)
    replicas = current.get(variant.name, variant.replicas)
    d = decide(cfg.policy, replicas, backlog.total, states.get(key, BacklogState()),
               time.monotonic() if now is None else now)
    states[key] = d.state
    mem = scaler._mem((namespace, plan.name, variant.name))
    mem.desired = d.desired
    if d.desired == replicas:
        return []
    mem.reason = d.reason
    message = f"Variant {variant.name}: {d.reason}"
    log.info("Endpoint %s/%s: %s", namespace, plan.name, message)
    return [message]
