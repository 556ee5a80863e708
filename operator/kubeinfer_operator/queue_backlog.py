"""Read an async endpoint's queue backlog from Redis: one place for both backends.

The operator's scaler (``scaling/backlog.py``) and local mode
(``local/async_local.py``) scale workers on the same number, so they read it
the same way: XINFO GROUPS / CONSUMERS and XLEN of the endpoint's stream,
turned into ``contract.AsyncBacklog``.
"""

from __future__ import annotations

from typing import Any

from kubeinfer_runtime.contract import AsyncBacklog, AsyncQueueKeys


async def read_backlog(client: Any, queue: str) -> AsyncBacklog:
    """The backlog of ``queue`` through a ``redis.asyncio`` client (decode_responses=True)."""
    import redis.exceptions

    keys = AsyncQueueKeys(queue=queue)
    try:
        groups = await client.xinfo_groups(keys.stream)
    except redis.exceptions.ResponseError:
        return AsyncBacklog()  # nothing submitted yet: no stream
    try:
        consumers = await client.xinfo_consumers(keys.stream, keys.group)
    except redis.exceptions.ResponseError:
        consumers = []
    length = int(await client.xlen(keys.stream))
    return AsyncBacklog.from_xinfo(groups, consumers, keys.group, length)
