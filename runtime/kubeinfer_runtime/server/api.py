"""The model server's control surface on FastAPI: health, metadata, metrics, docs.

These routes are cheap and rarely called, so they get FastAPI's conveniences
(OpenAPI at ``/docs``). The single-model server builds this app only when a
route other than the probes and ``/metrics`` is first asked for
(``server.control`` answers those, alike, without importing FastAPI). The
inference routes are only described in the OpenAPI document:
:mod:`kubeinfer_runtime.server.hotpath` answers them before FastAPI ever sees
the request. Handlers stay thin: they read the model slot and
render (documents in ``v2_model``). V2 readiness is the status code, as the
protocol says and ``tritonclient`` reads it: 200 ready, 400 not (with why).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import orjson
from fastapi import FastAPI
from fastapi.responses import Response

from kubeinfer_runtime import __version__, metrics
from kubeinfer_runtime.api_errors import install_error_handlers
from kubeinfer_runtime.errors import NotFound, NotReady
from kubeinfer_runtime.metrics import ModelServerMetrics
from kubeinfer_runtime.openapi_docs import (
    INFERENCE_CONTENT,
    INVOCATION_HEADERS,
    V2_CONTENT,
    V2_INFER_DESCRIPTION,
    Route,
    document_routes,
)
from kubeinfer_runtime.server import v2_model
from kubeinfer_runtime.server.state import ModelSlot

Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]


def _json(doc: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(doc), status_code=status, media_type="application/json")


def v2_not_ready(message: str, name: str | None = None) -> Response:
    """A V2 ready route's "no": 400, what the protocol's clients read as not ready, with the
    reason in ``error`` (V2's error body) and ``ready: false`` (and ``name``) as a 200 says."""
    doc: dict[str, Any] = {"error": message}
    if name is not None:
        doc["name"] = name
    doc["ready"] = False
    return Response(orjson.dumps(doc), status_code=400, media_type="application/json",
                    headers={"x-amzn-errortype": f"{NotReady(message).code}:"})


def build_api(slot: ModelSlot, model_name: str, lifespan: Lifespan | None,
              server_metrics: ModelServerMetrics | None = None) -> FastAPI:
    """The control routes; ``server_metrics`` feed V2 statistics (none: no /stats route).

    ``lifespan`` None: the caller runs the server's lifespan (``server.control``,
    which also answers the probe and scrape routes itself and builds this app
    only when another control route is asked for).
    """
    app = FastAPI(title="kubeinfer model server", version=__version__, lifespan=lifespan)
    install_error_handlers(app, "see /docs for the model server's API")

    def known(name: str) -> None:
        if name != model_name:
            raise NotFound(f'Model "{name}" is not served here: this server serves '
                           f'"{model_name}"')

    @app.get("/ping", summary="SageMaker health check: 200 when the model is loaded")
    async def ping() -> Response:
        slot.get()
        return _json({"status": "Healthy"})

    @app.get("/v2/health/live", summary="V2 liveness: the process is up")
    async def live() -> Response:
        return _json({"live": True})

    @app.get("/v2/health/ready", summary="V2 readiness: 200 once the model serves, else 400")
    async def ready() -> Response:
        if slot.model is None:
            return v2_not_ready(slot.reason)
        return _json({"ready": True})

    @app.get("/v2", summary="V2 server metadata")
    async def server_metadata() -> Response:
        return _json(v2_model.server_metadata())

    @app.get("/v2/models/{name}", summary="V2 model metadata")
    async def model_metadata(name: str) -> Response:
        known(name)
        return _json(v2_model.metadata(name, slot.get()))

    @app.get("/v2/models/{name}/ready", summary="V2 model readiness: 200 ready, else 400")
    async def model_ready(name: str) -> Response:
        known(name)
        if slot.model is None:
            return v2_not_ready(slot.reason, name)
        return _json({"name": name, "ready": True})

    @app.get("/v2/models/{name}/config", summary="Model configuration (Triton's extension)")
    async def model_config(name: str) -> Response:
        known(name)
        return _json(v2_model.config(name, slot.get()))

    if server_metrics is not None:
        stats_metrics = server_metrics

        @app.get("/v2/models/{name}/stats", summary="Inference statistics (Triton's extension)")
        async def model_stats(name: str) -> Response:
            known(name)
            return _json(v2_model.statistics(name, slot.get(), stats_metrics))

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus() -> Response:
        body, content_type = metrics.render_latest()
        return Response(body, media_type=content_type)

    document_routes(app, [
        Route("/invocations", "SageMaker inference",
              "JSON (`{\"instances\": [...]}`, a nested list, or `{\"inputs\": {...}}`), CSV "
              "rows, .npy or .npz in; JSON, CSV, .npy or .npz out, chosen by Accept. CSV and "
              ".npy carry one output: `output=<name>` in CustomAttributes, else the first; "
              "the answer names it (X-Kubeinfer-Output). .npz carries every output.",
              request=INFERENCE_CONTENT, response=INFERENCE_CONTENT,
              headers=INVOCATION_HEADERS),
        Route("/v2/models/{name}/infer", "Open Inference Protocol V2 inference",
              V2_INFER_DESCRIPTION, request=V2_CONTENT, response=V2_CONTENT),
    ])
    return app
