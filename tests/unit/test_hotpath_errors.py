"""The model server's hot path when a request fails in ways the codec cannot foresee.

A backend that raises something unexpected gets a logged 500 InternalFailure
(the server keeps serving), a client that disconnects mid-body gets nothing
and is counted as 499, and a non-POST is a 405. Driven as ASGI, no sockets;
``Broken`` is a backend plugin (the ``Backend`` interface), not a mock.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import MutableMapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from kubeinfer_runtime.metrics import ModelServerMetrics
from kubeinfer_runtime.models.base import Backend, ModelMetadata, Tensors, TensorSpec
from kubeinfer_runtime.server.hotpath import HotPath, InferenceService
from kubeinfer_runtime.server.state import LoadedModel, ModelSlot

META = ModelMetadata(inputs=(TensorSpec("x", np.dtype(np.float32), (None, 2)),),
                     outputs=(TensorSpec("y", np.dtype(np.float32), (None, 2)),),
                     platform="test")


class Broken(Backend):
    """Answers the first call, then fails with a bug-like error."""

    def __init__(self) -> None:
        self.calls = 0

    def load(self, path: Path) -> None: ...

    def predict(self, inputs: Tensors, output_names: Sequence[str] | None = None) -> Tensors:
        self.calls += 1
        if self.calls > 1:
            raise KeyError("a bug in a backend")
        return {"y": inputs["x"] * 2}

    def unload(self) -> None: ...

    def metadata(self) -> ModelMetadata:
        return META


async def _run(app: HotPath, method: str, chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []
    queue = list(chunks)

    async def receive() -> dict[str, Any]:
        return queue.pop(0)

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(dict(message))

    scope = {"type": "http", "method": method, "path": "/invocations",
             "headers": [(b"content-type", b"application/json")]}
    await app(scope, receive, send)
    return sent


@pytest.fixture
def served() -> tuple[HotPath, ModelServerMetrics]:
    slot = ModelSlot("m", "file:///m")
    slot.model = LoadedModel(Broken(), META, "0" * 64, inline=True, warmup_s=None)
    metrics = ModelServerMetrics("ep-errors", "v", "m")
    service = InferenceService(slot, metrics, ThreadPoolExecutor(1), 1 << 20)

    async def fallback(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("inference routes never reach FastAPI")

    return HotPath(fallback, service, "m"), metrics


def body(data: bytes, more: bool = False) -> dict[str, Any]:
    return {"type": "http.request", "body": data, "more_body": more}


def test_unexpected_backend_failure_is_a_logged_500_and_the_server_goes_on(
        served: tuple[HotPath, ModelServerMetrics], caplog: pytest.LogCaptureFixture) -> None:
    app, metrics = served
    ok = asyncio.run(_run(app, "POST", [body(b"[[1, 2]]")]))
    assert ok[0]["status"] == 200 and orjson.loads(ok[1]["body"]) == {"predictions": [[2, 4]]}
    with caplog.at_level(logging.ERROR, logger="kubeinfer.server"):
        failed = asyncio.run(_run(app, "POST", [body(b"[[1, 2]]")]))
    assert failed[0]["status"] == 500
    doc = orjson.loads(failed[1]["body"])
    assert doc["ErrorCode"] == "InternalFailure" and "model server's log" in doc["Message"]
    assert "a bug in a backend" in caplog.text  # the traceback is in the log
    assert metrics._errors[500].value == 1


def test_client_gone_mid_body_gets_nothing_and_counts_as_499(
        served: tuple[HotPath, ModelServerMetrics]) -> None:
    app, metrics = served
    sent = asyncio.run(_run(app, "POST", [body(b"[[1,", more=True),
                                          {"type": "http.disconnect"}]))
    assert sent == []
    assert metrics._errors[499].value == 1


def test_get_on_invocations_is_405(served: tuple[HotPath, ModelServerMetrics]) -> None:
    app, _ = served
    sent = asyncio.run(_run(app, "GET", []))
    assert sent[0]["status"] == 405 and b"use POST" in sent[1]["body"]
