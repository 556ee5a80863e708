"""An async endpoint's queue is bounded (spec.async.maxQueuedRequests).

A real gateway and a real Redis, no worker: the stream keeps what is queued. Past
the bound a new request is refused with 429 ThrottlingException and Retry-After,
nothing is written to Redis for it, and a retry of an accepted InferenceId is still
answered 202 (it is not new work). Once a request leaves the stream (a worker
finished it), a new one is accepted again.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from kubeinfer_runtime.contract import AsyncRoute
from tests.support.async_stack import AsyncStack
from tests.support.redis_server import RedisServer

BOUND = 3


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory,
          redis_server: RedisServer) -> Iterator[AsyncStack]:
    work = tmp_path_factory.mktemp("async-bound")
    route = AsyncRoute(queue="bounded", output_path=f"file://{work}/out",
                       failure_path=f"file://{work}/failed",
                       input_paths=[f"file://{work}/in/"], max_queued=BOUND)
    s = AsyncStack("bounded", route, work, {})
    s.start_gateway(redis_server.url)
    yield s
    s.stop()


def _submit(stack: AsyncStack, inference_id: str) -> httpx.Response:
    assert stack.gateway is not None
    return httpx.post(f"{stack.gateway.url}/endpoints/bounded/async-invocations", headers={
        "X-Amzn-SageMaker-InputLocation": f"file://{stack.workdir}/in/{inference_id}.json",
        "X-Amzn-SageMaker-Inference-Id": inference_id}, timeout=10, trust_env=False)


def test_a_full_queue_refuses_new_requests_but_answers_retries(
        stack: AsyncStack, redis_server: RedisServer) -> None:
    keys = stack.route.keys
    r = redis_server.client()
    for i in range(BOUND):
        assert _submit(stack, f"req-{i}").status_code == 202
    assert r.xlen(keys.stream) == BOUND

    refused = _submit(stack, "one-too-many")
    assert refused.status_code == 429, refused.text
    assert refused.headers["x-amzn-errortype"].startswith("ThrottlingException")
    assert refused.headers["retry-after"] == "5"
    message = refused.json()["Message"]
    assert f"{BOUND} requests queued or in progress" in message
    assert "spec.async.maxQueuedRequests" in message
    # Nothing of it reached Redis: no entry, no idempotency hash.
    assert r.xlen(keys.stream) == BOUND
    assert not r.exists(keys.inference("one-too-many"))

    # A retry of an accepted request is answered as before, full queue or not.
    again = _submit(stack, "req-1")
    assert again.status_code == 202 and again.json()["InferenceId"] == "req-1"
    assert r.xlen(keys.stream) == BOUND

    # A worker finishing one (XACK + XDEL) makes room for one more.
    first = r.xrange(keys.stream, count=1)[0][0]
    r.xdel(keys.stream, first)
    assert _submit(stack, "one-too-many").status_code == 202
    assert _submit(stack, "and-another").status_code == 429
    metrics = httpx.get(f"{stack.gateway.url}/metrics", trust_env=False).text  # type: ignore[union-attr]
    assert 'kubeinfer_async_refused_total{endpoint="bounded"} 2.0' in metrics

