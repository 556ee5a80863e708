"""Assemble the model-server ASGI app: the hot path, then the control routes.

``create_app`` is the uvicorn factory (``factory=True``): with no argument it
reads its settings from the environment (``server_env``), so every uvicorn worker
builds its own app the same way. Loading runs in the background, so the port
answers (liveness, and ``/ping`` 503 until the model is warm) while a large
model downloads: started by the entry point before uvicorn was even imported
(``server.preload``), else at startup, in the lifespan. The single-model
server imports no FastAPI to start (``server.control``).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from kubeinfer_runtime.metrics import ModelServerMetrics
from kubeinfer_runtime.metrics_listener import metrics_listener
from kubeinfer_runtime.server import preload
from kubeinfer_runtime.server.control import ControlRoutes
from kubeinfer_runtime.server.hotpath import ASGIApp, HotPath, InferenceService
from kubeinfer_runtime.server.state import ModelSlot, decode_limits, start_loading
from kubeinfer_runtime.server_env import ServerConfig, model_server_settings

if TYPE_CHECKING:
    from kubeinfer_runtime.contract import ModelServerSettings

log = logging.getLogger("kubeinfer.server")


def configure_logging(level: str) -> None:
    """Our loggers next to uvicorn's (uvicorn only configures its own)."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kubeinfer").setLevel(level.upper())


def create_app(settings: ServerConfig | None = None) -> ASGIApp:
    if settings is None:
        settings = model_server_settings()  # from the environment
    configure_logging(settings.log_level)
    if settings.multi_model_prefix is not None:
        return create_multimodel_app(_contract_settings(settings))
    if settings.pipeline is not None:
        from kubeinfer_runtime.pipeline.app import create_pipeline_app

        return create_pipeline_app(_contract_settings(settings))
    preloaded = preload.take(settings)
    if preloaded is not None:
        slot, metrics = preloaded.slot, preloaded.metrics
    else:
        slot = ModelSlot(settings.model_name, settings.model_uri)
        metrics = ModelServerMetrics(settings.endpoint_name, settings.variant_name,
                                     settings.model_name)
        metrics.loaded.set(0)
    pool = ThreadPoolExecutor(max_workers=settings.inference_threads,
                              thread_name_prefix="inference")

    @asynccontextmanager
    async def lifespan() -> AsyncIterator[None]:
        if preloaded is None:
            start_loading(slot, settings, metrics)
        async with metrics_listener(settings.host, settings.metrics_port):
            yield
        # uvicorn has drained in-flight requests by now (graceful shutdown).
        pool.shutdown(wait=False, cancel_futures=True)
        model = slot.unload()
        metrics.loaded.set(0)
        if model is not None:
            model.backend.unload()
        log.info('Model "%s" unloaded, shutting down', slot.name)

    control = ControlRoutes(slot, settings.model_name, lifespan, metrics)
    service = InferenceService(slot, metrics, pool, settings.max_payload_bytes,
                               decode_limits(settings))
    return HotPath(control, service, settings.model_name)


def _contract_settings(settings: ServerConfig) -> ModelServerSettings:
    """A multi-model or pipeline variant's settings: always the contract's model
    (``server_env`` reads single-model servers only)."""
    from kubeinfer_runtime.contract import ModelServerSettings

    assert isinstance(settings, ModelServerSettings)
    return settings


def create_multimodel_app(settings: ModelServerSettings) -> ASGIApp:
    """A multi-model server: nothing loads at start; models load on first use."""
    from kubeinfer_runtime.metrics import MultiModelMetrics
    from kubeinfer_runtime.models.cache import ModelCache
    from kubeinfer_runtime.server.multimodel import MultiModelStore
    from kubeinfer_runtime.server.multimodel_app import MultiModelHotPath, build_multimodel_api

    prefix = settings.multi_model_prefix
    assert prefix is not None
    metrics = ModelServerMetrics(settings.endpoint_name, settings.variant_name,
                                 settings.model_name)
    mme_metrics = MultiModelMetrics(settings.endpoint_name, settings.variant_name)
    pool = ThreadPoolExecutor(max_workers=settings.inference_threads,
                              thread_name_prefix="inference")
    # Loads get their own threads: a slow download must not hold up inference.
    loaders = ThreadPoolExecutor(max_workers=4, thread_name_prefix="model-loader")
    store = MultiModelStore(settings, mme_metrics, loaders)
    cache = ModelCache(store, settings.cache_bytes)
    mme_metrics.watch(cache)

    @asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        if store.not_ready is not None:
            # Import minio and build the client now, not on the first request.
            loaders.submit(store.warm_up)
        async with metrics_listener(settings.host, settings.metrics_port):
            yield
        pool.shutdown(wait=False, cancel_futures=True)
        loaders.shutdown(wait=False, cancel_futures=True)
        store.disk.close()  # this process's downloaded models

    api = build_multimodel_api(cache, store.prefix, lifespan, lambda: store.not_ready,
                               admin=settings.admin_api)
    service = InferenceService(ModelSlot(settings.model_name, prefix),
                               metrics, pool, settings.max_payload_bytes,
                               decode_limits(settings))
    return MultiModelHotPath(api, service, cache)
