"""Async endpoints' queue backlogs, read from the operator's Redis for the cluster scaler.

Its own module because it is the scaler's only Redis client: one connection
for every async Endpoint, made on first use, with the URL the chart gives the
operator (``KUBEINFER_REDIS_URL``, the same Redis the gateways and workers use).
"""

from __future__ import annotations

from typing import Any

from kubeinfer_operator.queue_backlog import read_backlog
from kubeinfer_runtime.contract import AsyncBacklog


class BacklogReader:
    """Reads queue backlogs from one Redis (async client made on first use)."""

    def __init__(self, redis_url: str | None) -> None:
        self.redis_url = redis_url
        self._client: Any = None

    async def __call__(self, queue: str) -> AsyncBacklog:
        import redis.asyncio

        if self.redis_url is None:
            # Endpoint sync reports this as InvalidSpec before the scaler ever asks.
            raise RuntimeError("Async endpoints need the operator's KUBEINFER_REDIS_URL: set "
                               "runtime.redis.url in the Helm values")
        if self._client is None:
            self._client = redis.asyncio.from_url(self.redis_url, decode_responses=True)
        return await read_backlog(self._client, queue)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
