"""The probe and scrape routes answered without FastAPI answer as FastAPI did, byte for byte.

``server.control`` answers ``/ping``, the V2 health routes, the served model's
V2 readiness and ``/metrics`` itself, so a fresh model server imports no
FastAPI to start. Each of them, in every state of the model (loading, warming
up, ready, failed), is compared with the FastAPI app of ``server.api`` (status,
headers in order, body); everything else (other methods, other names, a
trailing slash, unknown routes) must reach that FastAPI app, built only then.
Also: the lifespan runs as Starlette ran it, and the entry point's import of
the server imports no FastAPI.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import pytest

from kubeinfer_runtime.metrics import ModelServerMetrics
from kubeinfer_runtime.models.base import Backend, ModelMetadata, TensorSpec
from kubeinfer_runtime.server.api import build_api
from kubeinfer_runtime.server.control import ControlRoutes
from kubeinfer_runtime.server.state import LoadedModel, ModelSlot

META = ModelMetadata(inputs=(TensorSpec("x", np.dtype(np.float32), (None, 2)),),
                     outputs=(TensorSpec("y", np.dtype(np.float32), (None, 2)),),
                     platform="test")


class Idle(Backend):
    def load(self, path: Any) -> None: ...

    def predict(self, inputs: Any, output_names: Any = None) -> Any:
        return {"y": inputs["x"]}

    def unload(self) -> None: ...

    def metadata(self) -> ModelMetadata:
        return META


def _slot(state: str, name: str = "m") -> ModelSlot:
    slot = ModelSlot(name, "file:///models/m.onnx")
    if state in ("warming", "ready", "failed"):
        slot.warming_up()
    if state == "ready":
        slot.publish(LoadedModel(Idle(), META, "0" * 64, True, None))
    if state == "failed":
        slot.fail("warm-up inference failed")
    return slot


async def _call(app: Callable[..., Any], method: str, path: str,
                query: bytes = b"") -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    sent: list[dict[str, Any]] = []
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": path, "raw_path": path.encode(),
             "root_path": "", "query_string": query, "headers": [(b"host", b"t")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start, body = sent[0], b"".join(m.get("body", b"") for m in sent[1:])
    return start["status"], [tuple(h) for h in start["headers"]], body


def _families(reply: tuple[int, list[tuple[bytes, bytes]], bytes]) -> tuple[Any, ...]:
    """A scrape's status, header names and content type, and the metric names it holds."""
    status, headers, body = reply
    names = sorted(line.split()[2] for line in body.decode().splitlines()
                   if line.startswith("# TYPE "))
    return status, [k for k, _ in headers], dict(headers)[b"content-type"], names


@asynccontextmanager
async def _no_lifespan() -> AsyncIterator[None]:
    yield


def _apps(slot: ModelSlot) -> tuple[ControlRoutes, Any]:
    metrics = ModelServerMetrics("ep-control", "v", slot.name)
    return (ControlRoutes(slot, slot.name, _no_lifespan, metrics),
            build_api(slot, slot.name, None, metrics))


ROUTES = ["/ping", "/v2/health/live", "/v2/health/ready", "/v2/models/m/ready", "/metrics"]


@pytest.mark.parametrize("state", ["loading", "warming", "ready", "failed"])
@pytest.mark.parametrize("path", ROUTES)
def test_answered_without_fastapi_as_fastapi_answers(state: str, path: str) -> None:
    async def run() -> None:
        control, api = _apps(_slot(state))
        ours = await _call(control, "GET", path)
        assert control._api is None, "answered without building the FastAPI app"
        theirs = await _call(api, "GET", path)
        if path == "/metrics":  # live values (GC, the process) move between two scrapes
            ours, theirs = _families(ours), _families(theirs)
        assert ours == theirs
        assert ours[0] in (200, 400, 503)

    asyncio.run(run())


@pytest.mark.parametrize(("method", "path", "query"), [
    ("HEAD", "/ping", b""), ("POST", "/ping", b""), ("GET", "/ping/", b""),
    ("GET", "/v2/models/other/ready", b""), ("GET", "/v2/models/m", b""), ("GET", "/v2", b""),
    ("GET", "/v2/models/m/config", b""), ("GET", "/nowhere", b""), ("DELETE", "/metrics", b""),
    ("GET", "/ping", b"x=1"), ("GET", "/docs", b""),
])
def test_everything_else_is_fastapis(method: str, path: str, query: bytes) -> None:
    async def run() -> None:
        for state in ("loading", "ready"):
            control, api = _apps(_slot(state))
            assert await _call(control, method, path, query) == await _call(api, method, path,
                                                                             query)

    asyncio.run(run())


def test_a_model_name_with_a_slash_is_left_to_fastapi() -> None:
    async def run() -> None:
        control, api = _apps(_slot("ready", name="a/b"))
        got = await _call(control, "GET", "/v2/models/a/b/ready")
        assert got == await _call(api, "GET", "/v2/models/a/b/ready")
        assert got[0] == 404

    asyncio.run(run())


def test_the_lifespan_runs_as_starlette_runs_it() -> None:
    events: list[str] = []

    @asynccontextmanager
    async def lifespan() -> AsyncIterator[None]:
        events.append("startup")
        yield
        events.append("shutdown")

    async def run() -> list[str]:
        control = ControlRoutes(_slot("loading"), "m", lifespan)
        inbox: asyncio.Queue[dict[str, str]] = asyncio.Queue()
        sent: list[str] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message["type"])

        await inbox.put({"type": "lifespan.startup"})
        await inbox.put({"type": "lifespan.shutdown"})
        await control({"type": "lifespan"}, inbox.get, send)
        return sent

    assert asyncio.run(run()) == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert events == ["startup", "shutdown"]


def test_a_failed_startup_is_reported_then_raised() -> None:
    @asynccontextmanager
    async def lifespan() -> AsyncIterator[None]:
        raise OSError("port taken")
        yield

    async def run() -> list[dict[str, Any]]:
        control = ControlRoutes(_slot("loading"), "m", lifespan)
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, str]:
            return {"type": "lifespan.startup"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        with pytest.raises(OSError):
            await control({"type": "lifespan"}, receive, send)
        return sent

    [failed] = asyncio.run(run())
    assert failed["type"] == "lifespan.startup.failed" and "port taken" in failed["message"]


def test_starting_the_model_server_imports_no_fastapi() -> None:
    """What ``serve --role model-server`` imports to build its app (the budget test
    in tests/integration/test_start_budget.py measures the whole start)."""
    code = ("import sys; from kubeinfer_runtime.contract import ModelServerSettings; "
            "from kubeinfer_runtime.server.app import create_app; "
            "create_app(ModelServerSettings(model_uri='file:///nowhere.onnx')); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('fastapi', 'starlette', 'minio', 'boto3', 'botocore', 'onnxruntime')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
