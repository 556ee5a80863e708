"""The model server's control surface on FastAPI: health, metadata, metrics, docs.

These routes are cheap and rarely called, so they get FastAPI's conveniences
(OpenAPI at ``/docs``). The inference routes are only described in the
OpenAPI document: :mod:`kubeinfer_runtime.server.hotpath` answers them before
FastAPI ever sees the request. Handlers stay thin: they read the model slot and render.
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
from kubeinfer_runtime.errors import (
    NotFound,
)
from kubeinfer_runtime.openapi_docs import V2_CONTENT, Header, Route, document_routes
from kubeinfer_runtime.server.state import LoadedModel, ModelSlot

Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]


def _json(doc: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(doc), status_code=status, media_type="application/json")


def _v2_metadata(name: str, model: LoadedModel) -> dict[str, Any]:
    return {
        "name": name,
        "versions": [model.version],
        "platform": model.meta.platform,
        "inputs": [t.v2() for t in model.meta.inputs],
        "outputs": [t.v2() for t in model.meta.outputs],
    }


def build_api(slot: ModelSlot, model_name: str, lifespan: Lifespan) -> FastAPI:
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

    @app.get("/v2/health/ready", summary="V2 readiness: the model is loaded")
    async def ready() -> Response:
        slot.get()
        return _json({"ready": True})

    @app.get("/v2", summary="V2 server metadata")
    async def server_metadata() -> Response:
        return _json({"name": "kubeinfer", "version": __version__, "extensions": []})

    @app.get("/v2/models/{name}", summary="V2 model metadata")
    async def model_metadata(name: str) -> Response:
        known(name)
        return _json(_v2_metadata(name, slot.get()))

    @app.get("/v2/models/{name}/ready", summary="V2 model readiness")
    async def model_ready(name: str) -> Response:
        known(name)
        slot.get()
        return _json({"name": name, "ready": True})

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus() -> Response:
        body, content_type = metrics.render_latest()
        return Response(body, media_type=content_type)

    document_routes(app, [
        Route("/invocations", "SageMaker inference",
              "JSON (`{\"instances\": [...]}`, a nested list, or `{\"inputs\": {...}}`), CSV "
              "rows or .npy in; JSON, CSV or .npy out, chosen by Accept.",
              headers=(Header("Content-Type", "application/json, text/csv or "
                                              "application/x-npy"),
                       Header("Accept", "application/json (default), text/csv or "
                                        "application/x-npy"))),
        Route("/v2/models/{name}/infer", "Open Inference Protocol V2 inference",
              "`{\"inputs\": [{\"name\", \"shape\", \"datatype\", \"data\"}]}`",
              request=V2_CONTENT, response=V2_CONTENT),
    ])
    return app
