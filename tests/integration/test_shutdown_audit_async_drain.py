"""An async worker stopped by SIGTERM neither runs a request twice nor fails it for it.

While a stopping worker lets in-flight requests finish (``drain_timeout_s``), it must go
on touching their entries: otherwise an entry whose model call outlasts the visibility
timeout looks abandoned, and another worker's XAUTOCLAIM takes it and runs it a second
time while this one still does (two inferences, two writes, two notifications). What it
could not finish in time it releases to other workers without using up one of the
request's attempts: being stopped is not the request's fault, and counted it would fail
requests longer than the drain after ``maxRetries`` rolling updates or scale-downs. The real
app under uvicorn with settings from its env, a real Redis, the iris model, file://
objects; the model call (``invocations_work``) blocks on an Event until the test lets it
go, as a slow model would.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from kubeinfer_runtime.contract import AsyncRoute
from kubeinfer_runtime.queue import app as queue_app
from kubeinfer_runtime.queue import processing
from kubeinfer_runtime.queue.request import parse_async_request
from kubeinfer_runtime.server.hotpath import invocations_work
from tests.support.async_stack import worker_env
from tests.support.ports import free_port, wait_until
from tests.support.redis_server import RedisServer

ROWS = [[5.1, 3.5, 1.4, 0.2]]
#: Short, so an untouched entry soon looks abandoned (the heartbeat runs every third).
VISIBILITY_S = 3.0


def _slow_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, queue: str
                ) -> tuple[threading.Event, threading.Event, Path, AsyncRoute]:
    """The model call waits for ``release`` (``started`` once it runs); an input object
    and the route of a queue named ``queue`` under ``tmp_path``."""
    started, release = threading.Event(), threading.Event()
    real = invocations_work

    def slow(*args: Any) -> Any:
        started.set()
        release.wait(60)
        return real(*args)

    monkeypatch.setattr(processing, "invocations_work", slow)
    root = tmp_path / "objects"
    (root / "in").mkdir(parents=True)
    data = root / "in" / "rows.json"
    data.write_text(json.dumps({"instances": ROWS}))
    route = AsyncRoute(queue=queue, output_path=f"file://{root}/out",
                       failure_path=f"file://{root}/failed")
    return started, release, data, route


def _enqueue(client: Any, route: AsyncRoute, endpoint: str, inference_id: str,
             data: Path) -> None:
    """Queue a request for ``data`` as the gateway would (its locations below the route's)."""
    req = parse_async_request(endpoint, route, {
        "x-amzn-sagemaker-inputlocation": f"file://{data}",
        "x-amzn-sagemaker-inference-id": inference_id,
        "x-amzn-sagemaker-invocationtimeoutseconds": "60"})
    client.xadd(route.keys.stream, req.to_fields())


def test_a_draining_worker_keeps_touching_what_it_still_runs(
        tmp_path: Path, models_dir: Path, redis_server: RedisServer,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    started, release, data, route = _slow_model(tmp_path, monkeypatch, "drain")
    root = data.parent.parent
    env = worker_env(model_path=models_dir / "iris.onnx", redis_url=redis_server.url,
                     route=route, s3_env={}, endpoint="drain",
                     visibility_timeout_s=str(VISIBILITY_S), drain_timeout_s="30",
                     model_cache_dir=str(tmp_path / "cache"))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    keys = route.keys
    client = redis_server.client()
    _enqueue(client, route, "drain", "slow-1", data)

    server = uvicorn.Server(uvicorn.Config(queue_app.create_app(), host="127.0.0.1",
                                           port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    caplog.set_level(logging.INFO, logger="kubeinfer.queue")
    thread.start()
    try:
        wait_until(started.is_set, 60, "the model call to start")
        server.should_exit = True  # what SIGTERM does
        wait_until(lambda: any("Draining 1 in-flight" in r.getMessage()
                               for r in caplog.records), 30, "the drain to begin")

        # The entry's idle time goes back to near zero at each touch: seen drop once the
        # drain has begun, it is still being touched.
        last = [-1]

        def touched() -> bool:
            pending = client.xpending_range(keys.stream, keys.group, min="-", max="+",
                                            count=1)
            idle = int(pending[0]["time_since_delivered"])
            assert idle < VISIBILITY_S * 1000, f"left untouched for {idle} ms while running"
            dropped = 0 <= idle < last[0]
            last[0] = idle
            return dropped

        wait_until(touched, 3 * VISIBILITY_S, "a touch of the entry during the drain",
                   interval=0.05)
        release.set()
        thread.join(30)
        assert not thread.is_alive(), "the worker did not finish its drain"
        assert (root / "out" / "slow-1.out").exists()
    finally:
        release.set()
        server.should_exit = True
        thread.join(30)


def test_a_request_released_at_shutdown_keeps_its_attempts(
        tmp_path: Path, models_dir: Path, redis_server: RedisServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    started, release, data, route = _slow_model(tmp_path, monkeypatch, "release")
    root = data.parent.parent
    # No retries: a release counted as an attempt would fail the request at once.
    env = worker_env(model_path=models_dir / "iris.onnx", redis_url=redis_server.url,
                     route=route, s3_env={}, endpoint="release", max_retries="0",
                     drain_timeout_s="0.2", model_cache_dir=str(tmp_path / "cache"))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    keys = route.keys
    client = redis_server.client()
    _enqueue(client, route, "release", "long-1", data)

    def serve() -> tuple[uvicorn.Server, threading.Thread]:
        server = uvicorn.Server(uvicorn.Config(queue_app.create_app(), host="127.0.0.1",
                                               port=free_port(), log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        return server, thread

    first, thread = serve()
    try:
        wait_until(started.is_set, 60, "the model call to start")
        first.should_exit = True  # what SIGTERM does: the call outlasts the drain
        thread.join(30)
        assert not thread.is_alive(), "the first worker did not stop"
    finally:
        release.set()  # its thread ends; its result is dropped (the task was cancelled)
        first.should_exit = True
        thread.join(30)
    assert client.hget(keys.inference("long-1"), "attempts") in (None, "0")

    second, thread = serve()  # the next worker takes the released entry and finishes it
    try:
        wait_until(lambda: client.hget(keys.inference("long-1"), "done") is not None, 60,
                   "the released request to finish")
        assert client.hget(keys.inference("long-1"), "done") == "success", \
            (root / "failed" / "long-1-error.out").read_text()
        assert (root / "out" / "long-1.out").exists()
    finally:
        second.should_exit = True
        thread.join(30)
