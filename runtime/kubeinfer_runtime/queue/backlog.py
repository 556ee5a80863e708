"""Read an async endpoint's backlog from Redis and export it as metrics.

The arithmetic is ``contract.AsyncBacklog`` (shared with the local supervisor
and the operator, which scale the workers on it); this is the gateway's I/O:
it serves every async endpoint and keeps running while workers are at zero,
so it is the one that exports ``ApproximateBacklogSizePerInstance``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from kubeinfer_runtime import metrics
from kubeinfer_runtime.contract import AsyncBacklog, AsyncQueueKeys

log = logging.getLogger("kubeinfer.queue")


async def read_backlog(client: Any, keys: AsyncQueueKeys) -> AsyncBacklog:
    """The backlog of one queue (asyncio redis client); zero before the first request."""
    from redis.exceptions import ResponseError

    try:
        groups = await client.xinfo_groups(keys.stream)
    except ResponseError:
        return AsyncBacklog()  # no stream yet: nothing was ever submitted
    try:
        consumers = await client.xinfo_consumers(keys.stream, keys.group)
    except ResponseError:
        consumers = []
    length = int(await client.xlen(keys.stream))
    return AsyncBacklog.from_xinfo(groups, consumers, keys.group, length)


async def oldest_age_s(client: Any, keys: AsyncQueueKeys, now: float) -> float:
    """Age of the oldest unacknowledged or undelivered entry (0 when none)."""
    summary = await client.xpending(keys.stream, keys.group)
    first = summary.get("min") if summary and summary.get("pending") else None
    if first is None:
        groups = await client.xinfo_groups(keys.stream)
        last = next((g.get("last-delivered-id") for g in groups
                     if str(g.get("name")) == keys.group), None)
        entries = await client.xrange(keys.stream, min=f"({last}" if last else "-", count=1)
        if not entries:
            return 0.0
        first = entries[0][0]
    ms = int(str(first).split("-", 1)[0])
    return max(now - ms / 1000.0, 0.0)


async def backlog_loop(queues: Callable[[], dict[str, tuple[Any, AsyncQueueKeys]]],
                       interval_s: float = 1.0) -> None:
    """Export every async endpoint's backlog every ``interval_s`` until cancelled.

    ``queues`` maps endpoint name to (redis client, queue keys) as of now.
    """
    failing: set[str] = set()
    while True:
        for endpoint, (client, keys) in queues().items():
            try:
                b = await read_backlog(client, keys)
                age = await oldest_age_s(client, keys, time.time()) if b.total else 0.0
            except Exception as e:  # Redis down or restarting: keep the loop alive
                if endpoint not in failing:
                    log.warning("Cannot read the async backlog of endpoint %s (%s: %s): "
                                "retrying every %gs", endpoint, type(e).__name__, e, interval_s)
                failing.add(endpoint)
                continue
            failing.discard(endpoint)
            metrics.ASYNC_BACKLOG.labels(endpoint).set(b.total)
            metrics.ASYNC_BACKLOG_PER_INSTANCE.labels(endpoint).set(b.per_instance)
            metrics.ASYNC_OLDEST_AGE_SECONDS.labels(endpoint).set(age)
        await asyncio.sleep(interval_s)
