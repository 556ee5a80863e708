"""The gateway's ASGI application: ``create_app`` is what uvicorn runs.

``kubeinfer-runtime serve --role gateway`` runs
``kubeinfer_runtime.gateway.app:create_app`` with uvicorn's ``factory=True``.
The app is a small dispatcher: ``POST /endpoints/{name}/invocations`` goes
straight to the raw ASGI handler (``proxy``), everything else (``/ping``,
``/metrics``, ``/routes``, ``/docs``) to a FastAPI app, where convenience
matters more than microseconds.

``GET /routes`` answers loopback callers only (``kubectl port-forward`` and
``kubectl exec`` arrive from the pod's loopback; local mode's supervisor runs
on the same host): it names the upstream pods, each endpoint's auth mode and
credentials folder, capture destinations and async paths, which a caller of a
SigV4 or token endpoint must not learn without credentials. Anyone else gets
403.

The dispatcher owns the lifespan: the first route-table load happens before
the server accepts connections, the reload and health loops run while it
serves, and on shutdown (SIGTERM: uvicorn stops accepting and lets in-flight
requests finish first) the loops stop and pooled connections are closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import logging
from collections.abc import Awaitable
from typing import Any

import orjson
from fastapi import FastAPI, Request, Response

from kubeinfer_runtime import __version__
from kubeinfer_runtime.api_errors import install_error_handlers
from kubeinfer_runtime.contract import AsyncQueueKeys, GatewaySettings
from kubeinfer_runtime.contract.redact import redact_urls
from kubeinfer_runtime.errors import Reply, ValidationError
from kubeinfer_runtime.gateway.auth import AccessDenied
from kubeinfer_runtime.gateway.core import GatewayCore
from kubeinfer_runtime.gateway.loops import health_loop, reload_routes, route_reload_loop
from kubeinfer_runtime.gateway.proxy import InlinePlan, InvocationHandler, Receive, Scope, Send
from kubeinfer_runtime.metrics import render_latest
from kubeinfer_runtime.metrics_listener import start_metrics_listener
from kubeinfer_runtime.openapi_docs import V2_CONTENT, Header, Route, document_routes
from kubeinfer_runtime.queue.backlog import backlog_loop
from kubeinfer_runtime.queue.submit import AsyncSubmitHandler

log = logging.getLogger("kubeinfer.gateway")

_PREFIX = "/endpoints/"
_SUFFIX = "/invocations"
_ASYNC_SUFFIX = "/async-invocations"
_PREFIX_B = _PREFIX.encode()
_SUFFIX_B = _SUFFIX.encode()


_SAGEMAKER_HEADERS = (
    Header("Content-Type", "Forwarded to the model server"),
    Header("Accept", "Forwarded to the model server"),
    Header("X-Amzn-SageMaker-Target-Variant", "Production variant to use (else by weight)"),
    Header("X-Amzn-SageMaker-Target-Model", "Multi-model endpoints: the model, relative to "
                                            "the variant's prefix"),
    Header("X-Amzn-SageMaker-Target-Container-Hostname", "Direct multi-container "
                                                         "endpoints: the container"),
    Header("X-Amzn-SageMaker-Custom-Attributes", "Forwarded to the model server"),
    Header("X-Amzn-SageMaker-Inference-Id", "Forwarded to the model server"),
)
GATEWAY_ROUTES = (
    Route("/endpoints/{name}/invocations", "SageMaker Runtime InvokeEndpoint",
          "Answers with the model's response and `x-Amzn-Invoked-Production-Variant`. "
          "Serverless endpoints hold requests while a replica starts.",
          headers=_SAGEMAKER_HEADERS),
    Route("/endpoints/{name}/async-invocations", "SageMaker Runtime InvokeEndpointAsync",
          "Queues the object at X-Amzn-SageMaker-InputLocation; 202 with the InferenceId and "
          "the output and failure locations.",
          request={"application/octet-stream": {"schema": {"type": "string"}}},
          response=V2_CONTENT, status=202,
          headers=(Header("X-Amzn-SageMaker-InputLocation", "s3:// or file:// input object",
                          required=True),
                   Header("X-Amzn-SageMaker-Content-Type", "The input's content type"),
                   Header("X-Amzn-SageMaker-Accept", "The output's content type"),
                   Header("X-Amzn-SageMaker-Inference-Id", "Idempotency key"),
                   Header("X-Amzn-SageMaker-S3OutputPathExtension",
                          "Folder below the endpoint's outputPath"),
                   Header("X-Amzn-SageMaker-Filename", "Output object name"),
                   Header("X-Amzn-SageMaker-RequestTTLSeconds", "60 to 21600"),
                   Header("X-Amzn-SageMaker-InvocationTimeoutSeconds", "1 to 3600"))),
)


def is_loopback(host: str | None) -> bool:
    """Whether a caller's address is the host's own (127.0.0.0/8, ::1, IPv4-mapped)."""
    if not host:
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def _api(core: GatewayCore) -> FastAPI:
    api = FastAPI(title="kubeinfer gateway", version=__version__,
                  description="SageMaker Runtime API front door: boto3's sagemaker-runtime "
                              "client works with endpoint_url pointed here.")
    install_error_handlers(api, "the gateway serves POST /endpoints/{name}/invocations and "
                                "/endpoints/{name}/async-invocations (see /docs)")
    document_routes(api, GATEWAY_ROUTES)

    @api.post("/endpoints/{name}/invocations-response-stream",
              summary="SageMaker Runtime InvokeEndpointWithResponseStream: not supported")
    async def response_stream(name: str) -> Response:
        raise ValidationError(f'Endpoint "{name}": InvokeEndpointWithResponseStream '
                              "(streamed responses) is not supported by kubeinfer: call "
                              "InvokeEndpoint, which returns the whole response")

    @api.get("/ping", summary="Gateway liveness (200 while the process serves)")
    async def ping() -> Response:
        body = orjson.dumps({"status": "ok", "revision": core.routes.revision,
                             "endpoints": len(core.routes.endpoints)})
        return Response(body, media_type="application/json")

    @api.get("/metrics", summary="Prometheus metrics")
    async def prometheus() -> Response:
        body, content_type = render_latest()
        return Response(body, media_type=content_type)

    @api.get("/routes", summary="The route table in force and the upstreams out of rotation "
                                "(loopback callers only)")
    async def routes(request: Request) -> Response:
        if not is_loopback(request.client.host if request.client else None):
            raise AccessDenied("GET /routes is served to loopback callers only (it names "
                               "model servers and auth settings): ask from the gateway's "
                               "host, e.g. through kubectl port-forward")
        # Redacted: a route may name a Redis URL with its password.
        table = redact_urls(core.table.model_dump(mode="json")) if core.table else None
        pods = {url: list(urls) for url, urls in sorted(core.resolved.items())}
        body = orjson.dumps({"table": table, "down": sorted(core.health.down), "pods": pods})
        return Response(body, media_type="application/json")

    return api


class GatewayApp:
    """ASGI entry point: hot path, FastAPI for the rest, lifespan."""

    def __init__(self, core: GatewayCore) -> None:
        self.core = core
        self.invocations = InvocationHandler(core)
        self.async_invocations = AsyncSubmitHandler(core.settings.redis_url,
                                                    self.invocations.denied)
        self.api = _api(core)
        self._tasks: list[asyncio.Task[None]] = []
        self._metrics_server: asyncio.Server | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http" and scope["method"] == "POST":
            path: str = scope["path"]
            if path.startswith(_PREFIX) and path.endswith(_SUFFIX):
                name = path[len(_PREFIX):-len(_SUFFIX)]
                if name and "/" not in name:
                    if self._is_async(name):
                        await self.async_invocations.refuse_sync(send, name)
                        return
                    await self.invocations(scope, receive, send, name)
                    return
            if path.startswith(_PREFIX) and path.endswith(_ASYNC_SUFFIX):
                name = path[len(_PREFIX):-len(_ASYNC_SUFFIX)]
                if name and "/" not in name:
                    table = self.core.table
                    route = table.endpoints.get(name) if table is not None else None
                    await self.async_invocations(scope, receive, send, route, name)
                    return
        elif kind == "lifespan":
            await self._lifespan(receive, send)
            return
        await self.api(scope, receive, send)

    # -- InlineResponder (kubeinfer_runtime.inline_http): InvokeEndpoint without ASGI

    def inline_plan(self, method: bytes, url: bytes, raw_headers: list[tuple[bytes, bytes]]
                    ) -> InlinePlan | None:
        if (method != b"POST" or not url.startswith(_PREFIX_B) or not url.endswith(_SUFFIX_B)
                or b"?" in url or b"%" in url):
            return None
        name = url[len(_PREFIX_B):-len(_SUFFIX_B)].decode("latin-1")
        if not name or "/" in name or self._is_async(name):
            return None
        return self.invocations.inline_plan(name, raw_headers)

    def respond_inline(self, plan: InlinePlan, body: bytes, t0: float,
                       url: bytes) -> Awaitable[Reply]:
        return self.invocations.reply_inline(plan, body, t0, url)

    def inline_abandoned(self, plan: InlinePlan) -> None:
        """Nothing was forwarded yet: nothing to undo (the ASGI path counts nothing either)."""

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    log.exception("Gateway failed to start")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def startup(self) -> None:
        core = self.core
        # Load before accepting connections; the health loop's first round
        # checks every upstream right away.
        reload_routes(core)
        wake = asyncio.Event()
        self._tasks = [
            asyncio.create_task(route_reload_loop(core, wake), name="route-reload"),
            asyncio.create_task(health_loop(core, wake), name="health-check"),
        ]
        self._tasks.append(asyncio.create_task(backlog_loop(self._async_queues),
                                               name="async-backlog"))
        core.capture.start()
        if core.settings.metrics_port:
            self._metrics_server = await start_metrics_listener(core.settings.host,
                                                                core.settings.metrics_port)
        # Everything alive now (FastAPI, pydantic, the route table) lives as long as
        # the process: out of the collector's sight, full collections stay short.
        gc.collect()
        gc.freeze()
        log.info("Gateway serving route table %s (revision %d), checking model servers "
                 "every %gs", core.source.path, core.routes.revision,
                 core.settings.health_interval_s)

    async def shutdown(self) -> None:
        if self._metrics_server is not None:
            self._metrics_server.close()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        # Shadow copies first (what is left is dropped and counted): one finishing later
        # would capture its answer after the capture's last write, lost uncounted.
        await self.core.shadows.close()
        # In-flight requests have finished (uvicorn drains them first): write what they
        # captured, within a bound.
        await self.core.capture.close(self.core.settings.capture_shutdown_timeout_s)
        await self.core.client.close()
        await self.async_invocations.close()
        await self.invocations.activator.close()

    def _is_async(self, name: str) -> bool:
        table = self.core.table
        route = table.endpoints.get(name) if table is not None else None
        return route is not None and route.async_config is not None

    def _async_queues(self) -> dict[str, tuple[Any, AsyncQueueKeys]]:
        """Each async endpoint's Redis client and queue, for the backlog metrics."""
        table = self.core.table
        out: dict[str, tuple[Any, AsyncQueueKeys]] = {}
        for name, e in (table.endpoints.items() if table is not None else ()):
            url = self.async_invocations.url_of(e.async_config) if e.async_config else None
            if e.async_config is not None and url is not None:
                out[name] = (self.async_invocations.client(url)[0], e.async_config.keys)
        return out


def configure_logging(level: str) -> None:
    """Our loggers next to uvicorn's (uvicorn only configures its own); same format
    as the model server's."""
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kubeinfer").setLevel(level.upper())


def create_app(settings: GatewaySettings | None = None) -> GatewayApp:
    """uvicorn factory: the gateway app, with settings from ``KUBEINFER_*`` env when None."""
    settings = settings or GatewaySettings()
    configure_logging(settings.log_level)
    return GatewayApp(GatewayCore(settings))
