"""The model server's hot paths as a lean raw-ASGI layer in front of FastAPI.

``POST /invocations`` and ``POST /v2/models/{m}/infer`` carry all the traffic,
so they skip FastAPI's routing, dependency injection and pydantic entirely:
check the path, read the body (enforcing the payload limit as it arrives),
decode with the codec, predict, encode, send. Everything else (health,
metadata, metrics, docs) falls through to the FastAPI app, where per-request
cost does not matter.

Under ``kubeinfer-runtime serve`` most inference requests do not even arrive
as ASGI: the HTTP protocol (``inline_http``) asks :meth:`HotPath.inline_plan`
when the headers are in and :meth:`HotPath.respond_inline` when the body is,
and writes the reply itself. Both paths share the planning and the work, so
they answer alike (tests/integration/test_inline_http.py).

What a success carries besides its body is decided with it: the content type,
for CSV and .npy the output they carry (``X-Kubeinfer-Output``), for a V2
answer with binary outputs ``Inference-Header-Content-Length``. Errors on V2
routes have V2's body, ``{"error": ...}``; SageMaker routes keep theirs.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

from kubeinfer_runtime import codec
from kubeinfer_runtime.errors import (
    Internal,
    NotFound,
    PayloadTooLarge,
    Reply,
    RuntimeServiceError,
    ValidationError,
    render_error,
    render_v2_error,
)
from kubeinfer_runtime.metrics import ModelServerMetrics
from kubeinfer_runtime.server.json_lane import LANE_CONTENT_TYPES
from kubeinfer_runtime.server.state import LoadedModel, ModelSlot
from kubeinfer_runtime.server.work import (
    V2_JSON,
    OutHeaders,
    invocations_output,
    ok_headers,
    v2_headers,
)

# Re-exported: the pipeline and the async worker import them from here.
from kubeinfer_runtime.server.work import invocations_work as invocations_work
from kubeinfer_runtime.server.work import v2_work as v2_work

log = logging.getLogger("kubeinfer.server")


Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_V2_PREFIX = "/v2/models/"
_V2_SUFFIX = "/infer"
#: Model names that travel in a URL as they are (RFC 3986's unreserved characters).
_PLAIN_NAME = re.compile(r"[A-Za-z0-9._~-]+")


class ClientDisconnected(Exception):
    """The client went away before sending the whole body: nothing to answer."""


class InferenceService:
    """What the hot path needs: the model slot, metrics, pool, payload and decode limits."""

    def __init__(self, slot: ModelSlot, metrics: ModelServerMetrics,
                 pool: ThreadPoolExecutor, max_payload_bytes: int,
                 limits: codec.DecodeLimits | None = None) -> None:
        self.slot = slot
        self.metrics = metrics
        self.pool = pool
        self.max_payload_bytes = max_payload_bytes
        #: What one request may decode to (None: 4 x the payload limit).
        self.limits = (limits if limits is not None
                       else codec.DecodeLimits.for_settings(max_payload_bytes, None))


class Plan(NamedTuple):
    """A request the hot path accepted, decided from its headers before its body is read."""

    #: None for ``/invocations``; the ``{m}[/versions/{v}]`` part of a V2 infer path.
    v2_target: str | None
    content_type: str | None
    #: The negotiated ``/invocations`` response encoding (V2 decides from the body).
    encoding: codec.Encoding
    #: The success's headers, Content-Length aside (V2 binary answers bring their own).
    out_headers: OutHeaders
    model: LoadedModel
    declared_length: int | None
    #: The output a CSV or .npy answer carries; None: every output (or the only one).
    output: str | None = None
    #: V2: Inference-Header-Content-Length (binary data extension); None: all JSON.
    header_length: int | None = None


class HotPath:
    """ASGI app: serves the two inference routes itself, delegates the rest to ``app``.

    It is also an :class:`~kubeinfer_runtime.server.inline_http.InlineResponder`:
    the HTTP protocol asks it for a :class:`Plan` when a request's headers are
    in, and for the whole response once its body is, with no ASGI in between.
    """

    def __init__(self, app: ASGIApp, service: InferenceService, model_name: str) -> None:
        self.app = app
        self.service = service
        self.model_name = model_name
        #: The V2 infer target V2 clients send (the unversioned one), as it arrives; None
        #: for a name a client must percent-encode (the general route decodes it).
        self._v2_url = (f"{_V2_PREFIX}{model_name}{_V2_SUFFIX}".encode("ascii")
                        if _PLAIN_NAME.fullmatch(model_name) else None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            ours, v2_target = self._route(scope["path"])
            if ours:
                await self._handle(scope, receive, send, v2_target)
                return
        await self.app(scope, receive, send)

    @staticmethod
    def _route(path: str) -> tuple[bool, str | None]:
        """(is it an inference route, its V2 target)."""
        if path == "/invocations":
            return True, None
        if path.startswith(_V2_PREFIX) and path.endswith(_V2_SUFFIX):
            return True, path[len(_V2_PREFIX):-len(_V2_SUFFIX)]
        return False, None

    def _plan(self, method: str, path: str, v2_target: str | None,
              raw_headers: list[tuple[bytes, bytes]]) -> Plan:
        """Everything decided from the request line and headers; raises what to answer."""
        if method != "POST":
            raise ValidationError(f"{method} is not allowed on {path}: use POST", status=405)
        if v2_target is None:
            content_type, accept, length = _headers(raw_headers)
            # Negotiate before reading and running anything: a request we
            # cannot answer should cost nothing.
            encoding = codec.negotiate(accept)
            model = self.service.slot.get()
            if not encoding.one_output:
                return Plan(None, content_type, encoding, encoding.headers, model, length)
            output, out_headers = invocations_output(encoding, model.meta.outputs, raw_headers)
            return Plan(None, content_type, encoding, out_headers, model, length, output)
        content_type, length, header_length = v2_headers(raw_headers)
        self._check_v2_target(v2_target)
        return Plan(v2_target, content_type, codec.Encoding.JSON, V2_JSON,
                    self.service.slot.get(), length, None, header_length)

    def _compute_inline(self, plan: Plan, body: bytes) -> tuple[bytes, float, OutHeaders]:
        """(response body, model seconds, its headers), on the calling thread."""
        if plan.v2_target is not None:
            return v2_work(plan.model, body, self.model_name, self.service.limits,
                           plan.header_length)
        payload, model_s = self._invocations_inline(plan, body)
        return payload, model_s, plan.out_headers

    def _invocations_inline(self, plan: Plan, body: bytes) -> tuple[bytes, float]:
        """(response body, model seconds) of ``/invocations``, on the calling thread."""
        model = plan.model
        lane = model.json_lane
        done = (lane(body) if lane is not None and plan.encoding is codec.Encoding.JSON
                and codec.media_type(plan.content_type) in LANE_CONTENT_TYPES else None)
        return done if done is not None else invocations_work(
            model, body, plan.content_type, plan.encoding, self.service.limits, plan.output)

    async def _compute_pooled(self, plan: Plan, body: bytes,
                              lane: bool = False) -> tuple[bytes, float, OutHeaders]:
        """(response body, model seconds, its headers), from an inference thread.

        ``lane``: V2 requests may take the model's V2 lane (the inline path's choice).
        """
        loop = asyncio.get_running_loop()
        svc = self.service
        if plan.v2_target is None:
            payload, model_s = await loop.run_in_executor(
                svc.pool, invocations_work, plan.model, body, plan.content_type, plan.encoding,
                svc.limits, plan.output)
            return payload, model_s, plan.out_headers
        return await loop.run_in_executor(svc.pool, v2_work, plan.model, body,
                                          self.model_name, svc.limits, plan.header_length,
                                          lane)

    async def _handle(self, scope: Scope, receive: Receive, send: Send,
                      v2_target: str | None) -> None:
        svc = self.service
        t0 = time.perf_counter()
        svc.metrics.invocations.value += 1  # a loop counter: no call, no lock
        try:
            plan = self._plan(scope["method"], scope["path"], v2_target, scope["headers"])
            body = await read_body(receive, plan.declared_length, svc.max_payload_bytes)
            if plan.model.inline:
                payload, model_s, headers = self._compute_inline(plan, body)
            else:
                payload, model_s, headers = await self._compute_pooled(plan, body)
        except Exception as exc:
            await answer_error(send, svc.metrics, scope["path"], exc,
                               v2=v2_target is not None)
            return
        await answer(send, svc.metrics, t0, payload, headers, model_s)

    # -- InlineResponder: the protocol's path, no ASGI, no task, no await

    def inline_plan(self, method: bytes, url: bytes,
                    raw_headers: list[tuple[bytes, bytes]]) -> Plan | None:
        """The plan for a request answerable inline, or None: let the ASGI path serve it.

        Only the clean case qualifies: a POST to an inference route with a
        declared length within the limit, to a loaded model. Anything else,
        errors decided from the headers included, takes the ASGI path.
        """
        if method != b"POST":
            return None
        if url == self._v2_url:
            return self._inline_v2_plan(raw_headers)
        if b"?" in url or b"%" in url:
            return None
        path = url.decode("latin-1")
        ours, v2_target = self._route(path)
        if not ours:
            return None
        try:
            plan = self._plan("POST", path, v2_target, raw_headers)
        except Exception:
            return None
        length = plan.declared_length
        if length is None or length > self.service.max_payload_bytes:
            return None
        self.service.metrics.invocations.value += 1
        return plan

    def _inline_v2_plan(self, raw_headers: list[tuple[bytes, bytes]]) -> Plan | None:
        """``inline_plan`` for the commonest V2 target, in fewer steps: the same Plan."""
        try:
            content_type, length, header_length = v2_headers(raw_headers)
        except Exception:
            return None
        svc = self.service
        model = svc.slot.model
        if model is None or length is None or length > svc.max_payload_bytes:
            return None
        svc.metrics.invocations.value += 1
        return Plan(self.model_name, content_type, codec.Encoding.JSON, V2_JSON, model, length,
                    None, header_length)

    def respond_inline(self, plan: Plan, body: bytes, t0: float,
                       url: bytes) -> Reply | Awaitable[Reply]:
        """The reply to a planned request, errors included; records metrics.

        A model that runs on the loop is answered on the spot; one in the
        thread pool returns an awaitable, which the protocol awaits in a task.
        """
        if not plan.model.inline:
            return self._respond_pooled(plan, body, t0, url)
        try:
            if plan.v2_target is None:  # the commonest request: no tuple built to pass on
                payload, model_s = self._invocations_inline(plan, body)
                headers = plan.out_headers
            else:
                payload, model_s, headers = v2_work(plan.model, body, self.model_name,
                                                    self.service.limits, plan.header_length,
                                                    True)
        except Exception as exc:
            return self._error(plan, url, exc)
        return self._ok(t0, payload, model_s, headers)

    async def _respond_pooled(self, plan: Plan, body: bytes, t0: float, url: bytes) -> Reply:
        try:
            payload, model_s, headers = await self._compute_pooled(plan, body, True)
        except Exception as exc:
            return self._error(plan, url, exc)
        return self._ok(t0, payload, model_s, headers)

    def _ok(self, t0: float, payload: bytes, model_s: float, headers: OutHeaders) -> Reply:
        record_success(self.service.metrics, t0, model_s)
        # ok_headers, inlined (same order): this runs for every inline answer.
        return 200, [*headers, (b"content-length", str(len(payload)).encode())], payload

    def _error(self, plan: Plan, url: bytes, exc: Exception) -> Reply:
        reply = error_reply(self.service.metrics, url.decode("latin-1"), exc,
                            v2=plan.v2_target is not None)
        # A body in hand cannot be a client that went away: there is a reply.
        assert reply is not None
        return reply

    def inline_abandoned(self, plan: Plan) -> None:
        """The client left before sending the whole body: counted like the ASGI path's 499."""
        self.service.metrics.error(499)

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


#: What an inference route computes: (response body, content type or all its headers
#: but Content-Length, model seconds).
Work = Callable[[], Awaitable[tuple[bytes, bytes | OutHeaders, float]]]


async def serve_guarded(send: Send, metrics: ModelServerMetrics, what: str, t0: float,
                        work: Work, *, v2: bool = False) -> None:
    """Run ``work`` and answer with its result, or with the error (V2's body when ``v2``)."""
    try:
        payload, out, model_s = await work()
    except Exception as exc:
        await answer_error(send, metrics, what, exc, v2=v2)
        return
    await answer(send, metrics, t0, payload,
                 ((b"content-type", out),) if isinstance(out, bytes) else out, model_s)


async def answer(send: Send, metrics: ModelServerMetrics, t0: float, payload: bytes,
                 headers: OutHeaders, model_s: float) -> None:
    """Send a 200 with ``payload`` and record the request's model and overhead latency."""
    await send({"type": "http.response.start", "status": 200,
                "headers": ok_headers(headers, payload)})
    await send({"type": "http.response.body", "body": payload})
    record_success(metrics, t0, model_s)


def record_success(metrics: ModelServerMetrics, t0: float, model_s: float) -> None:
    """The two latencies of an answered request: the model's, and everything else's."""
    metrics.model_latency.observe(model_s)
    metrics.overhead_latency.observe(max(time.perf_counter() - t0 - model_s, 0.0))


async def answer_error(send: Send, metrics: ModelServerMetrics, what: str,
                       exc: Exception, *, v2: bool = False) -> None:
    """Answer a failed inference request the same way on every route (see error_reply)."""
    reply = error_reply(metrics, what, exc, v2=v2)
    if reply is not None:
        status, headers, body = reply
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def error_reply(metrics: ModelServerMetrics, what: str, exc: Exception, *,
                v2: bool = False) -> Reply | None:
    """(status, headers, body) for a failed inference request, counted in the metrics.

    Every inference route (single model, multi-model, pipeline) answers alike:
    our errors with their status, a client that went away with nothing (None,
    counted as 499), anything unexpected as a logged 500 that never takes the
    server down. ``v2``: a V2 route, whose clients read ``{"error": ...}``.
    """
    if isinstance(exc, ClientDisconnected):
        metrics.error(499)
        return None
    if not isinstance(exc, RuntimeServiceError):
        log.error("Unexpected failure serving %s", what, exc_info=exc)
        exc = Internal("Internal failure while serving the request: see the model server's log")
    metrics.error(exc.status)
    return render_v2_error(exc) if v2 else render_error(exc)


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
