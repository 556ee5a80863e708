"""Enqueue an async request exactly once per InferenceId: the gateway's Redis side.

One Lua script does it atomically on the Redis server: if the request's id
hash exists, the id was seen (idempotent retry: nothing is queued again, and
the first request's output and failure locations are answered, even when the
retry named another S3OutputPathExtension or Filename: the first accepted
request wins); otherwise the entry is XADDed to the endpoint's stream and the
id hash created, with the locations, and a TTL. Atomic matters: a gateway that
dies between "remember the id" and "queue it" would otherwise leave an id that
is never processed. The script also creates the consumer group at id 0 when
missing, so requests that arrive while no worker exists (scaled to zero) are
all delivered once one starts.

A new request is refused (``QueueFull``, the caller's 429) while the stream holds
the route's ``max_queued`` entries: finished entries leave the stream, so its
length is what is queued or in progress, and without a bound any caller could
fill the Redis every async endpoint may share. An id seen before is answered
even then: a retry of an accepted request is not new work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kubeinfer_runtime.contract import AsyncQueueKeys
from kubeinfer_runtime.queue.request import AsyncRequest

#: How long an id is remembered after its request expires (idempotency window).
DEDUPE_EXTRA_S = 86400

# ARGV: group, TTL, output location, failure location, most entries, then the entry's
# fields. A missing hash field reads as false in Lua: `or ''` keeps the reply's array whole.
_SUBMIT = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {0, redis.call('HGET', KEYS[1], 'output_location') or '',
          redis.call('HGET', KEYS[1], 'failure_location') or ''}
end
local queued = redis.call('XLEN', KEYS[2])
if queued >= tonumber(ARGV[5]) then
  return {2, tostring(queued), ''}
end
redis.pcall('XGROUP', 'CREATE', KEYS[2], ARGV[1], '0', 'MKSTREAM')
local id = redis.call('XADD', KEYS[2], '*', unpack(ARGV, 6))
redis.call('HSET', KEYS[1], 'msg', id, 'attempts', 0, 'output_location', ARGV[3],
           'failure_location', ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return {1, ARGV[3], ARGV[4]}
"""


class QueueFull(Exception):
    """The endpoint's stream holds ``max_queued`` requests: this one was not queued."""

    def __init__(self, queued: int) -> None:
        super().__init__(f"{queued} requests queued or in progress")
        self.queued = queued


@dataclass(frozen=True)
class Accepted:
    """What the gateway answers: the locations of the request in force for the id."""

    #: False: the InferenceId was queued before; nothing was queued this time.
    created: bool
    output_location: str
    failure_location: str


class Producer:
    """Submits requests to endpoint queues over one async Redis client."""

    def __init__(self, redis: Any) -> None:
        self.redis = redis
        self._script = redis.register_script(_SUBMIT)

    async def submit(self, keys: AsyncQueueKeys, req: AsyncRequest, *,
                     max_queued: int) -> Accepted:
        """Queue ``req`` unless its InferenceId was queued before; either way, where the
        id's output and failure objects go (the first accepted request's locations).
        QueueFull when a new request finds ``max_queued`` queued or in progress."""
        ttl = int(req.expires_at - req.received_at + req.invocation_timeout_s) + DEDUPE_EXTRA_S
        args: list[str] = [keys.group, str(ttl), req.output_location, req.failure_location,
                           str(max_queued)]
        for k, v in req.to_fields().items():
            args += [k, v]
        created, output, failure = await self._script(
            keys=[keys.inference(req.inference_id), keys.stream], args=args)
        if int(created) == 2:
            raise QueueFull(int(output))
        # An id hash written before locations were stored in it (an older gateway)
        # has none: its request used the default locations, as ``req`` then does.
        return Accepted(created=bool(int(created)), output_location=output or req.output_location,
                        failure_location=failure or req.failure_location)
