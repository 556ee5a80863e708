"""The model server's one model: fetched, loaded and warmed up in the background.

The server process must come up (and answer liveness) before the model is
ready, and must stay up when the model cannot load, reporting why on ``/ping``
and ``/v2/health/ready`` instead of crash-looping with the reason buried in a
log. ``ModelSlot`` holds that state; ``load_into`` is the loading procedure
run on a daemon thread (a daemon, so SIGTERM during a long download still exits
promptly).

Readiness means "answers": the slot goes Loading → WarmingUp → Ready, and only
Ready publishes the model (``slot.model``), which every reader of readiness
(``/ping``, the V2 ready routes, the hot path, the async worker, pipeline
steps) already checks. A warm-up inference that fails (see ``models.warmup``)
ends in Failed, for good, with a reason holding :data:`LOAD_FAILED_MARKER`: the
local supervisor abandons a rollout at once on it, and on Kubernetes the
readiness probe keeps failing, so the Deployment never replaces the old pods.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from dataclasses import dataclass
from enum import Enum
from typing import Literal

from kubeinfer_runtime.codec import DecodeLimits
from kubeinfer_runtime.codec_v2_fast import V2Lane, build_v2_lane
from kubeinfer_runtime.errors import NotReady, RuntimeServiceError
from kubeinfer_runtime.metrics import ModelServerMetrics
from kubeinfer_runtime.models.base import Backend, ModelMetadata
from kubeinfer_runtime.models.registry import create_backend
from kubeinfer_runtime.models.warmup import WarmupResult, WarmupStatus, run_warmup
from kubeinfer_runtime.server.json_lane import JsonLane, build_json_lane
from kubeinfer_runtime.server_env import ServerConfig
from kubeinfer_runtime.storage.fetch import fetch_model
from kubeinfer_runtime.wire import LOAD_FAILED_EXIT_CODE

log = logging.getLogger("kubeinfer.server")

#: Models faster than this (warm, batch of one) run inline on the event loop.
#: Handing a call to a thread and back costs tens of µs (future, thread wake-up,
#: call_soon_threadsafe), more than a small scikit-learn model takes (~6 µs),
#: so inline roughly doubles their throughput. Above ~1 ms, running inline
#: would stall every other connection on the loop (health checks, bodies being
#: read) for the model's whole run, while onnxruntime releases the GIL in a
#: thread, so slower models go to the inference thread pool.
INLINE_THRESHOLD_S = 0.001
#: In every reason of a model that will never be ready in this process (it
#: never retries: a new model means a new process). The local supervisor
#: matches it (``kubeinfer_operator.local.supervisor.LOAD_FAILED``) to give up
#: a rollout at once instead of waiting for ``--timeout``; keep them equal.
LOAD_FAILED_MARKER = "failed to load"
#: Kubernetes keeps at most 4096 bytes of a termination message.
TERMINATION_MESSAGE_CHARS = 4000


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
    #: The commonest V2 requests' decoder (``codec_v2_fast``); None: general decoder only.
    v2_lane: V2Lane | None = None

    @property
    def version(self) -> str:
        """The V2 model version: the first 12 hex digits of the file's sha256."""
        return self.sha256[:12]


class Phase(Enum):
    """Where a slot's model is; only READY serves."""

    LOADING = "Loading"
    WARMING_UP = "WarmingUp"
    READY = "Ready"
    FAILED = "Failed"
    UNLOADED = "Unloaded"


#: The phases each phase may move to. FAILED and UNLOADED are final: a new
#: model means a new process (or, in a multi-model cache, a new slot).
TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.LOADING: frozenset({Phase.WARMING_UP, Phase.FAILED, Phase.UNLOADED}),
    Phase.WARMING_UP: frozenset({Phase.READY, Phase.FAILED, Phase.UNLOADED}),
    Phase.READY: frozenset({Phase.UNLOADED}),
    Phase.FAILED: frozenset({Phase.UNLOADED}),
    Phase.UNLOADED: frozenset(),
}


class SlotStateError(RuntimeError):
    """A transition the readiness state machine does not allow (a bug, not a user error)."""


class ModelSlot:
    """Where the served model lives; read lock-free by the hot path.

    ``model`` is set only in READY (by :meth:`publish`), so ``model is not
    None`` is readiness; ``reason`` says why not otherwise. One loader thread
    writes, any thread reads (single attribute writes, atomic in CPython).
    """

    def __init__(self, name: str, uri: str) -> None:
        self.name = name
        self.uri = uri
        self.phase = Phase.LOADING
        #: Set once, when the model is ready; never unset except at shutdown.
        self.model: LoadedModel | None = None
        self.reason = f'Model "{name}" is still loading from {uri}'

    @property
    def failed(self) -> bool:
        """True once loading or warm-up failed for good."""
        return self.phase is Phase.FAILED

    def get(self) -> LoadedModel:
        model = self.model
        if model is None:
            raise NotReady(self.reason)
        return model

    def _move(self, to: Phase) -> None:
        if to not in TRANSITIONS[self.phase]:
            raise SlotStateError(f'Model "{self.name}" cannot go from {self.phase.value} to '
                                 f"{to.value}")
        self.phase = to

    def warming_up(self) -> None:
        """The model loaded; a warm-up inference must answer before it serves."""
        self._move(Phase.WARMING_UP)
        self.reason = (f'Model "{self.name}" is loaded from {self.uri} and warming up: it '
                       "takes traffic once a first inference answers")

    def publish(self, model: LoadedModel) -> None:
        """Warm-up passed (or could not be tried): serve ``model``."""
        self._move(Phase.READY)
        self.reason = ""
        self.model = model

    def fail(self, detail: str) -> str:
        """Loading or warm-up failed for good; the reason (with the marker) is returned."""
        self._move(Phase.FAILED)
        self.reason = f'Model "{self.name}" {LOAD_FAILED_MARKER} from {self.uri}: {detail}'
        return self.reason

    def unload(self) -> LoadedModel | None:
        """Shutting down: stop serving; returns the model to release, if any (once)."""
        if self.phase is Phase.UNLOADED:
            return None
        self._move(Phase.UNLOADED)
        self.reason = f'Model "{self.name}" is unloaded: the server is shutting down'
        model, self.model = self.model, None
        return model


def decode_limits(settings: ServerConfig) -> DecodeLimits:
    """What one request may decode to: ``max_decoded_bytes``, or 4 x ``max_payload_bytes``."""
    return DecodeLimits.for_settings(settings.max_payload_bytes, settings.max_decoded_bytes)


def choose_inline(mode: Literal["auto", "inline", "thread"], warmup_s: float | None) -> bool:
    """Whether predict runs on the event loop: explicit mode, else by warm-up latency."""
    if mode != "auto":
        return mode == "inline"
    return warmup_s is not None and warmup_s < INLINE_THRESHOLD_S


#: The fix a failed warm-up's reason names for a served model.
ROLLBACK_FIX = ("fix the model or its declared input shapes; the previous version, if any, "
                "keeps serving")


def warmup_failure(result: WarmupResult, fix: str = ROLLBACK_FIX) -> str:
    """The detail of a failed warm-up for a reason or error: what failed, and ``fix``."""
    return f"{result.failure()}; every request would fail the same way: {fix}"


def log_warmup(name: str, result: WarmupResult) -> None:
    """The one log line of a warm-up that could not be tried."""
    if result.status is WarmupStatus.SKIPPED:
        log.warning('Model "%s" is served without a warm-up inference: %s; the first request '
                    "pays the warm-up and predicts in the thread pool", name, result.detail)


def load_into(slot: ModelSlot, settings: ServerConfig,
              metrics: ModelServerMetrics) -> None:
    """Fetch, load and warm up the model, then publish it in ``slot``. Never raises."""
    stage = "load"
    try:
        t0 = time.perf_counter()
        fetched = fetch_model(settings.model_uri, base_dir=settings.model_base_dir,
                              cache_dir=settings.model_cache_dir, s3=settings.s3(),
                              max_bytes=settings.max_model_bytes)
        t1 = time.perf_counter()
        metrics.download_seconds.observe(t1 - t0)
        backend = create_backend(settings.model_format,
                                 intra_op_threads=settings.intra_op_threads)
        backend.load(fetched.path)
        meta = backend.metadata()
        slot.warming_up()
        stage = "warmup"
        result = run_warmup(backend, meta)
        metrics.load_seconds.observe(time.perf_counter() - t1)
        if result.status is WarmupStatus.FAILED:
            backend.unload()
            raise _WarmupFailed(warmup_failure(result))
        log_warmup(slot.name, result)
        inline = choose_inline(settings.inference_mode, result.latency_s)
        limits = decode_limits(settings)
        lane = build_json_lane(backend, meta, limits)
        v2_lane = build_v2_lane(meta, limits)
    except Exception as e:
        if slot.phase is Phase.UNLOADED:
            return  # the server shut down while the model loaded
        detail = e.message if isinstance(e, RuntimeServiceError) else str(e) or type(e).__name__
        reason = slot.fail(detail)
        log.error("%s", reason)
        metrics.load_failed(stage)
        if settings.exit_on_load_failure:
            exit_for_restart(reason, settings.termination_message_path)
        return
    # Everything alive now (FastAPI, pydantic, onnxruntime, the model) lives as
    # long as the process: move it out of the collector's sight so full
    # collections stay short (they showed as 100 ms p99 spikes under load).
    gc.collect()
    gc.freeze()
    warmup_s = result.latency_s
    try:
        slot.publish(LoadedModel(backend, meta, fetched.sha256, inline, warmup_s, lane, v2_lane))
    except SlotStateError:
        backend.unload()  # the server shut down while the model warmed up
        return
    metrics.loaded.set(1)
    log.info('Model "%s" ready from %s (sha256 %s, warm-up %s, predict %s)', slot.name,
             slot.uri, fetched.sha256,
             "n/a" if warmup_s is None else f"{warmup_s * 1e6:.0f} µs",
             "inline" if inline else "in the thread pool")


def exit_for_restart(reason: str, message_path: str) -> None:
    """End the process so its supervisor (the kubelet) restarts it: ``reason`` goes to
    ``message_path`` (Kubernetes shows it as the container's last state) and the exit
    code is ``LOAD_FAILED_EXIT_CODE``. At once, from the loader's thread: the process
    has nothing to serve, and a clean shutdown could end with code 0."""
    try:
        with open(message_path, "w") as f:
            f.write(reason[:TERMINATION_MESSAGE_CHARS])
    except OSError as exc:  # no such file outside Kubernetes: the log has it anyway
        log.warning("Termination message not written to %s: %s", message_path,
                    exc.strerror or type(exc).__name__)
    for handler in logging.getLogger().handlers + log.handlers:
        handler.flush()
    os._exit(LOAD_FAILED_EXIT_CODE)


class _WarmupFailed(Exception):
    """Carries a failed warm-up's detail to ``load_into``'s one failure path."""


def start_loading(slot: ModelSlot, settings: ServerConfig,
                  metrics: ModelServerMetrics) -> threading.Thread:
    thread = threading.Thread(target=load_into, args=(slot, settings, metrics),
                              name="model-loader", daemon=True)
    thread.start()
    return thread
