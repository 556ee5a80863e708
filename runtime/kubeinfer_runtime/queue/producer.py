"""Enqueue an async request exactly once per InferenceId: the gateway's Redis side.

One Lua script does it atomically on the Redis server: if the request's id
hash exists, the id was seen (idempotent retry: nothing is queued again);
otherwise the entry is XADDed to the endpoint's stream and the id hash created
with a TTL. Atomic matters: a gateway that dies between "remember the id" and
"queue it" would otherwise leave an id that is never processed. The script
also creates the consumer group at id 0 when missing, so requests that arrive
while no worker exists (scaled to zero) are all delivered once one starts.
"""

from __future__ import annotations

from typing import Any

from kubeinfer_runtime.contract import AsyncQueueKeys
from kubeinfer_runtime.queue.request import AsyncRequest

#: How long an id is remembered after its request expires (idempotency window).
DEDUPE_EXTRA_S = 86400

_SUBMIT = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.pcall('XGROUP', 'CREATE', KEYS[2], ARGV[1], '0', 'MKSTREAM')
local id = redis.call('XADD', KEYS[2], '*', unpack(ARGV, 3))
redis.call('HSET', KEYS[1], 'msg', id, 'attempts', 0)
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""


class Producer:
    """Submits requests to endpoint queues over one async Redis client."""

    def __init__(self, redis: Any) -> None:
        self.redis = redis
        self._script = redis.register_script(_SUBMIT)

    async def submit(self, keys: AsyncQueueKeys, req: AsyncRequest) -> bool:
        """Queue ``req``; False when its InferenceId was already queued (not queued again)."""
        ttl = int(req.expires_at - req.received_at + req.invocation_timeout_s) + DEDUPE_EXTRA_S
        args: list[str] = [keys.group, str(ttl)]
        for k, v in req.to_fields().items():
            args += [k, v]
        created = await self._script(keys=[keys.inference(req.inference_id), keys.stream],
                                     args=args)
        return bool(created)
