"""The model server's one model: fetched, loaded and warmed up in the background.

The server process must come up (and answer liveness) before the model is
ready, and must stay up when the model cannot load, reporting why on ``/ping``
and ``/v2/health/ready`` instead of crash-looping with the reason buried in a
log. ``ModelSlot`` holds that state; ``load_into`` is the loading procedure
run on a daemon thread (a daemon, so SIGTERM during a long download still exits
promptly).
"""

from __future__ import annotations

import gc
import logging
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np

from kubeinfer_runtime.codec import DecodeLimits
from kubeinfer_runtime.contract import ModelServerSettings
from kubeinfer_runtime.errors import NotReady, RuntimeServiceError
from kubeinfer_runtime.metrics import ModelServerMetrics
from kubeinfer_runtime.models.base import Backend, ModelMetadata, Tensors
from kubeinfer_runtime.models.registry import create_backend
from kubeinfer_runtime.server.json_lane import JsonLane, build_json_lane
from kubeinfer_runtime.storage.fetch import fetch_model

log = logging.getLogger("kubeinfer.server")

#: Models faster than this (warm, batch of one) run inline on the event loop.
#: Handing a call to a thread and back costs tens of µs (future, thread wake-up,
#: call_soon_threadsafe), more than a small scikit-learn model takes (~6 µs),
#: so inline roughly doubles their throughput. Above ~1 ms, running inline
#: would stall every other connection on the loop (health checks, bodies being
#: read) for the model's whole run, while onnxruntime releases the GIL in a
#: thread, so slower models go to the inference thread pool.
INLINE_THRESHOLD_S = 0.001
_WARMUP_RUNS = 5


@dataclass(frozen=True)
class LoadedModel:
    backend: Backend
    meta: ModelMetadata
    sha256: str
    #: Run predict on the event loop thread (see INLINE_THRESHOLD_S).
    inline: bool
    #: Median warm latency at batch 1, None when no warm-up input could be made.
    warmup_s: float | None
    #: The commonest request as one function (``json_lane``); None: general path only.
    json_lane: JsonLane | None = None

    @property
    def version(self) -> str:
        """The V2 model version: the first 12 hex digits of the file's sha256."""
        return self.sha256[:12]


class ModelSlot:
    """Where the served model lives; read lock-free by the hot path."""

    def __init__(self, name: str, uri: str) -> None:
        self.name = name
        self.uri = uri
        #: Set once, when the model is ready; never unset except at shutdown.
        self.model: LoadedModel | None = None
        self.reason = f'Model "{name}" is still loading from {uri}'
        self.failed = False

    def get(self) -> LoadedModel:
        model = self.model
        if model is None:
            raise NotReady(self.reason)
        return model


def decode_limits(settings: ModelServerSettings) -> DecodeLimits:
    """What one request may decode to: ``max_decoded_bytes``, or 4 x ``max_payload_bytes``."""
    return DecodeLimits.for_settings(settings.max_payload_bytes, settings.max_decoded_bytes)


def choose_inline(mode: Literal["auto", "inline", "thread"], warmup_s: float | None) -> bool:
    """Whether predict runs on the event loop: explicit mode, else by warm-up latency."""
    if mode != "auto":
        return mode == "inline"
    return warmup_s is not None and warmup_s < INLINE_THRESHOLD_S


def sample_inputs(meta: ModelMetadata) -> Tensors | None:
    """Zeros of batch 1 for every input, or None when a shape is unknown."""
    out: Tensors = {}
    for spec in meta.inputs:
        if spec.shape is None:
            return None
        shape = tuple(1 if d is None else d for d in spec.shape)
        if spec.dtype.kind == "O":
            out[spec.name] = np.full(shape, "", dtype=object)
        else:
            out[spec.name] = np.zeros(shape, dtype=spec.dtype)
    return out


def warm_up(backend: Backend, meta: ModelMetadata) -> float | None:
    """Run the model a few times; the median warm latency, or None if it cannot run.

    The first run also pays onnxruntime's lazy allocations, so the first real
    request does not.
    """
    sample = sample_inputs(meta)
    if sample is None:
        return None
    try:
        backend.predict(sample)
        times = []
        for _ in range(_WARMUP_RUNS):
            t0 = time.perf_counter()
            backend.predict(sample)
            times.append(time.perf_counter() - t0)
    except RuntimeServiceError as e:
        # Zeros are not valid input for every model; serving still works.
        log.warning("Warm-up of the model failed (%s): predicting in the thread pool",
                    e.message)
        return None
    return statistics.median(times)


def load_into(slot: ModelSlot, settings: ModelServerSettings,
              metrics: ModelServerMetrics) -> None:
    """Fetch, load and warm up the model, then publish it in ``slot``. Never raises."""
    try:
        t0 = time.perf_counter()
        fetched = fetch_model(settings.model_uri, base_dir=settings.model_base_dir,
                              cache_dir=settings.model_cache_dir, s3=settings.s3())
        t1 = time.perf_counter()
        metrics.download_seconds.observe(t1 - t0)
        backend = create_backend(settings.model_format,
                                 intra_op_threads=settings.intra_op_threads)
        backend.load(fetched.path)
        meta = backend.metadata()
        warmup_s = warm_up(backend, meta)
        inline = choose_inline(settings.inference_mode, warmup_s)
        metrics.load_seconds.observe(time.perf_counter() - t1)
    except Exception as e:
        detail = e.message if isinstance(e, RuntimeServiceError) else str(e) or type(e).__name__
        slot.reason = f'Model "{slot.name}" failed to load from {slot.uri}: {detail}'
        slot.failed = True
        log.error("%s", slot.reason)
        return
    # Everything alive now (FastAPI, pydantic, onnxruntime, the model) lives as
    # long as the process: move it out of the collector's sight so full
    # collections stay short (they showed as 100 ms p99 spikes under load).
    gc.collect()
    gc.freeze()
    slot.model = LoadedModel(backend, meta, fetched.sha256, inline, warmup_s,
                             build_json_lane(backend, meta, decode_limits(settings)))
    metrics.loaded.set(1)
    log.info('Model "%s" ready from %s (sha256 %s, warm-up %s, predict %s)', slot.name,
             slot.uri, fetched.sha256,
             "n/a" if warmup_s is None else f"{warmup_s * 1e6:.0f} µs",
             "inline" if inline else "in the thread pool")


def start_loading(slot: ModelSlot, settings: ModelServerSettings,
                  metrics: ModelServerMetrics) -> threading.Thread:
    thread = threading.Thread(target=load_into, args=(slot, settings, metrics),
                              name="model-loader", daemon=True)
    thread.start()
    return thread
