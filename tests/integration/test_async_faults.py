"""Zero loss under crashes: 1,000 async requests while workers are SIGKILLed mid-flight.

Every request must end with exactly one final object (output or failure; a
request re-processed after a crash overwrites the same deterministic key), no
request may be lost (each has its object and its notification), and writes are
counted per InferenceId (a Redis hash the worker bumps after each object
write) to show how often a crash made a worker write the same object again.
Notifications are at least once: the receiver deduplicates by inferenceId.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kubeinfer_runtime.contract import AsyncQueueKeys, AsyncRoute
from tests.support.async_stack import AsyncStack, worker_env
from tests.support.ports import wait_until
from tests.support.redis_server import RedisServer, start_redis
from tests.support.webhook import WebhookReceiver

BUCKET = "async-faults"
REQUESTS = 1000
KILLS = 4
CONCURRENCY = 8


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = start_redis(tmp_path / "redis")
    yield server
    server.stop()


def _submit_all(url: str, inputs: list[str], ids: list[str]) -> None:
    """Submit every request, in order, from one keep-alive connection (a thread).

    Sequential on purpose: an asyncio httpx client is slower than this here.
    """
    with httpx.Client(base_url=url, trust_env=False) as client:
        for i in range(REQUESTS):
            r = client.post("/endpoints/iris/async-invocations", headers={
                "X-Amzn-SageMaker-InputLocation": inputs[i % len(inputs)],
                "X-Amzn-SageMaker-Inference-Id": f"req-{i:04d}"})
            assert r.status_code == 202, r.text
            ids.append(r.json()["InferenceId"])


def _in_flight(url: str) -> int:
    try:
        r = httpx.get(url + "/ping", timeout=1.0)
    except httpx.HTTPError:
        return 0
    return int(r.json().get("in_flight", 0)) if r.status_code == 200 else 0


def _keys_under(s3_server: Any, prefix: str) -> list[str]:
    return [o.object_name.rsplit("/", 1)[1]
            for o in s3_server.minio().list_objects(BUCKET, prefix=prefix, recursive=True)]


def test_sigkilled_workers_lose_and_duplicate_nothing(tmp_path: Path, s3_server: Any,
                                                      redis_server: RedisServer,
                                                      models_dir: Path) -> None:
    import io

    started = time.monotonic()
    client = s3_server.minio()
    if not client.bucket_exists(BUCKET):
        client.make_bucket(BUCKET)
    inputs = []
    rng = random.Random(5)
    for i in range(10):
        rows = [[rng.uniform(0, 8) for _ in range(4)] for _ in range(3)]
        data = json.dumps({"instances": rows}).encode()
        client.put_object(BUCKET, f"in/{i}.json", io.BytesIO(data), len(data))
        inputs.append(f"s3://{BUCKET}/in/{i}.json")
    hooks = WebhookReceiver()
    route = AsyncRoute(queue="faults", output_path=f"s3://{BUCKET}/out",
                       failure_path=f"s3://{BUCKET}/failed")
    env = worker_env(model_path=models_dir / "iris.onnx", redis_url=redis_server.url,
                     route=route, s3_env=s3_server.env(), endpoint="iris",
                     success_url=hooks.url + "/ok", error_url=hooks.url + "/error",
                     max_concurrency=str(CONCURRENCY), max_retries="5",
                     visibility_timeout_s="1.5", notify_backoff_s="0.05", log_level="warning")
    stack = AsyncStack("iris", route, tmp_path, env)
    try:
        for _ in range(3):
            stack.start_worker(wait=False)  # they start while the gateway does
        gateway = stack.start_gateway(redis_server.url)
        stack.wait_workers()
        t_ready = time.monotonic()
        ids: list[str] = []
        submitter = threading.Thread(target=_submit_all, args=(gateway.url, inputs, ids))
        submitter.start()
        r = redis_server.client()
        keys = AsyncQueueKeys(queue="faults")
        kills = 0
        deadline = time.monotonic() + 30
        while kills < KILLS and time.monotonic() < deadline:
            if not submitter.is_alive() and r.xlen(keys.stream) == 0:
                break
            # Kill only a worker that holds requests right now: each kill is mid-flight.
            victim = next((w for w in stack.workers if _in_flight(w.url) > 0), None)
            if victim is None:
                time.sleep(0.02)
                continue
            stack.kill_worker(victim)
            kills += 1
            if len(stack.workers) < 2:
                stack.start_worker(wait=False)  # a replacement, as a Deployment would
            time.sleep(0.3)
        submitter.join()
        t_submitted = time.monotonic()
        assert len(set(ids)) == REQUESTS
        assert kills >= 2, "the queue drained before the workers could be killed twice"

        def finished() -> bool:
            return len(_keys_under(s3_server, "out/")) + len(_keys_under(s3_server,
                                                                         "failed/")) >= REQUESTS

        wait_until(finished, 45, "every request's final object", interval=0.5)
        wait_until(lambda: len({n["inferenceId"] for n in hooks.snapshot()}) >= REQUESTS, 20,
                   "every notification", interval=0.2)
        wait_until(lambda: r.xlen(keys.stream) == 0, 10, "an empty stream", interval=0.2)
        print(f"\nsetup {t_ready - started:.1f}s, submit+kills {t_submitted - t_ready:.1f}s, "
              f"process {time.monotonic() - t_submitted:.1f}s")
    finally:
        stack.stop()
        hooks.close()

    outputs = {k.removesuffix(".out") for k in _keys_under(s3_server, "out/")}
    failures = {k.removesuffix("-error.out") for k in _keys_under(s3_server, "failed/")}
    assert outputs | failures == set(ids), "a request has no final object"
    assert not outputs & failures, "a request has both an output and a failure object"
    assert failures == set(), f"unexpected failures: {sorted(failures)[:5]}"
    writes = {i: int(r.hget(keys.inference(i), "writes") or 0) for i in ids}
    assert all(writes.values()), f"no write recorded: {[i for i, n in writes.items() if not n]}"
    rewritten = {k: v for k, v in writes.items() if v > 1}
    # A request is written twice only when its worker died after writing and
    # before recording completion: at most the in-flight requests of each kill.
    assert len(rewritten) <= kills * CONCURRENCY, rewritten
    # Proof the kills hit work in flight: those requests were attempted again.
    retried = [i for i in ids if int(r.hget(keys.inference(i), "attempts") or 0) > 1]
    assert retried, "no SIGKILL interrupted a request in flight"
    notes = hooks.snapshot()
    assert {n["inferenceId"] for n in notes} == set(ids)
    assert all(n["invocationStatus"] == "Completed" for n in notes)
    assert r.xlen(keys.dead_letter) == 0
    print(f"\n{REQUESTS} requests, {kills} SIGKILLs: {len(outputs)} outputs, "
          f"{len(retried)} re-processed, {len(rewritten)} object(s) rewritten after a crash, "
          f"{len(notes)} notifications ({len(notes) - REQUESTS} repeated), "
          f"{time.monotonic() - started:.1f}s")
