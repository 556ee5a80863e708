"""Async endpoints' queues in the operator's Redis: backlogs for the cluster scaler, and
removal of a deleted Endpoint's queue.

Its own module because it is the operator's only Redis client for queues: one
connection for every async Endpoint, made on first use, with the URL the chart
gives the operator (``KUBEINFER_REDIS_URL``, the same Redis the gateways and
workers use). A deleted Endpoint's stream and dead letters are removed (its
requests' hashes expire on their own): nothing would ever read them again, and a
deleted Endpoint's backlog of up to ``maxQueuedRequests`` would otherwise hold
Redis memory for good, in a Redis every namespace may share.
"""

from __future__ import annotations

from typing import Any

from kubeinfer_operator.queue_backlog import read_backlog
from kubeinfer_runtime.contract import AsyncBacklog, AsyncQueueKeys


class BacklogReader:
    """Reads queue backlogs from one Redis (async client made on first use)."""

    def __init__(self, redis_url: str | None) -> None:
        self.redis_url = redis_url
        self._client: Any = None

    def _redis(self) -> Any:
        import redis.asyncio

        if self.redis_url is None:
            # Endpoint sync reports this as InvalidSpec before the scaler ever asks.
            raise RuntimeError("Async endpoints need the operator's KUBEINFER_REDIS_URL: set "
                               "runtime.redis.url in the Helm values")
        if self._client is None:
            self._client = redis.asyncio.from_url(self.redis_url, decode_responses=True)
        return self._client

    async def __call__(self, queue: str) -> AsyncBacklog:
        return await read_backlog(self._redis(), queue)

    async def drop(self, queue: str) -> int:
        """Remove ``queue``'s stream and dead letters (none when the operator has no
        Redis); how many of the two keys existed."""
        if self.redis_url is None:
            return 0
        keys = AsyncQueueKeys(queue=queue)
        return int(await self._redis().unlink(keys.stream, keys.dead_letter))

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
