"""The model server of a multi-container variant: ``POST /invocations`` through the pipeline.

Same shape as the single-model server: a raw-ASGI hot path for
``/invocations`` (payload limit enforced while reading) in front of a small
FastAPI app for health and metrics. ``/ping`` is 200 only when every step is
ready, and otherwise names the step that is not.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import Response

from kubeinfer_runtime import __version__, metrics
from kubeinfer_runtime.api_errors import install_error_handlers
from kubeinfer_runtime.contract import H_TARGET_CONTAINER, ModelServerSettings
from kubeinfer_runtime.errors import (
    NotReady,
    ValidationError,
)
from kubeinfer_runtime.metrics import ModelServerMetrics
from kubeinfer_runtime.metrics_listener import metrics_listener
from kubeinfer_runtime.openapi_docs import Header, Route, document_routes
from kubeinfer_runtime.pipeline.runner import Pipeline
from kubeinfer_runtime.pipeline.steps import UrlStep, build_steps
from kubeinfer_runtime.server.api import _json
from kubeinfer_runtime.server.hotpath import (
    ASGIApp,
    Receive,
    Scope,
    Send,
    _headers,
    read_body,
    serve_guarded,
)

log = logging.getLogger("kubeinfer.server")

_TARGET = H_TARGET_CONTAINER.encode()


class PipelineHotPath:
    def __init__(self, app: ASGIApp, pipeline: Pipeline, metrics: ModelServerMetrics,
                 max_payload_bytes: int) -> None:
        self.app = app
        self.pipeline = pipeline
        self.metrics = metrics
        self.max_payload_bytes = max_payload_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/invocations":
            await self._handle(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        t0 = time.perf_counter()
        self.metrics.invocations.value += 1

        async def work() -> tuple[bytes, bytes, float]:
            if scope["method"] != "POST":
                raise ValidationError(f"{scope['method']} is not allowed on /invocations: "
                                      "use POST", status=405)
            content_type, accept, length = _headers(scope["headers"])
            target = next((v.decode("latin-1").strip() for k, v in scope["headers"]
                           if k == _TARGET), None)
            body = await read_body(receive, length, self.max_payload_bytes)
            started = time.perf_counter()
            payload, out_type = await self.pipeline.run(body, content_type, accept, target)
            # The whole chain is the "model" here; per-step time is in each step's metrics.
            return payload, out_type.encode("latin-1"), time.perf_counter() - started

        await serve_guarded(send, self.metrics, "the pipeline", t0, work)


def create_pipeline_app(settings: ModelServerSettings) -> PipelineHotPath:
    assert settings.pipeline is not None
    pool = ThreadPoolExecutor(max_workers=settings.inference_threads,
                              thread_name_prefix="inference")
    labels = (settings.endpoint_name, settings.variant_name)
    step_metrics = {s.name: ModelServerMetrics(*labels, s.name)
                    for s in settings.pipeline.steps}
    steps = build_steps(settings, step_metrics, pool)
    pipeline = Pipeline(steps, settings.pipeline.execution)
    url_steps = [s for s in steps if isinstance(s, UrlStep)]

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        for step in steps:
            step.start()
        async with metrics_listener(settings.host, settings.metrics_port):
            yield
        pool.shutdown(wait=False, cancel_futures=True)
        for step in steps:
            await step.close()

    app = FastAPI(title="kubeinfer multi-container server", version=__version__,
                  lifespan=lifespan)
    install_error_handlers(app, "a multi-container variant serves POST /invocations")
    document_routes(app, [Route(
        "/invocations", "Multi-container inference (Serial or Direct)",
        "Serial: each step's response is the next step's request. Direct: the header picks "
        "one step.",
        headers=(Header("X-Amzn-SageMaker-Target-Container-Hostname",
                        "Direct mode: the step to call"),))])

    async def check_ready() -> None:
        for step in url_steps:
            await step.check()
        reason = pipeline.not_ready()
        if reason is not None:
            raise NotReady(reason)

    @app.get("/ping", summary="200 when every step is ready")
    async def ping() -> Response:
        await check_ready()
        return _json({"status": "Healthy"})

    @app.get("/v2/health/live")
    async def live() -> Response:
        return _json({"live": True})

    @app.get("/v2/health/ready")
    async def ready() -> Response:
        await check_ready()
        return _json({"ready": True})

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus() -> Response:
        body, content_type = metrics.render_latest()
        return Response(body, media_type=content_type)

    overall = ModelServerMetrics(*labels, settings.model_name)
    return PipelineHotPath(app, pipeline, overall, settings.max_payload_bytes)
