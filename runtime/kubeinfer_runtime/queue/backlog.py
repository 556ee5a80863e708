"""Read an async endpoint's backlog from Redis and export it as metrics.

The arithmetic is ``contract.AsyncBacklog`` (shared with the local supervisor
and the operator, which scale the workers on it); this is the gateway's I/O:
it serves every async endpoint and keeps running while workers are at zero,
so it is the one that exports ``ApproximateBacklogSizePerInstance``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from kubeinfer_runtime import metrics
from kubeinfer_runtime.contract import AsyncBacklog, AsyncQueueKeys

log = logging.getLogger("kubeinfer.queue")


async def read_backlog(redis: Any, keys: AsyncQueueKeys) -> AsyncBacklog:
    """The backlog of one queue (asyncio redis client); zero before the first request."""
    import redis.exceptions

    try:
        groups = await redis.xinfo_groups(keys.stream)
    except redis.exceptions.ResponseError:
        return AsyncBacklog()  # no stream yet: nothing was ever submitted
    try:
        consumers = await redis.xinfo_consumers(keys.stream, keys.group)
    except redis.exceptions.ResponseError:
        consumers = []
    length = int(await redis.xlen(keys.stream))
    return AsyncBacklog.from_xinfo(groups, consumers, keys.group, length)


async def oldest_age_s(redis: Any, keys: AsyncQueueKeys, now: float) -> float:
    """Age of the oldest unacknowledged or undelivered entry (0 when none)."""
    summary = await redis.xpending(keys.stream, keys.group)
    first = summary.get("min") if summary and summary.get("pending") else None
    if first is None:
        groups = await redis.xinfo_groups(keys.stream)
        last = next((g.get("last-delivered-id") for g in groups
                     if str(g.get("name")) == keys.group), None)
        entries = await redis.xrange(keys.stream, min=f"({last}" if last else "-", count=1)
        if not entries:
            return 0.0
        first = entries[0][0]
    ms = int(str(first).split("-", 1)[0])
    return max(now - ms / 1000.0, 0.0)


async def backlog_loop(redis: Any, queues: Callable[[], dict[str, AsyncQueueKeys]],
                       interval_s: float = 1.0) -> None:
    """Export every async endpoint's backlog every ``interval_s`` until cancelled."""
    import redis.exceptions

    while True:
        for endpoint, keys in queues().items():
            with contextlib.suppress(redis.exceptions.RedisError, OSError):
                b = await read_backlog(redis, keys)
                metrics.ASYNC_BACKLOG.labels(endpoint).set(b.total)
                metrics.ASYNC_BACKLOG_PER_INSTANCE.labels(endpoint).set(b.per_instance)
                age = await oldest_age_s(redis, keys, time.time()) if b.total else 0.0
                metrics.ASYNC_OLDEST_AGE_SECONDS.labels(endpoint).set(age)
        await asyncio.sleep(interval_s)
