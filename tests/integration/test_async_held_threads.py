"""A hung model: calls that never return hold every inference thread of an async worker.

A model call cannot be interrupted (``queue.inference_threads``), so such a worker
takes no work. Its probes must say so: readiness at once, liveness once that has
lasted ``KUBEINFER_HELD_THREADS_LIVENESS_S``, with one error in its log; and both
answer 200 again, and the requests are processed, once the calls return. The real
app under uvicorn with settings from its env, a real Redis, the iris model, file://
objects; the model call (``invocations_work``) is replaced by one that blocks on an
Event until the test lets it go: a deadlock in a custom handler, as the worker sees it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from kubeinfer_runtime.contract import AsyncQueueKeys, AsyncRoute
from kubeinfer_runtime.queue import app as queue_app
from kubeinfer_runtime.queue import processing
from kubeinfer_runtime.queue.request import AsyncRequest
from tests.support.async_stack import worker_env
from tests.support.ports import free_port, wait_until
from tests.support.redis_server import RedisServer, start_redis

ROWS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]
#: Short, so the test waits for it; long enough that liveness is seen passing first.
BOUND_S = 3.0


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = start_redis(tmp_path / "redis")
    yield server
    server.stop()


def _request(root: Path, data: Path, n: int) -> AsyncRequest:
    now = time.time()
    return AsyncRequest(
        inference_id=f"hung-{n}", endpoint="hung", input_location=f"file://{data}",
        output_location=f"file://{root}/out/hung-{n}.out",
        failure_location=f"file://{root}/failed/hung-{n}-error.out",
        content_type="application/json", accept="", custom_attributes="",
        received_at=now, expires_at=now + 3600, invocation_timeout_s=0.3)


def test_a_hung_model_fails_readiness_then_liveness_and_both_recover(
        tmp_path: Path, models_dir: Path, redis_server: RedisServer,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    release = threading.Event()
    real = processing.invocations_work

    def hung(*args: Any) -> Any:
        release.wait()  # forever, until the test lets it go
        return real(*args)

    monkeypatch.setattr(processing, "invocations_work", hung)
    root = tmp_path / "objects"
    (root / "in").mkdir(parents=True)
    data = root / "in" / "rows.json"
    data.write_text(json.dumps({"instances": ROWS}))
    route = AsyncRoute(queue="hung", output_path=f"file://{root}/out",
                       failure_path=f"file://{root}/failed")
    env = worker_env(model_path=models_dir / "iris.onnx", redis_url=redis_server.url,
                     route=route, s3_env={}, endpoint="hung", inference_threads="2",
                     max_concurrency="2", held_threads_liveness_s=str(BOUND_S),
                     model_cache_dir=str(tmp_path / "cache"))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    stream = AsyncQueueKeys(queue="hung").stream
    client = redis_server.client()
    for n in range(2):  # one per thread: both read at once, both hang
        client.xadd(stream, _request(root, data, n).to_fields())

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(queue_app.create_app(), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    url = f"http://127.0.0.1:{port}"
    answers: dict[str, httpx.Response] = {}

    def answers_with(path: str, status: int, words: str) -> bool:
        try:
            r = answers[path] = httpx.get(url + path, timeout=2.0)
        except httpx.HTTPError:
            return False
        return r.status_code == status and words in r.text

    caplog.set_level(logging.WARNING, logger="kubeinfer.queue")
    thread.start()
    try:
        # Both calls outlived their 0.3 s and hang: the worker takes nothing, says why.
        wait_until(lambda: answers_with("/ping", 503, "held by 2 model call(s)"), 60,
                   "/ping to say the threads are held")
        held = answers["/ping"].json()["Message"]
        assert held.startswith("Async worker takes no requests: all 2 inference thread(s) "
                               "are held by 2 model call(s) that outlived their "
                               "InvocationTimeoutSeconds (the oldest has run ")
        assert f"after {BOUND_S:g}s (KUBEINFER_HELD_THREADS_LIVENESS_S)" in held
        assert "instances" not in held and "5.1" not in held  # no request bytes
        assert answers_with("/v2/health/ready", 503, "held by 2 model call(s)")
        # Not restarted yet: a held thread may still return within the bound.
        assert answers_with("/v2/health/live", 200, "live")
        # Past the bound: liveness fails, so the kubelet restarts the pod.
        wait_until(lambda: answers_with("/v2/health/live", 503, "Async worker is stuck"),
                   BOUND_S + 30, "/v2/health/live to fail")
        stuck = answers["/v2/health/live"].json()["Message"]
        assert f"over {BOUND_S:g}s (KUBEINFER_HELD_THREADS_LIVENESS_S): restart it" in stuck
        assert answers_with("/ping", 503, "Async worker is stuck")
        assert answers_with("/v2/health/live", 503, "Async worker is stuck")  # asked again
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and errors[0].startswith("Async worker is stuck: all 2 ")
        # Nothing took an empty wait for a loop error (the loop waits on time instead).
        assert "loop error" not in caplog.text

        release.set()  # the calls return: the threads are free, the requests run
        wait_until(lambda: answers_with("/ping", 200, '"status":"ok"'), 30, "/ping ready")
        assert answers_with("/v2/health/live", 200, "live")
        for n in range(2):
            out = root / "out" / f"hung-{n}.out"
            wait_until(out.exists, 30, f"output {out}", interval=0.1)
            assert json.loads(out.read_bytes())["predictions"]["label"] == [0, 2]
        assert "an inference thread is free again" in caplog.text
    finally:
        release.set()
        server.should_exit = True
        thread.join(30)
    assert not thread.is_alive(), "the worker did not stop"
