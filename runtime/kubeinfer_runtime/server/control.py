"""The model server's probe and scrape routes without FastAPI, which loads only when needed.

A fresh model-server process (every pod, on every scale-from-zero and rollout)
spent about half its start importing FastAPI and the pydantic layers it pulls
in (0.33 s of 0.75 s from start to first answer on the development machine),
for routes that its callers almost never use. The routes they do use all the
time (``/ping`` and the V2 health routes that readiness probes poll, a model's
V2 readiness, ``/metrics`` that Prometheus scrapes) are answered here by a few
lines of raw ASGI, with the very bytes FastAPI answered them with
(tests/unit/test_control_routes.py). Every other request on these routes'
app (metadata, configuration, statistics, ``/docs``, unknown routes, other
methods) goes to the FastAPI app of ``server.api``, built on the first such
request. This app also runs the model server's lifespan (what FastAPI's ran).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import orjson

from kubeinfer_runtime import metrics
from kubeinfer_runtime.errors import NotReady, Reply, render_error
from kubeinfer_runtime.metrics import ModelServerMetrics
from kubeinfer_runtime.server.hotpath import ASGIApp, Receive, Scope, Send
from kubeinfer_runtime.server.state import ModelSlot

#: The server's lifespan: entered at startup, left at shutdown.
Lifespan = Callable[[], AbstractAsyncContextManager[None]]

_JSON = "application/json"


def _response(status: int, body: bytes, media_type: str | None = None,
              headers: tuple[tuple[str, str], ...] = ()) -> Reply:
    """What Starlette's ``Response(body, status, headers, media_type)`` sends, header order
    included: the given headers, then Content-Length, then Content-Type."""
    raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]
    keys = [k for k, _ in raw]
    if b"content-length" not in keys:
        raw.append((b"content-length", str(len(body)).encode("latin-1")))
    if media_type is not None and b"content-type" not in keys:
        if media_type.startswith("text/") and "charset=" not in media_type.lower():
            media_type += "; charset=utf-8"
        raw.append((b"content-type", media_type.encode("latin-1")))
    return status, raw, body


def _json(doc: Any, status: int = 200, headers: tuple[tuple[str, str], ...] = ()) -> Reply:
    return _response(status, orjson.dumps(doc), _JSON, headers)


def _error(err: NotReady) -> Reply:
    """``api_errors.error_response``: our error, its Content-Length set again last."""
    status, headers, body = render_error(err)
    kept = tuple((k.decode(), v.decode()) for k, v in headers if k != b"content-length")
    return _response(status, body, None, kept)


def _v2_not_ready(message: str, name: str | None = None) -> Reply:
    """``api.v2_not_ready``: V2's "no" to a ready route."""
    doc: dict[str, Any] = {"error": message}
    if name is not None:
        doc["name"] = name
    doc["ready"] = False
    return _json(doc, 400, (("x-amzn-errortype", f"{NotReady(message).code}:"),))


class ControlRoutes:
    """ASGI app: lifespan, the probe and scrape routes, and the rest through FastAPI (lazily)."""

    def __init__(self, slot: ModelSlot, model_name: str, lifespan: Lifespan,
                 server_metrics: ModelServerMetrics | None = None) -> None:
        self.slot = slot
        self.model_name = model_name
        self.lifespan = lifespan
        self.server_metrics = server_metrics
        self._api: ASGIApp | None = None
        self._routes: dict[str, Callable[[], Reply]] = {
            "/ping": self._ping,
            "/v2/health/live": lambda: _json({"live": True}),
            "/v2/health/ready": self._ready,
            "/metrics": self._metrics,
        }
        # FastAPI's "{name}" never holds a "/": such a model's path is FastAPI's to refuse.
        if model_name and "/" not in model_name:
            self._routes[f"/v2/models/{model_name}/ready"] = self._model_ready

    @property
    def api(self) -> Any:
        """The FastAPI app of every other control route (``server.api``), built on first use."""
        if self._api is None:
            from kubeinfer_runtime.server.api import build_api

            self._api = build_api(self.slot, self.model_name, None, self.server_metrics)
        return self._api

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http" and scope["method"] == "GET":
            route = self._routes.get(scope["path"])
            if route is not None:
                status, headers, body = route()
                await send({"type": "http.response.start", "status": status,
                            "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
        if kind == "lifespan":
            await self._lifespan(receive, send)
            return
        await self.api(scope, receive, send)

    # -- routes (each as server.api's handler of the same path answers)

    def _ping(self) -> Reply:
        model = self.slot.model
        if model is None:
            return _error(NotReady(self.slot.reason))
        return _json({"status": "Healthy"})

    def _ready(self) -> Reply:
        if self.slot.model is None:
            return _v2_not_ready(self.slot.reason)
        return _json({"ready": True})

    def _model_ready(self) -> Reply:
        if self.slot.model is None:
            return _v2_not_ready(self.slot.reason, self.model_name)
        return _json({"name": self.model_name, "ready": True})

    @staticmethod
    def _metrics() -> Reply:
        body, content_type = metrics.render_latest()
        return _response(200, body, content_type)

    # -- the ASGI lifespan protocol, as Starlette runs it

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        await receive()  # lifespan.startup
        context = self.lifespan()
        try:
            await context.__aenter__()
        except BaseException as exc:
            await send({"type": "lifespan.startup.failed", "message": repr(exc)})
            raise
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        try:
            await context.__aexit__(None, None, None)
        except BaseException as exc:
            await send({"type": "lifespan.shutdown.failed", "message": repr(exc)})
            raise
        await send({"type": "lifespan.shutdown.complete"})
