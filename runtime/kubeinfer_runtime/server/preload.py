"""Loading the model while the server process is still starting.

A fresh model server used to start loading its model only once uvicorn had
imported and built the app and run its lifespan: every step of the start came
one after the other. The entry point (``python -m kubeinfer_runtime serve``,
one worker) now calls :func:`start` as soon as the settings are valid, before
uvicorn is imported, so the model is fetched, its session built and its warm-up
inference run on the loader thread while the main thread imports uvicorn and
builds the app; the work that releases the GIL (reading and hashing the file,
onnxruntime's session and inferences) runs on the other core. The app factory
then :func:`take` s the slot being loaded instead of starting again.
Readiness is unchanged: ``/ping`` answers 503 until the model is loaded and
warmed up, whichever started the loading.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from kubeinfer_runtime.metrics import ModelServerMetrics
from kubeinfer_runtime.server.state import ModelSlot, start_loading
from kubeinfer_runtime.server_env import ServerConfig


@dataclass(frozen=True)
class Preloaded:
    """A model being loaded for ``settings`` before the app existed."""

    settings: ServerConfig
    slot: ModelSlot
    metrics: ModelServerMetrics
    thread: threading.Thread


_pending: Preloaded | None = None
_lock = threading.Lock()


def start(settings: ServerConfig) -> Preloaded:
    """Start loading the model of a single-model server now (on a daemon thread)."""
    global _pending
    from kubeinfer_runtime.server.app import configure_logging

    configure_logging(settings.log_level)  # the loader logs; say it as the server would
    slot = ModelSlot(settings.model_name, settings.model_uri)
    metrics = ModelServerMetrics(settings.endpoint_name, settings.variant_name,
                                 settings.model_name)
    metrics.loaded.set(0)
    loaded = Preloaded(settings, slot, metrics, start_loading(slot, settings, metrics))
    with _lock:
        _pending = loaded
    return loaded


def take(settings: ServerConfig) -> Preloaded | None:
    """The model being loaded for these settings, once (None: none was started)."""
    global _pending
    with _lock:
        loaded, _pending = _pending, None
    return loaded if loaded is not None and loaded.settings == settings else None
