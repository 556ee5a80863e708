"""The model server of a multi-model endpoint: hot path plus SageMaker's model-management API.

Inference (``POST /invocations`` with ``X-Amzn-SageMaker-Target-Model``,
``POST /models/{name}/invoke``, ``POST /v2/models/{name}/infer``) is served by
the raw-ASGI :class:`MultiModelHotPath`, which differs from the single-model
one only by where the model comes from: a lease on the cache, held for the
whole request so eviction never unloads a model in use. The rest is FastAPI:
SageMaker's multi-model container API (``GET/POST /models``,
``GET/DELETE /models/{name}``) and the V2 repository extension (index, load,
unload). V2 model readiness never loads anything: 200 for a loaded model,
400 for any other name (``tritonclient``'s ``is_model_ready`` reads the status).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response

from kubeinfer_runtime import __version__, codec, metrics
from kubeinfer_runtime.api_errors import bounded_body, install_error_handlers
from kubeinfer_runtime.api_errors import error_response as _error
from kubeinfer_runtime.contract import H_TARGET_MODEL
from kubeinfer_runtime.errors import (
    NotFound,
    NotReady,
    PayloadTooLarge,
    RuntimeServiceError,
    ValidationError,
)
from kubeinfer_runtime.models.cache import ModelCache
from kubeinfer_runtime.openapi_docs import (
    INFERENCE_CONTENT,
    INVOCATION_HEADERS,
    V2_CONTENT,
    V2_INFER_DESCRIPTION,
    Header,
    Route,
    document_routes,
)
from kubeinfer_runtime.server import v2_model
from kubeinfer_runtime.server.api import Lifespan, _json, v2_not_ready
from kubeinfer_runtime.server.hotpath import (
    ASGIApp,
    InferenceService,
    Receive,
    Scope,
    Send,
    _headers,
    read_body,
    serve_guarded,
)
from kubeinfer_runtime.server.state import LoadedModel
from kubeinfer_runtime.server.work import (
    OutHeaders,
    invocations_output,
    invocations_work,
    v2_headers,
    v2_work,
)
from kubeinfer_runtime.storage.target import ModelPrefix, check_target

log = logging.getLogger("kubeinfer.server")

_TARGET = H_TARGET_MODEL.encode()
_MODELS = "/models/"
_INVOKE = "/invoke"
_V2_PREFIX = "/v2/models/"
_V2_SUFFIX = "/infer"

Cache = ModelCache[LoadedModel]

#: The largest ``POST /models`` body: a model name and a url (each at most a few KiB).
MAX_LOAD_BODY_BYTES = 64 << 10


async def _load_body(request: Request) -> bytes:
    """The ``POST /models`` body, refused (413) as soon as it is over
    ``MAX_LOAD_BODY_BYTES`` (``request.body()`` would read any size)."""
    return await bounded_body(request, MAX_LOAD_BODY_BYTES, PayloadTooLarge(
        f"POST /models body is over {MAX_LOAD_BODY_BYTES} bytes: send "
        'only {"model_name": ..., "url": ...}'))


def _describe_url(url: object, prefix: ModelPrefix) -> str:
    """A refused url as an error message describes it (never its bytes: a caller's
    input is not echoed): its type, or its length and whether it is under the prefix."""
    if not isinstance(url, str):
        return f"url (a JSON {type(url).__name__}, not a string)"
    bases = (prefix.describe(""), prefix.uri.rstrip("/") + "/")
    where = "under the prefix" if url.startswith(bases) else "not under the prefix"
    return f"url (a string of {len(url)} characters, {where})"


class AdminDisabled(RuntimeServiceError):
    """A model-management route while ``KUBEINFER_ADMIN_API`` is off (403)."""

    def __init__(self, message: str) -> None:
        super().__init__(403, "AccessDeniedException", message)


def _target_header(raw: list[tuple[bytes, bytes]]) -> str | None:
    for k, v in raw:
        if k == _TARGET:
            return v.decode("latin-1")
    return None


class MultiModelHotPath:
    """ASGI app: the multi-model inference routes; everything else goes to ``app``."""

    def __init__(self, app: ASGIApp, service: InferenceService, cache: Cache) -> None:
        self.app = app
        self.service = service
        self.cache = cache

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            path: str = scope["path"]
            if path == "/invocations":
                await self._handle(scope, receive, send, None, v2=False)
                return
            if path.startswith(_MODELS) and path.endswith(_INVOKE):
                await self._handle(scope, receive, send, path[len(_MODELS):-len(_INVOKE)],
                                   v2=False)
                return
            if path.startswith(_V2_PREFIX) and path.endswith(_V2_SUFFIX):
                name = path[len(_V2_PREFIX):-len(_V2_SUFFIX)].split("/versions/", 1)[0]
                await self._handle(scope, receive, send, name, v2=True)
                return
        await self.app(scope, receive, send)

    async def _handle(self, scope: Scope, receive: Receive, send: Send, name: str | None,
                      *, v2: bool) -> None:
        svc = self.service
        t0 = time.perf_counter()
        svc.metrics.invocations.value += 1

        async def work() -> tuple[bytes, OutHeaders, float]:
            nonlocal name
            raw_headers = scope["headers"]
            accept: str | None = None
            if v2:
                content_type, length, header_length = v2_headers(raw_headers)
            else:
                content_type, accept, length = _headers(raw_headers)
                header_length = None
            if name is None:
                name = _target_header(raw_headers)
                if name is None:
                    raise ValidationError(
                        "Header X-Amzn-SageMaker-Target-Model is missing: this is a "
                        "multi-model endpoint; name the model with TargetModel= (boto3), "
                        "relative to the endpoint's prefix")
            check_target(name)
            encoding = codec.negotiate(accept) if not v2 else codec.Encoding.JSON
            body = await read_body(receive, length, svc.max_payload_bytes)
            # The lease keeps the model from eviction until predict is done.
            lease = await self.cache.acquire(name)
            try:
                model = lease.value
                loop = asyncio.get_running_loop()
                if v2:
                    if model.inline:
                        payload, model_s, headers = v2_work(model, body, name, svc.limits,
                                                            header_length)
                    else:
                        payload, model_s, headers = await loop.run_in_executor(
                            svc.pool, v2_work, model, body, name, svc.limits, header_length)
                    return payload, headers, model_s
                output, headers = invocations_output(encoding, model.meta.outputs, raw_headers)
                if model.inline:
                    payload, model_s = invocations_work(model, body, content_type, encoding,
                                                        svc.limits, output)
                else:
                    payload, model_s = await loop.run_in_executor(
                        svc.pool, invocations_work, model, body, content_type, encoding,
                        svc.limits, output)
            finally:
                lease.release()
            return payload, headers, model_s

        await serve_guarded(send, svc.metrics, scope["path"], t0, work, v2=v2)


def build_multimodel_api(cache: Cache, prefix: ModelPrefix, lifespan: Lifespan,
                         not_ready: Callable[[], str | None] = lambda: None, *,
                         admin: bool = False) -> FastAPI:
    """FastAPI app of a multi-model server: health, model management, metadata, metrics.

    ``not_ready`` says why the server cannot load models yet (None once it can).
    ``admin``: serve the routes that load and unload models (off by default: any
    caller reaching a model server could otherwise evict every tenant's model).
    Listing what is loaded, and loading on first use, work either way.
    """
    app = FastAPI(title="kubeinfer multi-model server", version=__version__, lifespan=lifespan)
    install_error_handlers(app, "see /docs for the multi-model server's API")
    target = (Header("X-Amzn-SageMaker-Target-Model", "The model, relative to the prefix",
                     required=True),)
    document_routes(app, [
        Route("/invocations", "SageMaker multi-model inference",
              "Loads the target model on first use (LRU cache bounded by bytes).",
              request=INFERENCE_CONTENT, response=INFERENCE_CONTENT,
              headers=(*target, *INVOCATION_HEADERS)),
        Route("/models/{name}/invoke", "SageMaker MME container API: invoke a model",
              headers=INVOCATION_HEADERS),
        Route("/v2/models/{name}/infer", "Open Inference Protocol V2 inference",
              V2_INFER_DESCRIPTION, request=V2_CONTENT, response=V2_CONTENT),
    ])

    def described(name: str) -> dict[str, Any]:
        return {"modelName": name, "modelUrl": prefix.describe(name)}

    def loaded_or_404(name: str) -> None:
        check_target(name)
        if not cache.is_loaded(name):
            raise NotFound(f'Model "{name}" is not loaded: load it with POST /models, or '
                           "invoke it (models load on first use)")

    def check_ready() -> None:
        reason = not_ready()
        if reason is not None:
            raise NotReady(reason)

    def check_admin(what: str) -> None:
        if not admin:
            raise AdminDisabled(f"{what} is disabled on this model server: models load on "
                                "first use and are evicted least recently used; set "
                                "KUBEINFER_ADMIN_API=true on the model server to manage them "
                                "by hand")

    @app.get("/ping", summary="Health: ready once the model store can be reached; models "
                              "load on first use")
    async def ping() -> Response:
        check_ready()
        return _json({"status": "Healthy"})

    @app.get("/v2/health/live")
    async def live() -> Response:
        return _json({"live": True})

    @app.get("/v2/health/ready", summary="V2 readiness: 200 once models can load, else 400")
    async def ready() -> Response:
        reason = not_ready()
        if reason is not None:
            return v2_not_ready(reason)
        return _json({"ready": True})

    @app.get("/v2", summary="V2 server metadata")
    async def server_metadata() -> Response:
        return _json(v2_model.server_metadata("model_repository"))

    @app.get("/models", summary="SageMaker MME: list loaded models")
    async def list_models() -> Response:
        return _json({"models": [described(n) for n, _ in reversed(cache.loaded())]})

    @app.post("/models", summary="SageMaker MME: load a model "
                                 "({'model_name': ..., 'url': optional path under the prefix})")
    async def load_model(request: Request) -> Response:
        check_admin("Loading a model (POST /models)")
        try:
            doc = orjson.loads(await _load_body(request))
        except orjson.JSONDecodeError:
            doc = None
        if not isinstance(doc, dict) or not isinstance(doc.get("model_name"), str):
            raise ValidationError('POST /models needs a JSON body {"model_name": "<path under '
                                  'the prefix>"}')
        name = check_target(doc["model_name"])  # before any message quotes it
        url = doc.get("url")
        joined = prefix.uri.rstrip("/") + "/" + name  # as written, whatever its trailing "/"
        if url not in (None, name, prefix.describe(name), joined):
            raise ValidationError(f'Model "{name}": {_describe_url(url, prefix)} differs from '
                                  "the model name; models are named by their path under the "
                                  f"prefix ({prefix.uri}), so omit url or set it to that path")
        if not await cache.preload(name):
            return _error(ValidationError(f'Model "{name}" is already loaded', status=409))
        return _json({"message": f'Model "{name}" loaded'})

    @app.get("/models/{name:path}", summary="SageMaker MME: describe a loaded model")
    async def get_model(name: str) -> Response:
        loaded_or_404(name)
        return _json(described(name))

    @app.delete("/models/{name:path}", summary="SageMaker MME: unload a model")
    async def delete_model(name: str) -> Response:
        check_admin("Unloading a model (DELETE /models/{name})")
        loaded_or_404(name)
        cache.unload(name)
        return _json({"message": f'Model "{name}" unloaded'})

    @app.post("/v2/repository/index", summary="V2 repository: loaded models")
    async def repository_index() -> Response:
        return _json([{"name": n, "state": "READY"} for n, _ in reversed(cache.loaded())])

    @app.post("/v2/repository/models/{name:path}/load", summary="V2 repository: load")
    async def repository_load(name: str) -> Response:
        check_admin("Loading a model (V2 repository load)")
        check_target(name)
        await cache.preload(name)
        return _json({"name": name, "state": "READY"})

    @app.post("/v2/repository/models/{name:path}/unload", summary="V2 repository: unload")
    async def repository_unload(name: str) -> Response:
        check_admin("Unloading a model (V2 repository unload)")
        loaded_or_404(name)
        cache.unload(name)
        return _json({"name": name, "state": "UNAVAILABLE"})

    @app.get("/v2/models/{name:path}/ready",
             summary="V2 model readiness: 200 when loaded, else 400 (never loads it)")
    async def model_ready(name: str) -> Response:
        check_target(name)
        if not cache.is_loaded(name):
            return v2_not_ready(f'Model "{name}" is not loaded: it loads on first use (infer), '
                                f"or with POST /v2/repository/models/{name}/load", name)
        return _json({"name": name, "ready": True})

    @app.get("/v2/models/{name:path}/stats", summary="Not per model here: see /metrics")
    async def model_stats(name: str) -> Response:
        check_target(name)
        raise NotFound("Inference statistics are kept per server on a multi-model endpoint, "
                       "not per model: read /metrics (kubeinfer_invocations_total, "
                       "kubeinfer_model_latency_seconds, kubeinfer_multimodel_*)")

    async def with_model(name: str, document: Callable[[str, LoadedModel], Any]) -> Response:
        check_target(name)
        lease = await cache.acquire(name)
        try:
            return _json(document(name, lease.value))
        finally:
            lease.release()

    @app.get("/v2/models/{name:path}/config", summary="Model configuration (loads the model)")
    async def model_config(name: str) -> Response:
        return await with_model(name, v2_model.config)

    @app.get("/v2/models/{name:path}", summary="V2 model metadata (loads the model)")
    async def model_metadata(name: str) -> Response:
        return await with_model(name, v2_model.metadata)

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus() -> Response:
        body, content_type = metrics.render_latest()
        return Response(body, media_type=content_type)

    return app
