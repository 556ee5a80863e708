"""Outages are waited out, not turned into failures: S3 or Redis down for 30 s.

Real processes: a gateway and two async workers, SeaweedFS (killed and started
again on the same ports and data), a persistent redis-server (SIGKILLed and
started again from its append-only file), a webhook receiver. 50 requests are
queued; the outage lasts 30 s; every request must then succeed with one
output object, no failure object, one counted attempt and one write. While
S3 is down the workers must pause (no XREADGROUP of new work, nothing
re-queued), not churn through the queue, and a worker stopped meanwhile hands
its requests back at once. A bad input, by contrast, fails at once: one
attempt, no retry. A webhook receiver that is down dead-letters nothing whose
object was written.

The backoff is short here (first 0.5 s, at most 5 s) so recovery is quick;
the outage itself is the one deliberate sleep.
"""

from __future__ import annotations

import io
import json
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
from tests.support.s3 import S3Server, start_s3
from tests.support.webhook import WebhookReceiver

BUCKET = "async-outages"
REQUESTS = 50
OUTAGE_S = 30.0
KEYS = AsyncQueueKeys(queue="outages")
ROWS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """Our own S3 server: the session's must not go down under other tests."""
    server = start_s3(tmp_path_factory.mktemp("s3-outage"))
    server.minio().make_bucket(BUCKET)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_redis(tmp_path_factory.mktemp("redis-outage"), persistent=True)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def hooks() -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver()
    yield receiver
    receiver.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, s3: S3Server, redis_server: RedisServer,
          models_dir: Path, hooks: WebhookReceiver) -> Iterator[AsyncStack]:
    route = AsyncRoute(queue=KEYS.queue, output_path=f"s3://{BUCKET}/out",
                       failure_path=f"s3://{BUCKET}/failed")
    env = worker_env(model_path=models_dir / "iris.onnx", redis_url=redis_server.url,
                     route=route, s3_env=s3.env(), endpoint="iris",
                     success_url=hooks.url + "/ok", error_url=hooks.url + "/error",
                     max_concurrency="4", max_retries="3", visibility_timeout_s="4",
                     transient_backoff_s="0.5", transient_backoff_max_s="5",
                     notify_backoff_s="0.05", notify_attempts="2")
    s = AsyncStack("iris", route, tmp_path_factory.mktemp("async-outages"), env)
    for _ in range(2):
        s.start_worker(wait=False)
    s.start_gateway(redis_server.url)
    s.wait_workers()
    yield s
    s.stop()


def _inputs(s3: S3Server, n: int = 5) -> list[str]:
    client = s3.minio()
    data = json.dumps({"instances": ROWS}).encode()
    for i in range(n):
        client.put_object(BUCKET, f"in/{i}.json", io.BytesIO(data), len(data))
    return [f"s3://{BUCKET}/in/{i}.json" for i in range(n)]


def _names(s3: S3Server, prefix: str) -> set[str]:
    return {o.object_name.rsplit("/", 1)[1]
            for o in s3.minio().list_objects(BUCKET, prefix=prefix, recursive=True)}


def _calls(r: Any) -> dict[str, int]:
    """Commands Redis has run so far, by name (INFO commandstats)."""
    return {k.removeprefix("cmdstat_"): int(v["calls"])
            for k, v in r.info("commandstats").items()}


def _ping(url: str) -> dict[str, Any]:
    try:
        r = httpx.get(url + "/ping", timeout=2.0)
    except httpx.HTTPError:
        return {}
    body: dict[str, Any] = r.json() if r.status_code == 200 else {}
    return body


def _assert_all_succeeded_once(s3: S3Server, r: Any, hooks: WebhookReceiver,
                               ids: list[str]) -> None:
    # The object is written before completion is recorded: wait for the record.
    wait_until(lambda: all(r.hget(KEYS.inference(i), "done") for i in ids), 20,
               "every completion record", interval=0.2)
    outputs = {n.removesuffix(".out") for n in _names(s3, "out/")}
    assert set(ids) <= outputs
    failed = {n.removesuffix("-error.out") for n in _names(s3, "failed/")}
    assert not failed & set(ids), f"failure objects: {sorted(failed & set(ids))}"
    attempts = {i: r.hget(KEYS.inference(i), "attempts") for i in ids}
    assert set(attempts.values()) == {"1"}, f"attempts burned: {attempts}"
    writes = {i: r.hget(KEYS.inference(i), "writes") for i in ids}
    assert set(writes.values()) == {"1"}, f"objects written more than once: {writes}"
    assert r.xlen(KEYS.dead_letter) == 0
    wait_until(lambda: set(ids) <= {n["inferenceId"] for n in hooks.snapshot()}, 30,
               "every success notification", interval=0.2)
    assert all(n["invocationStatus"] == "Completed" for n in hooks.snapshot()
               if n["inferenceId"] in ids)
    wait_until(lambda: r.xlen(KEYS.stream) == 0, 20, "an empty stream", interval=0.2)


def test_a_bad_input_fails_at_once_without_retries(stack: AsyncStack, s3: S3Server,
                                                   redis_server: RedisServer) -> None:
    client = s3.minio()
    bad = b'{"instances": [[1, 2]]}'  # iris wants 4 columns
    client.put_object(BUCKET, "in/bad.json", io.BytesIO(bad), len(bad))
    r = redis_server.client()
    before = _calls(r).get("xadd", 0)
    stack.submit([f"s3://{BUCKET}/in/bad.json", f"s3://{BUCKET}/in/never-uploaded.json"],
                 ["bad-shape", "missing-input"])
    wait_until(lambda: {"bad-shape-error.out", "missing-input-error.out"}
               <= _names(s3, "failed/"), 30, "both failure objects", interval=0.1)
    for rid, text in (("bad-shape", "ValidationError"), ("missing-input", "does not exist")):
        resp = client.get_object(BUCKET, f"failed/{rid}-error.out")
        failure = json.loads(resp.read())
        resp.close()
        resp.release_conn()
        assert failure["attempts"] == 1, failure
        assert failure["ErrorCode"] == "ValidationError"
        assert text in failure["Message"] and "not retried" in failure["Message"]
        assert r.hget(KEYS.inference(rid), "attempts") == "1"
        assert r.hget(KEYS.inference(rid), "writes") == "1"
    # Two submissions, no re-queue, no dead letter.
    assert _calls(r).get("xadd", 0) - before == 2
    assert r.xlen(KEYS.dead_letter) == 0


def test_an_s3_outage_of_30s_fails_no_request(stack: AsyncStack, s3: S3Server,
                                              redis_server: RedisServer,
                                              hooks: WebhookReceiver) -> None:
    inputs = _inputs(s3)
    ids = [f"s3-outage-{i:02d}" for i in range(REQUESTS)]
    r = redis_server.client()
    s3.down()
    down_at = time.monotonic()
    try:
        stack.submit(inputs, ids)  # the gateway needs no S3: all 50 are queued
        # The workers take a few, find S3 unreachable, and pause.
        wait_until(lambda: all(_ping(w.url).get("paused") for w in stack.workers), 20,
                   "both workers to pause", interval=0.1)
        paused_at = time.monotonic()
        calls = _calls(r)
        # A worker stopped mid-outage stops waiting at once and hands its requests back.
        leaving = stack.workers[0]
        gone = _ping(leaving.url)["consumer"]
        leaving.proc.terminate()
        assert leaving.proc.wait(timeout=15) in (0, -15)
        stack.workers.remove(leaving)
        assert "Released" in leaving.log(), leaving.log()
        time.sleep(max(0.0, down_at + OUTAGE_S - time.monotonic()))  # the outage
        during = {k: v - calls.get(k, 0) for k, v in _calls(r).items()}
        # What the remaining worker holds stays in its heartbeat: never idle long enough
        # to look abandoned (visibility timeout 4 s); what the stopped one held was released.
        pending = r.xpending_range(KEYS.stream, KEYS.group, "-", "+", 100)
        held_idle = [p["time_since_delivered"] for p in pending if p["consumer"] != gone]
        released_idle = [p["time_since_delivered"] for p in pending if p["consumer"] == gone]
        held = {i: r.hget(KEYS.inference(i), "attempts") for i in ids}
        assert r.xlen(KEYS.stream) == REQUESTS, "a request was settled while S3 was down"
    finally:
        up_at = time.monotonic()
        s3.up()
    answering = time.monotonic() - up_at
    # Paused for the rest of the outage: nothing new read, nothing re-queued or reclaimed.
    print(f"\nduring {up_at - paused_at:.0f}s of pause: " + ", ".join(
        f"{c} {during.get(c, 0)}" for c in ("xreadgroup", "xautoclaim", "xadd", "xclaim")))
    assert during.get("xreadgroup", 0) <= 2, during
    assert during.get("xadd", 0) == 0, during
    assert during.get("xautoclaim", 0) == 0, during
    assert set(held.values()) <= {"0", "1"}, f"attempts used during the outage: {held}"
    assert held_idle and max(held_idle) < 4000, pending
    assert released_idle and min(released_idle) > 10**8, pending
    assert all(w.proc.poll() is None for w in stack.workers)

    wait_until(lambda: len(_names(s3, "out/") & {f"{i}.out" for i in ids}) == REQUESTS, 120,
               "every output after S3 came back", interval=0.2)
    recovered = time.monotonic() - up_at
    _assert_all_succeeded_once(s3, r, hooks, ids)
    logs = "".join(w.log() for w in [*stack.workers, leaving])
    retries = logs.count(": retry ")
    assert "taking no new async requests" in logs and "answers again" in logs
    stack.start_worker()  # two again, for the next test
    print(f"S3 down {up_at - down_at:.0f}s: {REQUESTS} requests, all succeeded "
          f"{recovered:.1f}s after it was restarted (it answered after {answering:.1f}s); "
          f"{retries} backed-off retries in all")


def test_a_redis_outage_of_30s_loses_nothing(stack: AsyncStack, s3: S3Server,
                                             redis_server: RedisServer,
                                             hooks: WebhookReceiver) -> None:
    inputs = _inputs(s3)
    ids = [f"redis-outage-{i:02d}" for i in range(REQUESTS)]
    assert stack.gateway is not None
    stack.submit(inputs, ids)
    redis_server.down()  # SIGKILL, mid-processing
    down_at = time.monotonic()
    done_before = len(_names(s3, "out/") & {f"{i}.out" for i in ids})
    try:
        refused = httpx.post(f"{stack.gateway.url}/endpoints/iris/async-invocations",
                             headers={"X-Amzn-SageMaker-InputLocation": inputs[0]})
        assert refused.status_code == 503, refused.text
        assert "retry with the same InferenceId" in refused.json()["Message"]
        time.sleep(max(0.0, down_at + OUTAGE_S - time.monotonic()))  # the outage
        assert all(w.proc.poll() is None for w in stack.workers)
    finally:
        up_at = time.monotonic()
        redis_server.up()
    wait_until(lambda: len(_names(s3, "out/") & {f"{i}.out" for i in ids}) == REQUESTS, 120,
               "every output after Redis came back", interval=0.2)
    recovered = time.monotonic() - up_at
    # The gateway reconnects by itself: new requests are queued again.
    wait_until(lambda: httpx.post(f"{stack.gateway.url}/endpoints/iris/async-invocations",
                                  headers={"X-Amzn-SageMaker-InputLocation": inputs[0],
                                           "X-Amzn-SageMaker-Inference-Id": "after-redis"}
                                  ).status_code == 202, 10, "the gateway to queue again")
    _assert_all_succeeded_once(s3, redis_server.client(), hooks, [*ids, "after-redis"])
    print(f"\nRedis down {up_at - down_at:.0f}s with {REQUESTS - done_before} of {REQUESTS} "
          f"requests unfinished: all succeeded {recovered:.1f}s after it was restarted")


def test_a_webhook_outage_dead_letters_nothing_that_was_written(
        stack: AsyncStack, s3: S3Server, redis_server: RedisServer,
        hooks: WebhookReceiver) -> None:
    """The objects exist; the receiver is down for more redeliveries than maxRetries (3)
    allows: within the transient budget that is an outage, not a dead letter."""
    inputs = _inputs(s3)
    ids = [f"hook-outage-{i}" for i in range(3)]
    r = redis_server.client()
    hooks.fail_first = hooks.failed + 10_000  # the receiver answers 503 to everything
    try:
        stack.submit(inputs, ids)
        wait_until(lambda: all(r.hget(KEYS.inference(i), "done") for i in ids), 30,
                   "every output recorded")
        # 1 delivery + 4 redeliveries each, 2 POSTs apiece: past maxRetries + 1.
        start = hooks.failed
        wait_until(lambda: hooks.failed - start >= len(ids) * 5 * 2, 90,
                   "five failed deliveries per request", interval=0.2)
        assert r.xlen(KEYS.dead_letter) == 0
        assert r.xlen(KEYS.stream) == len(ids)
    finally:
        hooks.fail_first = hooks.failed  # the receiver is back
    wait_until(lambda: set(ids) <= {n["inferenceId"] for n in hooks.snapshot()}, 30,
               "every notification after the receiver came back", interval=0.2)
    wait_until(lambda: r.xlen(KEYS.stream) == 0, 20, "an empty stream", interval=0.2)
    assert r.xlen(KEYS.dead_letter) == 0
    assert {r.hget(KEYS.inference(i), "attempts") for i in ids} == {"1"}
    assert {r.hget(KEYS.inference(i), "writes") for i in ids} == {"1"}


def test_a_worker_started_while_redis_is_down_consumes_once_it_is_back(
        tmp_path: Path, s3_server: S3Server, models_dir: Path) -> None:
    """Its first step (creating the consumer group) failing must not end its loop.

    A worker that starts while Redis is away (a restart, a failover, a fresh install)
    used to end its consuming loop at once and then idle for good, while /ping, which
    only pings Redis, said it was ready once Redis was back.
    """
    bucket = "async-late-redis"
    s3_server.minio().make_bucket(bucket)
    redis_server = start_redis(tmp_path / "redis", persistent=True)
    route = AsyncRoute(queue="late", output_path=f"s3://{bucket}/out",
                       failure_path=f"s3://{bucket}/failed")
    env = worker_env(model_path=models_dir / "iris.onnx", redis_url=redis_server.url,
                     route=route, s3_env=s3_server.env(), endpoint="late")
    stack = AsyncStack("late", route, tmp_path / "stack", env)
    try:
        redis_server.down()
        worker = stack.start_worker(wait=False)
        # The process serves, its loop found Redis down (and keeps trying).
        wait_until(lambda: "Async worker loop error" in worker.log(), 30,
                   "the worker to find Redis down")
        assert worker.proc.poll() is None
        redis_server.up()
        stack.wait_workers(30)
        stack.start_gateway(redis_server.url)
        data = json.dumps({"instances": ROWS}).encode()
        s3_server.minio().put_object(bucket, "in/0.json", io.BytesIO(data), len(data))
        ids = [f"late-{i}" for i in range(3)]
        stack.submit([f"s3://{bucket}/in/0.json"], ids)
        wait_until(lambda: {f"{i}.out" for i in ids} <= {
            o.object_name.rsplit("/", 1)[1] for o in s3_server.minio().list_objects(
                bucket, prefix="out/", recursive=True)}, 30, "every output", interval=0.2)
        assert httpx.get(worker.url + "/v2/health/live").status_code == 200
    finally:
        stack.stop()
        redis_server.stop()


def test_the_gateways_redis_client_outlives_a_redis_restart(tmp_path: Path) -> None:
    """Its pooled connection dies with the server; the next command must still work
    (a new connection), not turn one client's request into a 503."""
    import asyncio

    from kubeinfer_runtime.queue.submit import AsyncSubmitHandler

    server = start_redis(tmp_path / "redis")
    handler = AsyncSubmitHandler(server.url)

    async def restart_between_two_commands() -> None:
        client, _ = handler.client(server.url)
        assert await client.set("before", "1")
        server.down()
        server.up()
        assert await client.set("after", "1")
        await handler.close()

    try:
        asyncio.run(restart_between_two_commands())
    finally:
        server.stop()
