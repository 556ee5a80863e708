"""The hot path: ``POST /endpoints/{name}/invocations`` as a raw ASGI handler.

No FastAPI, no pydantic, no per-request objects beyond what the hop needs:
the gateway's budget is 0.3 ms at p50. Steps, each delegated to pure code:

1. look the endpoint up in the compiled route table (404 if unknown);
2. split the headers (``headers``), refuse bodies over the endpoint's limit
   (413) before forwarding anything, and InvokeEndpoint headers over
   SageMaker's limits or sent twice (400, once the caller is authenticated);
3. authenticate the caller (``auth``: SigV4 or a bearer token, when the
   endpoint asks for it) before anything else happens for the request, a
   serverless cold start and a serverless maxConcurrency slot included (a
   serverless slot is taken once the body is read, with or without auth, so a
   caller trickling bodies holds connections, which the listener bounds, never
   the slots; without auth a full endpoint answers 429 before the body is read);
4. choose a variant and upstream (``routing.choose``, health-aware), and take
   one of the variant's slots (``shedding``: a bounded wait, else 429 at once);
5. forward over a pooled keep-alive connection (``upstream``) and answer with
   the model server's status, body and headers, plus
   ``x-Amzn-Invoked-Production-Variant``.

Upstream failures: a refused connection marks the upstream down and, since the
request certainly never left, it is sent once more to another healthy upstream
of the same variant; a dropped connection also marks it down but is answered
503 (the model may have run); no answer in time is a 424 ModelError, as
SageMaker answers for a container that does not respond, and so is an answer
over ``KUBEINFER_MAX_RESPONSE_BYTES`` (or a head over 64 KiB: the connection is
closed as soon as it passes the bound, and the model server stays in rotation).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from kubeinfer_runtime.errors import (
    Internal,
    ModelError,
    NotReady,
    PayloadTooLarge,
    Reply,
    RuntimeServiceError,
    ValidationError,
    render_error,
)
from kubeinfer_runtime.gateway import recorder
from kubeinfer_runtime.gateway.activator import Activator
from kubeinfer_runtime.gateway.affinity import pick_for_key
from kubeinfer_runtime.gateway.body import ClientGone, read_body
from kubeinfer_runtime.gateway.core import GatewayCore
from kubeinfer_runtime.gateway.headers import (
    InboundHeaders,
    request_target,
    response_headers,
    split_request_headers,
)
from kubeinfer_runtime.gateway.routing import (
    EndpointState,
    Pick,
    VariantState,
    choose,
    unknown_endpoint,
)
from kubeinfer_runtime.gateway.shedding import Ticket, VariantGate
from kubeinfer_runtime.gateway.taps import make_exchange, observe_all
from kubeinfer_runtime.gateway.upstream import (
    ConnectFailed,
    ConnectionLost,
    ResponseTooLarge,
    UpstreamResponse,
    UpstreamTimeout,
)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

log = logging.getLogger("kubeinfer.gateway")

_ERROR_TYPE = b"x-amzn-errortype"
_CONTENT_TYPE = b"content-type"
_INVOCATIONS_PATH = b"/invocations"

#: What the inline path decided from the headers: the endpoint, the headers it
#: forwards, and the raw headers (a caller's signature covers some of them).
InlinePlan = tuple[EndpointState, InboundHeaders, list[tuple[bytes, bytes]]]


def _error(err: RuntimeServiceError, endpoint: str, variant: str,
           variant_header: bytes | None = None) -> Reply:
    """The SageMaker-style error response, counted in the gateway's metrics."""
    status, headers, body = render_error(err)
    if variant_header is not None:
        headers.append((b"x-amzn-invoked-production-variant", variant_header))
    recorder.error(endpoint, variant, err.code)
    return status, headers, body


async def _send(send: Send, reply: Reply) -> None:
    status, headers, body = reply
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class InvocationHandler:
    """Answers ``POST /endpoints/{name}/invocations``."""

    def __init__(self, core: GatewayCore) -> None:
        self.core = core
        #: Serverless endpoints only: maxConcurrency and holding on a cold start.
        self.activator = Activator(core)
        #: Real-time variants' admission: (endpoint, variant) -> slots and waiters.
        self.gates: dict[tuple[str, str], VariantGate] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send, name: str) -> None:
        started = time.perf_counter()
        endpoint = self.core.routes.endpoints.get(name)
        if endpoint is None:
            await _send(send, _error(unknown_endpoint(name), recorder.UNKNOWN, ""))
            return
        if endpoint.serverless is None:
            await self._invoke(scope, receive, send, endpoint, started)
            return
        # A maxConcurrency slot is taken once the body is read and the caller
        # authenticated: otherwise callers trickling their bodies (at the listener's
        # minimum rate a 4 MB body takes over an hour) hold every slot and lock the
        # real callers out with 429, and without credentials when the endpoint asks
        # for them (SigV4 signs the body's hash, so the body is read first either way).
        if endpoint.name not in self.core.auth:
            # Nobody to authenticate: a full endpoint says so before the upload.
            throttled = self.activator.full(endpoint)
            if throttled is not None:
                await _send(send, _error(throttled, endpoint.name, ""))
                return
        await self._invoke(scope, receive, send, endpoint, started, admit=True)

    async def _in_slot(self, send: Send, endpoint: EndpointState,
                       work: Callable[[], Awaitable[None]]) -> None:
        """``work`` holding one of the serverless endpoint's slots (429 when none is free)."""
        throttled = self.activator.admit(endpoint)
        if throttled is not None:
            await _send(send, _error(throttled, endpoint.name, ""))
            return
        try:
            await work()
        finally:
            self.activator.release(endpoint.name)

    async def _invoke(self, scope: Scope, receive: Receive, send: Send,
                      endpoint: EndpointState, started: float, admit: bool = False) -> None:
        """Read, check and forward one request; ``admit``: take a serverless slot once
        the caller is authenticated."""
        inbound = split_request_headers(scope["headers"])
        limit = endpoint.max_payload_bytes
        if inbound.content_length is not None and inbound.content_length > limit:
            await _send(send, _error(_too_large(endpoint, inbound.content_length),
                                     endpoint.name, ""))
            return
        try:
            body = await read_body(receive, limit)
        except ClientGone:
            return
        if body is None:
            await _send(send, _error(_too_large(endpoint, None), endpoint.name, ""))
            return
        denied = self.denied(endpoint.name, request_target(scope), scope["headers"], body)
        if denied is not None:
            await _send(send, denied)
            return
        if inbound.problem is not None:
            await _send(send, _error(_bad_headers(endpoint, inbound.problem), endpoint.name,
                                     ""))
            return
        if not admit:
            await _send(send, await self.reply(endpoint, inbound, body, started))
            return

        async def answer() -> None:
            await _send(send, await self.reply(endpoint, inbound, body, started))

        await self._in_slot(send, endpoint, answer)

    def denied(self, name: str, target: bytes, raw_headers: list[tuple[bytes, bytes]],
               body: bytes, method: bytes = b"POST") -> Reply | None:
        """The error to answer when the endpoint authenticates callers and this one
        fails; None to go on."""
        auth = self.core.auth.get(name)
        if auth is None:
            return None
        err = auth.check(method, target, raw_headers, body)
        if err is None:
            return None
        log.info("Endpoint %s refused a caller: %s %s", name, err.status, err.code)
        return _error(err, name, "")

    # -- the inline path (kubeinfer_runtime.inline_http): no ASGI around the hop

    def inline_plan(self, name: str, raw_headers: list[tuple[bytes, bytes]]
                    ) -> InlinePlan | None:
        """What to forward for a clean request to a non-serverless endpoint, or None.

        Unknown endpoints, serverless ones (the activator admits and holds
        requests), bodies without a declared size within the limit and headers
        over SageMaker's limits take the ASGI path, which answers them as before.
        """
        endpoint = self.core.routes.endpoints.get(name)
        if endpoint is None or endpoint.serverless is not None:
            return None
        inbound = split_request_headers(raw_headers)
        length = inbound.content_length
        if length is None or length > endpoint.max_payload_bytes or inbound.problem is not None:
            return None
        return endpoint, inbound, raw_headers

    async def reply_inline(self, plan: InlinePlan, body: bytes, started: float,
                           target: bytes) -> Reply:
        """:meth:`reply` for the inline path, which has nobody else to catch a bug."""
        endpoint, inbound, raw_headers = plan
        try:
            denied = self.denied(endpoint.name, target, raw_headers, body)
            if denied is not None:
                return denied
            return await self.reply(endpoint, inbound, body, started)
        except Exception:
            log.exception("Serving endpoint %s failed unexpectedly", endpoint.name)
            return _error(Internal(f'Gateway failed serving endpoint "{endpoint.name}": retry; '
                                   "report a bug if it persists"), endpoint.name, "")

    async def reply(self, endpoint: EndpointState, inbound: InboundHeaders, body: bytes,
                    started: float) -> Reply:
        """Choose a variant and upstream, forward, and return the client's response."""
        core = self.core
        pick = choose(endpoint, inbound.target_variant, core.health.down, core.rng)
        if not isinstance(pick, Pick) and endpoint.serverless is not None:
            # Zero ready replicas: hold the request while one starts (bounded).
            pick = await self.activator.hold(endpoint, inbound.target_variant, pick)
        if not isinstance(pick, Pick):
            return _error(pick, endpoint.name, "")
        variant = pick.variant
        upstream = pick.upstream
        if inbound.target_model is not None and len(variant.upstreams) > 1:
            # Multi-model: the same model always goes to the same replica (warm cache).
            upstream = pick_for_key(variant.upstreams, inbound.target_model,
                                    core.health.down) or upstream
        policy = variant.admission
        gate = ticket = None
        if policy is not None:
            gate = self._gate(endpoint.name, variant.name)
            admitted = await gate.enter(policy, variant.healthy_count(core.health.down),
                                        len(body))
            if not isinstance(admitted, Ticket):
                # Counted as errors{code="ThrottlingException"} by _error.
                return _error(admitted, endpoint.name, variant.name, variant.header_value)
            ticket = admitted
        upstream_started = time.perf_counter()
        try:
            response = await self._forward(endpoint, variant, upstream,
                                           inbound.forwarded, body)
        except RuntimeServiceError as err:
            return _error(err, endpoint.name, variant.name, variant.header_value)
        except Exception:
            log.exception("Forwarding to %s failed unexpectedly", upstream)
            return _error(Internal(
                f'Gateway failed forwarding to variant "{variant.name}" of endpoint '
                f'"{endpoint.name}": retry; report a bug if it persists'),
                endpoint.name, variant.name, variant.header_value)
        finally:
            if gate is not None and ticket is not None and policy is not None:
                gate.leave(ticket, policy, variant.healthy_count(core.health.down))
        upstream_s = time.perf_counter() - upstream_started
        recorder.invocation(endpoint.name, variant.name,
                            time.perf_counter() - started - upstream_s, upstream_s)
        if response.status >= 400:
            recorder.error(endpoint.name, variant.name, _error_code(response))
        if endpoint.taps:  # data capture, shadows (gateway.taps): never delay the client
            observe_all(endpoint.taps, make_exchange(
                endpoint.name, variant.name, inbound.forwarded, body, response.status,
                response.body, response.header(_CONTENT_TYPE), upstream_s))
        return (response.status,
                response_headers(response.headers, variant.header_value, len(response.body)),
                response.body)

    def _gate(self, endpoint: str, variant: str) -> VariantGate:
        gate = self.gates.get((endpoint, variant))
        if gate is None:
            gate = self.gates[(endpoint, variant)] = VariantGate(endpoint, variant)
        return gate

    async def _forward(self, endpoint: EndpointState, variant: VariantState, url: str,
                       headers: list[tuple[bytes, bytes]], body: bytes) -> UpstreamResponse:
        """Send to ``url``; on a refused connection, once more to another upstream."""
        core = self.core
        timeout = core.settings.upstream_timeout_s
        try:
            return await core.client.request(url, b"POST", _INVOCATIONS_PATH, headers, body,
                                             timeout)
        except ConnectFailed as exc:
            self._mark_down(url, exc.detail)
            retry_url = variant.next_upstream(core.health.down, exclude=url)
            if retry_url is None:
                raise self._unavailable(endpoint, variant, url, exc.detail) from None
        except ConnectionLost as exc:
            self._mark_down(url, exc.detail)
            raise self._unavailable(endpoint, variant, url, exc.detail) from None
        except UpstreamTimeout:
            raise _timed_out(endpoint, variant, url, timeout) from None
        except ResponseTooLarge as exc:
            raise _too_large_answer(endpoint, variant, url, exc.detail) from None
        try:
            return await core.client.request(retry_url, b"POST", _INVOCATIONS_PATH, headers,
                                             body, timeout)
        except (ConnectFailed, ConnectionLost) as exc:
            self._mark_down(retry_url, exc.detail)
            raise self._unavailable(endpoint, variant, retry_url, exc.detail) from None
        except UpstreamTimeout:
            raise _timed_out(endpoint, variant, retry_url, timeout) from None
        except ResponseTooLarge as exc:
            raise _too_large_answer(endpoint, variant, retry_url, exc.detail) from None

    def _mark_down(self, url: str, detail: str) -> None:
        if self.core.health.mark_unreachable(url) is not None:
            recorder.upstream_health(url, False)
            log.warning("Model server %s is out of rotation: %s", url, detail)

    @staticmethod
    def _unavailable(endpoint: EndpointState, variant: VariantState, url: str,
                     detail: str) -> NotReady:
        return NotReady(f'Variant "{variant.name}" of endpoint "{endpoint.name}": model server '
                        f"{url} {detail}: retry the request")


def _too_large(endpoint: EndpointState, size: int | None) -> PayloadTooLarge:
    got = f"{size} bytes" if size is not None else "more than that"
    return PayloadTooLarge(
        f'Request body for endpoint "{endpoint.name}" is too large ({got}; the limit is '
        f"{endpoint.max_payload_bytes} bytes): send a smaller payload, or use asynchronous "
        "inference for large ones")


def _bad_headers(endpoint: EndpointState, problem: str) -> ValidationError:
    return ValidationError(f'Request to endpoint "{endpoint.name}": {problem}')


def _too_large_answer(endpoint: EndpointState, variant: VariantState, url: str,
                      detail: str) -> ModelError:
    return ModelError(f'Variant "{variant.name}" of endpoint "{endpoint.name}": model server '
                      f"{url} {detail}: return a smaller answer, or raise the gateway's "
                      "KUBEINFER_MAX_RESPONSE_BYTES")


def _timed_out(endpoint: EndpointState, variant: VariantState, url: str,
               timeout: float) -> ModelError:
    return ModelError(f'Variant "{variant.name}" of endpoint "{endpoint.name}": model server '
                      f"{url} did not answer within {timeout:g}s: make the model faster, or "
                      "raise the gateway's upstream timeout (KUBEINFER_UPSTREAM_TIMEOUT_S)")


def _error_code(response: UpstreamResponse) -> str:
    """The SageMaker error code of an upstream error response, for metrics (bounded:
    ``recorder.upstream_code``)."""
    return recorder.upstream_code(response.header(_ERROR_TYPE), response.status)
