"""The model server's hot paths as a lean raw-ASGI layer in front of FastAPI.

``POST /invocations`` and ``POST /v2/models/{m}/infer`` carry all the traffic,
so they skip FastAPI's routing, dependency injection and pydantic entirely:
check the path, read the body (enforcing the payload limit as it arrives),
decode with the codec, predict, encode, send. Everything else (health,
metadata, metrics, docs) falls through to the FastAPI app, where per-request
cost does not matter.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kubeinfer_runtime import codec
from kubeinfer_runtime.errors import (
    Internal,
    NotFound,
    PayloadTooLarge,
    RuntimeServiceError,
    ValidationError,
    render_error,
)
from kubeinfer_runtime.metrics import ModelServerMetrics
from kubeinfer_runtime.server.json_lane import LANE_CONTENT_TYPES
from kubeinfer_runtime.server.state import LoadedModel, ModelSlot

log = logging.getLogger("kubeinfer.server")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_V2_PREFIX = "/v2/models/"
_V2_SUFFIX = "/infer"
_JSON = b"application/json"


class ClientDisconnected(Exception):
    """The client went away before sending the whole body: nothing to answer."""


class InferenceService:
    """What the hot path needs: the model slot, metrics, pool and payload limit."""

    def __init__(self, slot: ModelSlot, metrics: ModelServerMetrics,
                 pool: ThreadPoolExecutor, max_payload_bytes: int) -> None:
        self.slot = slot
        self.metrics = metrics
        self.pool = pool
        self.max_payload_bytes = max_payload_bytes


# The work of one request, decode -> predict -> encode, as one plain function:
# called directly when the model runs inline, or handed to the pool whole (one
# thread hop for all three steps). Returns (response body, model seconds).


def invocations_work(model: LoadedModel, body: bytes, content_type: str | None,
                     encoding: codec.Encoding) -> tuple[bytes, float]:
    inputs = codec.decode_request(body, content_type, model.meta.inputs)
    t0 = time.perf_counter()
    outputs = model.backend.predict(inputs)
    model_s = time.perf_counter() - t0
    return codec.encode_response(outputs, encoding), model_s


def v2_work(model: LoadedModel, body: bytes, model_name: str) -> tuple[bytes, float]:
    req = codec.decode_v2(body, model.meta)
    t0 = time.perf_counter()
    outputs = model.backend.predict(req.inputs, req.output_names)
    model_s = time.perf_counter() - t0
    return codec.encode_v2(outputs, model_name, model.version, req.id), model_s


class HotPath:
    """ASGI app: serves the two inference routes itself, delegates the rest to ``app``."""

    def __init__(self, app: ASGIApp, service: InferenceService, model_name: str) -> None:
        self.app = app
        self.service = service
        self.model_name = model_name

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path: str = scope["path"]
            if path == "/invocations":
                await self._handle(scope, receive, send, None)
                return
            if path.startswith(_V2_PREFIX) and path.endswith(_V2_SUFFIX):
                await self._handle(scope, receive, send,
                                   path[len(_V2_PREFIX):-len(_V2_SUFFIX)])
                return
        await self.app(scope, receive, send)

    async def _handle(self, scope: Scope, receive: Receive, send: Send,
                      v2_target: str | None) -> None:
        svc = self.service
        t0 = time.perf_counter()
        svc.metrics.invocations.value += 1  # a loop counter: no call, no lock

        # The common case inline, without a closure or an extra coroutine: on a
        # 6 µs model every µs of the request's own cost shows in throughput.
        try:
            if scope["method"] != "POST":
                raise ValidationError(f"{scope['method']} is not allowed on {scope['path']}: "
                                      "use POST", status=405)
            content_type, accept, length = _headers(scope["headers"])
            if v2_target is None:
                # Negotiate before reading and running anything: a request we
                # cannot answer should cost nothing.
                encoding = codec.negotiate(accept)
                out_type = encoding.content_type
            else:
                self._check_v2_target(v2_target)
                out_type = _JSON
            model = svc.slot.get()
            body = await read_body(receive, length, svc.max_payload_bytes)
            if v2_target is None:
                if model.inline:
                    lane = model.json_lane
                    done = (lane(body) if lane is not None and encoding is codec.Encoding.JSON
                            and codec.media_type(content_type) in LANE_CONTENT_TYPES else None)
                    payload, model_s = done if done is not None else invocations_work(
                        model, body, content_type, encoding)
                else:
                    payload, model_s = await asyncio.get_running_loop().run_in_executor(
                        svc.pool, invocations_work, model, body, content_type, encoding)
            elif model.inline:
                payload, model_s = v2_work(model, body, self.model_name)
            else:
                payload, model_s = await asyncio.get_running_loop().run_in_executor(
                    svc.pool, v2_work, model, body, self.model_name)
        except Exception as exc:
            await answer_error(send, svc.metrics, scope["path"], exc)
            return
        await answer(send, svc.metrics, t0, payload, out_type, model_s)

    def _check_v2_target(self, target: str) -> None:
        # "{m}" or "{m}/versions/{v}"; any version of the one model we serve.
        name = target.split("/versions/", 1)[0]
        if name != self.model_name or not name:
            raise NotFound(f'Model "{name}" is not served here: this server serves '
                           f'"{self.model_name}" (GET /v2/models/{self.model_name})')


def _headers(raw: list[tuple[bytes, bytes]]) -> tuple[str | None, str | None, int | None]:
    content_type = accept = None
    length: int | None = None
    for k, v in raw:
        if k == b"content-type":
            content_type = v.decode("latin-1")
        elif k == b"accept":
            accept = v.decode("latin-1")
        elif k == b"content-length":
            try:
                length = int(v)
            except ValueError:
                raise ValidationError("Content-Length is not a number") from None
    return content_type, accept, length


async def read_body(receive: Receive, declared: int | None, limit: int) -> bytes:
    """The request body, refusing it (413) as soon as it is known to exceed ``limit``.

    A declared Content-Length over the limit is refused before reading a byte.
    """
    if declared is not None and declared > limit:
        raise _too_large(declared, limit)
    msg = await receive()
    body: bytes = msg.get("body", b"")
    if msg.get("more_body", False) or msg["type"] != "http.request":
        return await _read_rest(receive, msg, body, limit)
    if len(body) > limit:
        raise _too_large(len(body), limit)
    return body


#: What an inference route computes: (response body, content type, model seconds).
Work = Callable[[], Awaitable[tuple[bytes, bytes, float]]]


async def serve_guarded(send: Send, metrics: ModelServerMetrics, what: str, t0: float,
                        work: Work) -> None:
    """Run ``work`` and answer with its result, or with the SageMaker-style error."""
    try:
        payload, out_type, model_s = await work()
    except Exception as exc:
        await answer_error(send, metrics, what, exc)
        return
    await answer(send, metrics, t0, payload, out_type, model_s)


async def answer(send: Send, metrics: ModelServerMetrics, t0: float, payload: bytes,
                 out_type: bytes, model_s: float) -> None:
    """Send a 200 with ``payload`` and record the request's model and overhead latency."""
    await send({"type": "http.response.start", "status": 200, "headers": [
        (b"content-type", out_type), (b"content-length", str(len(payload)).encode()),
    ]})
    await send({"type": "http.response.body", "body": payload})
    metrics.model_latency.observe(model_s)
    metrics.overhead_latency.observe(max(time.perf_counter() - t0 - model_s, 0.0))


async def answer_error(send: Send, metrics: ModelServerMetrics, what: str,
                       exc: Exception) -> None:
    """Answer a failed inference request the same way on every route.

    Every inference route (single model, multi-model, pipeline) answers alike:
    our errors with their status, a client that went away with nothing
    (counted as 499), anything unexpected as a logged 500 that never takes the
    server down.
    """
    if isinstance(exc, ClientDisconnected):
        metrics.error(499)
        return
    if isinstance(exc, RuntimeServiceError):
        await _send_error(send, exc)
        metrics.error(exc.status)
        return
    log.error("Unexpected failure serving %s", what, exc_info=exc)
    await _send_error(send, Internal("Internal failure while serving the request: "
                                     "see the model server's log"))
    metrics.error(500)


async def _read_rest(receive: Receive, first: Message, body: bytes, limit: int) -> bytes:
    """The rest of a body that came in several messages, enforcing the limit as it grows."""
    if first["type"] == "http.disconnect":
        raise ClientDisconnected
    chunks = [body]
    size = len(body)
    msg = first
    while msg.get("more_body", False):
        if size > limit:
            # Chunked bodies have no Content-Length: stop as soon as it is over.
            raise _too_large(size, limit)
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise ClientDisconnected
        chunk = msg.get("body", b"")
        size += len(chunk)
        chunks.append(chunk)
    if size > limit:
        raise _too_large(size, limit)
    return b"".join(chunks)


def _too_large(size: int, limit: int) -> PayloadTooLarge:
    # ``size`` is the declared length, or what had arrived when the limit was crossed.
    return PayloadTooLarge(f"Request body exceeds the limit of {limit} bytes "
                           f"({limit / 1048576:g} MB; got {size} bytes or more): send smaller "
                           "batches, or use asynchronous inference or batch transform")


async def _send_error(send: Send, err: RuntimeServiceError) -> None:
    status, headers, body = render_error(err)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})

