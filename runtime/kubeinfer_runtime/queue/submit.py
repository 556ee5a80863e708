"""``POST /endpoints/{name}/async-invocations``: the gateway accepts an async request.

The payload never passes through the gateway: the client uploads it first and
names it in ``X-Amzn-SageMaker-InputLocation``, so inputs of any size (1 GB
and more) cost the gateway one header. It answers 202 with the InferenceId and
the output and failure locations (as ``invoke_endpoint_async`` expects; placed
by the client's S3OutputPathExtension and Filename) once the request is durably
queued in Redis; the same InferenceId again answers the first request's 202
(its locations too) without queuing a second inference.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

from kubeinfer_runtime import metrics
from kubeinfer_runtime.contract import (
    H_FAILURE_LOCATION,
    H_OUTPUT_LOCATION,
    AsyncRoute,
    EndpointRoute,
)
from kubeinfer_runtime.contract.redact import redact_url
from kubeinfer_runtime.errors import (
    NotReady,
    PayloadTooLarge,
    Reply,
    RuntimeServiceError,
    Throttled,
    ValidationError,
    render_error,
)
from kubeinfer_runtime.gateway.body import ClientGone, read_body
from kubeinfer_runtime.gateway.headers import request_target
from kubeinfer_runtime.queue.producer import Producer, QueueFull
from kubeinfer_runtime.queue.request import parse_async_request

log = logging.getLogger("kubeinfer.gateway")


Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


#: InvokeEndpointAsync sends no body (the payload is the InputLocation object):
#: whatever a caller sends is read up to this, for its signature, and refused beyond.
MAX_BODY_BYTES = 64 * 1024
#: Retry-After of a 429 for a full queue, seconds: workers drain it at their own pace.
QUEUE_FULL_RETRY_AFTER_S = 5

#: Checks a caller: (endpoint, target, raw headers, body) -> the reply refusing it, or None.
Authenticate = Callable[[str, bytes, list[tuple[bytes, bytes]], bytes], Reply | None]


class AsyncSubmitHandler:
    """Answers async invocations for the endpoints of the route table in force.

    One Redis client per URL (the route's, else the gateway's own setting),
    made on first use and kept for the process's life. ``authenticate`` checks
    callers as the real-time route does, before anything is parsed or queued.
    """

    def __init__(self, redis_url: str | None, authenticate: Authenticate | None = None) -> None:
        self.redis_url = redis_url
        self.authenticate = authenticate
        self._clients: dict[str, tuple[Any, Producer]] = {}

    def client(self, url: str) -> tuple[Any, Producer]:
        found = self._clients.get(url)
        if found is None:
            import redis.asyncio
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff

            # One retry on a new connection: after Redis restarts, each pooled
            # connection fails its next command at once, and without it that command
            # would be a client's 503. The submit script is idempotent per
            # InferenceId, so a command that ran but lost its reply is safe to resend.
            client = redis.asyncio.from_url(url, decode_responses=True,
                                            retry=Retry(NoBackoff(), 1))
            found = self._clients[url] = (client, Producer(client))
        return found

    def url_of(self, route: AsyncRoute) -> str | None:
        return route.redis_url or self.redis_url

    async def close(self) -> None:
        for client, _ in self._clients.values():
            await client.aclose()
        self._clients = {}

    async def refuse_sync(self, send: Send, name: str) -> None:
        """A synchronous InvokeEndpoint on an async endpoint (SageMaker refuses it too)."""
        status, headers, body = render_error(ValidationError(
            f'Endpoint "{name}" is asynchronous: call InvokeEndpointAsync '
            f"(POST /endpoints/{name}/async-invocations with X-Amzn-SageMaker-InputLocation)"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send,
                       endpoint: EndpointRoute | None, name: str) -> None:
        try:
            body = await read_body(receive, MAX_BODY_BYTES)
            if body is None:
                raise PayloadTooLarge(
                    f'InvokeEndpointAsync request to endpoint "{name}" has a body over '
                    f"{MAX_BODY_BYTES} bytes: upload the payload and name it in "
                    "X-Amzn-SageMaker-InputLocation instead")
            denied = None
            if endpoint is not None and self.authenticate is not None:
                denied = self.authenticate(name, request_target(scope), scope["headers"], body)
            if denied is not None:
                status, headers, body = denied
            else:
                status, headers, body = await self._handle(scope, endpoint, name)
        except ClientGone:
            return
        except RuntimeServiceError as err:
            status, headers, body = render_error(err)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _handle(self, scope: Scope, endpoint: EndpointRoute | None,
                      name: str) -> Reply:
        from kubeinfer_runtime.errors import NotFound

        if endpoint is None:
            raise NotFound(f'Endpoint "{name}" does not exist: check the name (kubectl get '
                           "endpoints.kubeinfer.io)")
        route = endpoint.async_config
        if endpoint.type != "Async" or route is None:
            raise ValidationError(f'Endpoint "{name}" is not asynchronous (type '
                                  f"{endpoint.type}): use /endpoints/{name}/invocations, or "
                                  "set spec.type: Async")
        url = self.url_of(route)
        if url is None:
            raise NotReady(f'Endpoint "{name}" is asynchronous but names no Redis: set '
                           "KUBEINFER_REDIS_URL on the gateway")
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        req = parse_async_request(name, route, headers)
        _, producer = self.client(url)
        try:
            accepted = await producer.submit(route.keys, req, max_queued=route.max_queued)
        except QueueFull as full:
            metrics.ASYNC_REFUSED.labels(name).inc()  # a route table's name: bounded
            throttled = Throttled(
                f'Endpoint "{name}" holds {full.queued} requests queued or in progress, its '
                f"spec.async.maxQueuedRequests ({route.max_queued}): retry after "
                f"{QUEUE_FULL_RETRY_AFTER_S} s, or add workers (spec.async.scaling)")
            throttled.headers = [(b"retry-after", str(QUEUE_FULL_RETRY_AFTER_S).encode())]
            raise throttled from None
        except Exception as e:
            log.warning("Queueing async request %s of endpoint %s failed: %s",
                        req.inference_id, name, e)
            raise NotReady(f'Endpoint "{name}" cannot queue the request: Redis at '
                           f"{redact_url(url)} failed ({type(e).__name__}): retry with the "
                           "same InferenceId (it is idempotent)") from None
        if not accepted.created:
            log.info("Async request %s of endpoint %s was already queued: not queued again",
                     req.inference_id, name)
        body = orjson.dumps({"InferenceId": req.inference_id,
                             "OutputLocation": accepted.output_location,
                             "FailureLocation": accepted.failure_location})
        return 202, [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (H_OUTPUT_LOCATION.encode(), accepted.output_location.encode()),
            (H_FAILURE_LOCATION.encode(), accepted.failure_location.encode()),
        ], body
