"""The async-worker role's process: the model, the queue loop, ``/ping`` and ``/metrics``.

``kubeinfer-runtime serve --role async-worker`` runs ``create_app`` under
uvicorn like the other roles, so supervisors and kubelet probe it the same
way: ``/ping`` answers 200 once the model is loaded and Redis answers, 503
with the reason before. Both it and liveness also fail when the worker can
take no work for good: its loop ended, or model calls that outlived their
timeout hold every inference thread (readiness at once, liveness after a
bound: ``held_threads``). The queue loop runs as a lifespan task; SIGTERM makes
uvicorn run the lifespan shutdown, which stops reading and drains (see
``worker``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import orjson
from fastapi import FastAPI, Response

from kubeinfer_runtime import __version__
from kubeinfer_runtime.api_errors import error_response, install_error_handlers
from kubeinfer_runtime.contract import AsyncWorkerSettings
from kubeinfer_runtime.contract.outbound import OutboundPolicy
from kubeinfer_runtime.contract.redact import redact_url
from kubeinfer_runtime.errors import NotReady
from kubeinfer_runtime.metrics import ModelServerMetrics, render_latest
from kubeinfer_runtime.metrics_listener import metrics_listener
from kubeinfer_runtime.queue.notifier import Notifier
from kubeinfer_runtime.queue.objects import ObjectStore
from kubeinfer_runtime.queue.worker import Worker, worker_confinement
from kubeinfer_runtime.server.app import configure_logging
from kubeinfer_runtime.server.state import ModelSlot, start_loading

log = logging.getLogger("kubeinfer.queue")


def _log_end(task: asyncio.Task[None], worker: Worker) -> None:
    """Say why the consuming loop ended, when it did on its own or failed while stopping."""
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.error("Async worker %s stopped consuming its queue (%s: %s)", worker.consumer,
                  type(exc).__name__, exc, exc_info=exc)
    elif not worker.stopping.is_set():
        log.error("Async worker %s stopped consuming its queue", worker.consumer)


def create_app(settings: AsyncWorkerSettings | None = None) -> FastAPI:
    """uvicorn factory: settings from ``KUBEINFER_*`` env when None."""
    import redis.asyncio

    settings = settings or AsyncWorkerSettings.from_env()
    configure_logging(settings.log_level)
    # Parsed before anything starts: a bad KUBEINFER_OUTBOUND_ALLOW fails the process
    # at once with the entry named, instead of refusing every notification later.
    outbound = OutboundPolicy.parse(settings.outbound_allow)
    slot = ModelSlot(settings.model_name, settings.model_uri)
    model_metrics = ModelServerMetrics(settings.endpoint_name, settings.variant_name,
                                       settings.model_name)
    state: dict[str, Worker] = {}
    tasks: dict[str, asyncio.Task[None]] = {}

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        start_loading(slot, settings, model_metrics)
        client = redis.asyncio.from_url(settings.redis_url, decode_responses=True)
        confinement = worker_confinement(settings)
        store = ObjectStore(settings.s3(), connections=settings.max_concurrency * 2,
                            max_read_bytes=settings.max_input_bytes,
                            file_roots=[p[len("file://"):] for p in confinement.input_prefixes
                                        if p.startswith("file://")])
        notifier = Notifier(policy=outbound, attempts=settings.notify_attempts,
                            backoff_first_s=settings.notify_backoff_s,
                            connections=settings.max_concurrency * 2)
        pool = ThreadPoolExecutor(max_workers=settings.inference_threads,
                                  thread_name_prefix="inference")
        worker = state["worker"] = Worker(settings, slot, client, store, notifier, pool)
        task = tasks["worker"] = asyncio.create_task(worker.run(), name="async-worker")
        task.add_done_callback(lambda t: _log_end(t, worker))
        async with metrics_listener(settings.host, settings.metrics_port):
            yield
        await worker.stop()
        # Its error, if any, was logged when it ended (_log_end).
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        await notifier.close()
        await client.aclose()
        pool.shutdown(wait=False, cancel_futures=True)
        log.info("Async worker %s stopped", worker.consumer)

    api = FastAPI(title="kubeinfer async worker", version=__version__, lifespan=lifespan)
    install_error_handlers(api, "the async worker serves /ping, /v2/health/* and /metrics; "
                                "requests go to the gateway's async-invocations")

    def loop_ended() -> bool:
        """The consuming loop ended though nobody stopped it (it never does by itself)."""
        worker, task = state.get("worker"), tasks.get("worker")
        return (worker is not None and task is not None and task.done()
                and not worker.stopping.is_set())

    #: Both probes fail when the loop ended: this process takes no work, so nothing may
    #: count it as a worker, and the kubelet (liveness) restarts it; the logs say why.
    _ENDED = "Async worker stopped consuming its queue: restart it (its log says why)"

    @api.get("/v2/health/live",
             summary="Liveness: 200 while the process serves and consumes its queue")
    async def live() -> Response:
        if loop_ended():
            return error_response(NotReady(_ENDED))
        worker = state.get("worker")
        held = worker.held_threads(time.monotonic()) if worker is not None else None
        if held is not None and not held.live:
            return error_response(NotReady(held.not_live()))
        return Response(orjson.dumps({"live": True}), media_type="application/json")

    @api.get("/v2/health/ready", summary="Readiness, as /ping (the kubelet probes this)")
    @api.get("/ping", summary="Ready once the model is loaded and Redis answers")
    async def ping() -> Response:
        worker = state.get("worker")
        try:
            if loop_ended():
                raise NotReady(_ENDED)
            slot.get()
            if worker is None:
                raise NotReady("Async worker is starting")
            held = worker.held_threads(time.monotonic())
            if held is not None:
                raise NotReady(held.not_ready() if held.live else held.not_live())
            try:
                await worker.redis.ping()
            except Exception as e:
                raise NotReady(f"Async worker cannot reach Redis at "
                               f"{redact_url(settings.redis_url)} "
                               f"({type(e).__name__}): check KUBEINFER_REDIS_URL") from None
        except NotReady as err:
            return error_response(err)
        body = orjson.dumps({"status": "ok", "queue": settings.queue,
                             "consumer": worker.consumer, "in_flight": len(worker.inflight),
                             # Not a readiness failure: the worker holds its requests.
                             "paused": ("object store unreachable: taking no new requests"
                                        if worker.gate.is_open else "")})
        return Response(body, media_type="application/json")

    @api.get("/metrics", summary="Prometheus metrics")
    async def prometheus() -> Response:
        body, content_type = render_latest()
        return Response(body, media_type=content_type)

    return api
