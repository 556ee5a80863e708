"""Async inference end to end: boto3 invoke_endpoint_async -> gateway -> Redis -> worker.

Real processes (gateway, async workers), real Redis, real S3 (SeaweedFS), a real
webhook receiver. Covers the output object, idempotent InferenceIds, header
validation, S3OutputPathExtension and Filename (S3 and file://), a bad input
failing at once with a failure object, and a worker's graceful drain.

The gateways and workers connect as a namespace's own Redis user, as on a cluster
(``operator.redis_acl``: only that namespace's queue keys, no admin or dangerous
command), so every Redis command the runtime sends is proven allowed to it; the
tests' own checks use the admin connection.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubeinfer_operator.redis_acl import RedisUsers
from kubeinfer_operator.render.redis_users import namespace_url
from kubeinfer_runtime.contract import AsyncQueueKeys, AsyncRoute
from tests.support.async_stack import AsyncStack, worker_env
from tests.support.ports import wait_until
from tests.support.redis_server import RedisServer
from tests.support.webhook import WebhookReceiver

BUCKET = "async-e2e"
ROWS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]
#: The namespace the runtime's Redis user belongs to; queues are ``<namespace>.<name>``.
NS = "team-a"
QUEUE = f"{NS}.e2e"


@pytest.fixture(scope="module")
def tenant_url(redis_server: RedisServer) -> str:
    """The URL the operator puts in NS's runtime Secret, its user set as the operator does."""
    async def ensure() -> None:
        users = RedisUsers(redis_server.url)
        await users.ensure(NS)
        await users.close()

    asyncio.run(ensure())
    return namespace_url(redis_server.url, NS)


@pytest.fixture(scope="module")
def hooks() -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver()
    yield receiver
    receiver.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tenant_url: str, s3_server: Any,
          models_dir: Path, hooks: WebhookReceiver) -> Iterator[AsyncStack]:
    client = s3_server.minio()
    if not client.bucket_exists(BUCKET):
        client.make_bucket(BUCKET)
    route = AsyncRoute(queue=QUEUE, output_path=f"s3://{BUCKET}/out",
                       failure_path=f"s3://{BUCKET}/failed")
    env = worker_env(model_path=models_dir / "iris.onnx", redis_url=tenant_url,
                     route=route, s3_env=s3_server.env(), endpoint="iris",
                     success_url=hooks.url + "/ok", error_url=hooks.url + "/error",
                     max_retries="2", visibility_timeout_s="3", notify_backoff_s="0.05",
                     notify_attempts="3", transient_budget_s="2")
    s = AsyncStack("iris", route, tmp_path_factory.mktemp("async-e2e"), env)
    s.start_gateway(tenant_url)
    s.start_worker()
    yield s
    s.stop()


def _runtime(stack: AsyncStack) -> Any:
    import boto3
    from botocore.config import Config

    assert stack.gateway is not None
    return boto3.client("sagemaker-runtime", endpoint_url=stack.gateway.url,
                        region_name="us-east-1", aws_access_key_id="x",
                        aws_secret_access_key="x",
                        config=Config(retries={"max_attempts": 1}))


def _put(s3_server: Any, key: str, data: bytes) -> str:
    import io

    s3_server.minio().put_object(BUCKET, key, io.BytesIO(data), len(data))
    return f"s3://{BUCKET}/{key}"


def _get(s3_server: Any, uri: str) -> bytes | None:
    from minio.error import S3Error

    key = uri.split(f"s3://{BUCKET}/", 1)[1]
    try:
        resp = s3_server.minio().get_object(BUCKET, key)
    except S3Error:
        return None
    try:
        return bytes(resp.read())
    finally:
        resp.close()
        resp.release_conn()


def _wait_object(s3_server: Any, uri: str, timeout: float = 20.0) -> bytes:
    found: list[bytes] = []

    def there() -> bool:
        data = _get(s3_server, uri)
        if data is not None:
            found.append(data)
        return data is not None

    wait_until(there, timeout, f"object {uri}", interval=0.1)
    return found[0]


def test_boto3_invoke_endpoint_async_writes_the_output(stack: AsyncStack, s3_server: Any,
                                                       hooks: WebhookReceiver) -> None:
    input_uri = _put(s3_server, "in/rows.json", json.dumps({"instances": ROWS}).encode())
    resp = _runtime(stack).invoke_endpoint_async(EndpointName="iris", InputLocation=input_uri,
                                                 ContentType="application/json")
    assert resp["ResponseMetadata"]["HTTPStatusCode"] == 202
    inference_id = resp["InferenceId"]
    assert resp["OutputLocation"] == f"s3://{BUCKET}/out/{inference_id}.out"
    assert resp["FailureLocation"] == f"s3://{BUCKET}/failed/{inference_id}-error.out"
    out = json.loads(_wait_object(s3_server, resp["OutputLocation"]))
    assert out["predictions"]["label"] == [0, 2]
    assert len(out["predictions"]["probabilities"]) == 2
    wait_until(lambda: any(n["inferenceId"] == inference_id for n in hooks.snapshot()), 10,
               "the success notification")
    note = next(n for n in hooks.snapshot() if n["inferenceId"] == inference_id)
    assert note["path"] == "/ok"
    assert note["invocationStatus"] == "Completed"
    assert note["responseParameters"]["outputLocation"] == resp["OutputLocation"]
    assert note["requestParameters"]["inputLocation"] == input_uri


def test_same_inference_id_twice_is_one_inference(stack: AsyncStack, s3_server: Any,
                                                  redis_server: RedisServer) -> None:
    input_uri = _put(s3_server, "in/idem.json", json.dumps({"instances": ROWS}).encode())
    client = _runtime(stack)
    inference_id = f"idem-{uuid.uuid4().hex[:8]}"
    first = client.invoke_endpoint_async(EndpointName="iris", InputLocation=input_uri,
                                         InferenceId=inference_id)
    second = client.invoke_endpoint_async(EndpointName="iris", InputLocation=input_uri,
                                          InferenceId=inference_id)
    assert first["InferenceId"] == second["InferenceId"] == inference_id
    assert first["OutputLocation"] == second["OutputLocation"]
    _wait_object(s3_server, first["OutputLocation"])
    keys = AsyncQueueKeys(queue=QUEUE)
    r = redis_server.client()
    wait_until(lambda: r.hget(keys.inference(inference_id), "done") == "success", 10, "done")
    time.sleep(0.5)  # a second inference, if queued, would have run by now
    assert r.hget(keys.inference(inference_id), "writes") == "1"
    assert r.hget(keys.inference(inference_id), "attempts") == "1"


def test_the_write_audit_expires_with_its_request(stack: AsyncStack, s3_server: Any,
                                                 redis_server: RedisServer) -> None:
    """The objects written are counted in the request's id hash, which expires: no hash
    per queue gaining a field per request forever (earlier versions' is deleted)."""
    keys = AsyncQueueKeys(queue=QUEUE)
    legacy = f"kubeinfer:async:{{{QUEUE}}}:writes"
    r = redis_server.client()
    r.hset(legacy, mapping={"old-1": 1, "old-2": 1})
    extra = stack.start_worker()
    try:
        wait_until(lambda: r.exists(legacy) == 0, 10, "the old write hash to be deleted")
    finally:
        extra.stop()
        stack.workers.remove(extra)
    input_uri = _put(s3_server, "in/audit.json", json.dumps({"instances": ROWS}).encode())
    resp = _runtime(stack).invoke_endpoint_async(EndpointName="iris", InputLocation=input_uri)
    id_key = keys.inference(resp["InferenceId"])
    wait_until(lambda: r.hget(id_key, "done") == "success", 20, "done")
    assert r.hget(id_key, "writes") == "1"
    assert r.ttl(id_key) > 0
    assert r.exists(legacy) == 0


def test_an_id_hash_written_after_it_expired_expires_again(redis_server: RedisServer) -> None:
    """A request that runs after its id hash expired (it waited longer than its TTL
    plus the idempotency window) writes the hash again: every script that may be the
    first write gives it an expiry, and leaves one that has its own alone."""
    from kubeinfer_runtime.queue import processing
    from kubeinfer_runtime.queue.producer import DEDUPE_EXTRA_S

    r = redis_server.client()
    key = AsyncQueueKeys(queue="ttl").inference("late")
    window = str(DEDUPE_EXTRA_S)
    count = r.register_script(processing._COUNT)
    transient = r.register_script(processing._TRANSIENT)
    charge = r.register_script(processing._CHARGE)
    for first in (lambda: count(keys=[key], args=["token", window]),
                  lambda: transient(keys=[key], args=["", "1.0", "Outage: x", "1", window]),
                  lambda: charge(keys=[key], args=[window])):
        r.delete(key)
        first()
        assert 0 < r.ttl(key) <= DEDUPE_EXTRA_S
        r.expire(key, 50)  # the producer's own expiry stays as it is
        first()
        assert 0 < r.ttl(key) <= 50


def test_bad_requests_are_refused_with_sagemaker_errors(stack: AsyncStack) -> None:
    import httpx

    assert stack.gateway is not None
    url = stack.gateway.url
    missing = httpx.post(f"{url}/endpoints/iris/async-invocations")
    assert missing.status_code == 400
    assert missing.headers["x-amzn-errortype"] == "ValidationError:"
    assert "X-Amzn-SageMaker-InputLocation" in missing.json()["Message"]
    scheme = httpx.post(f"{url}/endpoints/iris/async-invocations",
                        headers={"X-Amzn-SageMaker-InputLocation": "http://x/y"})
    assert scheme.status_code == 400 and "unsupported scheme" in scheme.json()["Message"]
    ttl = httpx.post(f"{url}/endpoints/iris/async-invocations",
                     headers={"X-Amzn-SageMaker-InputLocation": f"s3://{BUCKET}/k",
                              "X-Amzn-SageMaker-RequestTTLSeconds": "5"})
    assert ttl.status_code == 400 and "RequestTTLSeconds" in ttl.json()["Message"]
    sync = httpx.post(f"{url}/endpoints/iris/invocations", json={"instances": ROWS})
    assert sync.status_code == 400 and "call InvokeEndpointAsync" in sync.json()["Message"]
    unknown = httpx.post(f"{url}/endpoints/nope/async-invocations",
                         headers={"X-Amzn-SageMaker-InputLocation": f"s3://{BUCKET}/k"})
    assert unknown.status_code == 404 and "nope" in unknown.json()["Message"]


def test_extension_and_filename_place_output_failure_and_notification(
        stack: AsyncStack, s3_server: Any, hooks: WebhookReceiver) -> None:
    input_uri = _put(s3_server, "in/placed.json", json.dumps({"instances": ROWS}).encode())
    client = _runtime(stack)
    run = uuid.uuid4().hex[:8]
    resp = client.invoke_endpoint_async(EndpointName="iris", InputLocation=input_uri,
                                        S3OutputPathExtension=f"tenant-a//{run}/./",
                                        Filename="result.json")
    assert resp["OutputLocation"] == f"s3://{BUCKET}/out/tenant-a/{run}/result.json"
    assert resp["FailureLocation"] == f"s3://{BUCKET}/failed/tenant-a/{run}/result-error.json"
    out = json.loads(_wait_object(s3_server, resp["OutputLocation"]))
    assert out["predictions"]["label"] == [0, 2]
    assert _get(s3_server, f"s3://{BUCKET}/out/{resp['InferenceId']}.out") is None
    wait_until(lambda: any(n["inferenceId"] == resp["InferenceId"] for n in hooks.snapshot()),
               10, "the success notification")
    note = next(n for n in hooks.snapshot() if n["inferenceId"] == resp["InferenceId"])
    assert note["responseParameters"]["outputLocation"] == resp["OutputLocation"]
    # A failure goes to the failure path under the same extension, named after Filename.
    failed = client.invoke_endpoint_async(
        EndpointName="iris", InputLocation=f"s3://{BUCKET}/in/not-there-{run}.json",
        S3OutputPathExtension=f"tenant-a/{run}", Filename="second")
    assert failed["FailureLocation"] == f"s3://{BUCKET}/failed/tenant-a/{run}/second-error"
    failure = json.loads(_wait_object(s3_server, failed["FailureLocation"]))
    assert f"not-there-{run}.json does not exist" in failure["Message"]
    wait_until(lambda: any(n["inferenceId"] == failed["InferenceId"] for n in hooks.snapshot()),
               10, "the error notification")
    note = next(n for n in hooks.snapshot() if n["inferenceId"] == failed["InferenceId"])
    assert note["responseParameters"]["failureLocation"] == failed["FailureLocation"]
    assert _get(s3_server, failed["OutputLocation"]) is None


@pytest.mark.parametrize(("extension", "name", "fragment"), [
    ("tenant/../../escape", None, "S3OutputPathExtension 'tenant/../../escape' contains '..'"),
    ("/", None, "names no folder"),
    (None, "a.tar.gz", "X-Amzn-SageMaker-Filename 'a.tar.gz' is not valid"),
    (None, "..", "X-Amzn-SageMaker-Filename '..' is not valid"),
])
def test_bad_extension_or_filename_is_refused_and_nothing_queued(
        stack: AsyncStack, redis_server: RedisServer, extension: str | None, name: str | None,
        fragment: str) -> None:
    from botocore.exceptions import ClientError

    inference_id = f"refused-{uuid.uuid4().hex[:8]}"
    extra = {"S3OutputPathExtension": extension} if extension else {"Filename": name}
    with pytest.raises(ClientError) as info:
        _runtime(stack).invoke_endpoint_async(EndpointName="iris", InferenceId=inference_id,
                                              InputLocation=f"s3://{BUCKET}/in/rows.json",
                                              **extra)
    error = info.value.response
    assert error["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert error["Error"]["Code"] == "ValidationError"
    assert fragment in error["Error"]["Message"]
    # Refused before the Lua script: no id record, so the id is still free to use.
    keys = AsyncQueueKeys(queue=QUEUE)
    r = redis_server.client()
    assert r.exists(keys.inference(inference_id)) == 0
    assert not any(f.get("inference_id") == inference_id for _, f in r.xrange(keys.stream))


def test_same_inference_id_with_another_filename_answers_the_first_locations(
        stack: AsyncStack, s3_server: Any, redis_server: RedisServer) -> None:
    input_uri = _put(s3_server, "in/idem-name.json", json.dumps({"instances": ROWS}).encode())
    client = _runtime(stack)
    inference_id = f"idem-name-{uuid.uuid4().hex[:8]}"
    first = client.invoke_endpoint_async(EndpointName="iris", InputLocation=input_uri,
                                         InferenceId=inference_id,
                                         S3OutputPathExtension="idem", Filename="first.json")
    second = client.invoke_endpoint_async(EndpointName="iris", InputLocation=input_uri,
                                          InferenceId=inference_id,
                                          S3OutputPathExtension="other", Filename="second.json")
    assert first["OutputLocation"] == f"s3://{BUCKET}/out/idem/first.json"
    assert second["OutputLocation"] == first["OutputLocation"]
    assert second["FailureLocation"] == first["FailureLocation"]
    _wait_object(s3_server, first["OutputLocation"])
    keys = AsyncQueueKeys(queue=QUEUE)
    r = redis_server.client()
    wait_until(lambda: r.hget(keys.inference(inference_id), "done") == "success", 10, "done")
    time.sleep(0.5)  # a second inference, if queued, would have run by now
    assert r.hget(keys.inference(inference_id), "writes") == "1"
    assert _get(s3_server, f"s3://{BUCKET}/out/other/second.json") is None


def test_missing_input_ends_in_a_failure_object(stack: AsyncStack, s3_server: Any,
                                                hooks: WebhookReceiver) -> None:
    resp = _runtime(stack).invoke_endpoint_async(
        EndpointName="iris", InputLocation=f"s3://{BUCKET}/in/never-uploaded.json")
    failure = json.loads(_wait_object(s3_server, resp["FailureLocation"]))
    assert "never-uploaded.json does not exist" in failure["Message"]
    assert _get(s3_server, resp["OutputLocation"]) is None
    wait_until(lambda: any(n["inferenceId"] == resp["InferenceId"] and n["path"] == "/error"
                           for n in hooks.snapshot()), 10, "the error notification")


def test_a_bad_input_fails_at_once_without_retries(stack: AsyncStack, s3_server: Any,
                                                   redis_server: RedisServer) -> None:
    """A wrong shape fails the same way every time: one attempt, a failure object, no
    retry and no dead letter (retries are for what may succeed the next time)."""
    input_uri = _put(s3_server, "in/poison.json", b'{"instances": [[1, 2]]}')  # wrong shape
    resp = _runtime(stack).invoke_endpoint_async(EndpointName="iris", InputLocation=input_uri)
    inference_id = resp["InferenceId"]
    failure = json.loads(_wait_object(s3_server, resp["FailureLocation"]))
    assert failure["ErrorCode"] == "ValidationError"
    assert "not retried" in failure["Message"] and "expects shape" in failure["Message"]
    assert failure["attempts"] == 1
    keys = AsyncQueueKeys(queue=QUEUE)
    r = redis_server.client()
    wait_until(lambda: r.hget(keys.inference(inference_id), "done") == "failure", 10, "done")
    assert r.hget(keys.inference(inference_id), "attempts") == "1"
    assert r.hget(keys.inference(inference_id), "writes") == "1"
    assert not any(f.get("inference_id") == inference_id for _, f in r.xrange(keys.dead_letter))
    assert _get(s3_server, resp["OutputLocation"]) is None


def test_sigterm_drains_a_worker_without_losing_requests(stack: AsyncStack, s3_server: Any,
                                                         redis_server: RedisServer) -> None:
    import httpx

    assert stack.gateway is not None
    input_uri = _put(s3_server, "in/drain.json", json.dumps({"instances": ROWS}).encode())
    extra = stack.start_worker()
    others = [w for w in stack.workers if w is not extra]
    ids = [f"drain-{i:03d}" for i in range(150)]
    # Every worker is paused while the requests are queued, then the extra one alone goes
    # on, with a backlog (all running, a loaded machine queued no faster than they
    # answered, and the extra worker held nothing by the time it was looked at). An entry
    # a paused worker had already asked for waits for it, or is reclaimed.
    for w in [*others, extra]:
        w.proc.send_signal(signal.SIGSTOP)
    try:
        with httpx.Client(base_url=stack.gateway.url) as client:
            for rid in ids:
                r = client.post("/endpoints/iris/async-invocations", headers={
                    "X-Amzn-SageMaker-InputLocation": input_uri,
                    "X-Amzn-SageMaker-Inference-Id": rid})
                assert r.status_code == 202
        extra.proc.send_signal(signal.SIGCONT)
        wait_until(lambda: _in_flight(extra.url) > 0, 30, "the extra worker to hold requests",
                   interval=0.01)
        extra.proc.terminate()
        # uvicorn re-raises SIGTERM once its graceful shutdown is done: -15, not a kill.
        assert extra.proc.wait(timeout=25) in (0, -15)
    finally:
        for w in [*others, extra]:  # an exited process is not signalled
            w.proc.send_signal(signal.SIGCONT)
    stack.workers.remove(extra)
    log = extra.log()
    assert "Application shutdown complete" in log and "stopped" in log, log
    keys = AsyncQueueKeys(queue=QUEUE)
    r = redis_server.client()
    wait_until(lambda: all(r.hget(keys.inference(i), "done") == "success" for i in ids), 30,
               "every request to finish")
    # The backlog metric is exported by the gateway, per endpoint.
    metrics = httpx.get(stack.gateway.url + "/metrics").text
    assert 'kubeinfer_async_backlog_size{endpoint="iris"}' in metrics
    assert 'kubeinfer_async_backlog_size_per_instance{endpoint="iris"}' in metrics


def _in_flight(url: str) -> int:
    import httpx

    try:
        r = httpx.get(url + "/ping", timeout=1.0)
    except httpx.HTTPError:
        return 0
    return int(r.json().get("in_flight", 0)) if r.status_code == 200 else 0


def test_a_request_that_keeps_killing_workers_is_dead_lettered(
        stack: AsyncStack, s3_server: Any, redis_server: RedisServer) -> None:
    """Three attempts already died with their worker (as after SIGKILLs): the next
    delivery dead-letters it instead of running it again; a malformed entry too."""
    from kubeinfer_runtime.queue.request import parse_async_request

    route = stack.route
    req = parse_async_request("iris", route, {
        "x-amzn-sagemaker-inputlocation": f"s3://{BUCKET}/in/rows.json",
        "x-amzn-sagemaker-inference-id": "crashes-workers"})
    keys = route.keys
    r = redis_server.client()
    r.hset(keys.inference(req.inference_id), mapping={"attempts": 3})  # maxRetries 2 + 1
    r.xadd(keys.stream, req.to_fields())
    r.xadd(keys.stream, {"garbage": "1"})
    failure = json.loads(_wait_object(s3_server, req.failure_location))
    assert "stopped (crashed or was killed) on every attempt" in failure["Message"]
    assert failure["attempts"] == 3
    assert _get(s3_server, req.output_location) is None
    wait_until(lambda: any(f.get("error", "").startswith("Malformed entry")
                           for _, f in r.xrange(keys.dead_letter)), 10, "malformed dead letter")
    # The failure object is written before the entry is dead-lettered, and another worker
    # may dead-letter the malformed entry first: wait for it as for the other.
    wait_until(lambda: "crashes-workers" in {f.get("inference_id")
                                             for _, f in r.xrange(keys.dead_letter)},
               10, "the request's dead letter")


def test_failed_notifications_are_retried_until_delivered(stack: AsyncStack, s3_server: Any,
                                                          hooks: WebhookReceiver) -> None:
    input_uri = _put(s3_server, "in/notify.json", json.dumps({"instances": ROWS}).encode())
    hooks.fail_first = hooks.failed + 2  # the receiver answers 503 twice first
    resp = _runtime(stack).invoke_endpoint_async(EndpointName="iris", InputLocation=input_uri)
    wait_until(lambda: any(n["inferenceId"] == resp["InferenceId"] for n in hooks.snapshot()),
               15, "the notification after two refused deliveries")
    assert hooks.failed >= 2


def test_a_dead_webhook_is_given_up_after_max_retries_deliveries(
        stack: AsyncStack, s3_server: Any, hooks: WebhookReceiver,
        redis_server: RedisServer) -> None:
    """The output exists; the notification is retried on each redelivery, then — past the
    transient budget (2 s here) — the entry is dead-lettered saying so, instead of holding
    the backlog (and the workers) forever."""
    input_uri = _put(s3_server, "in/deadhook.json", json.dumps({"instances": ROWS}).encode())
    hooks.fail_first = hooks.failed + 10_000  # the receiver refuses everything
    try:
        resp = _runtime(stack).invoke_endpoint_async(EndpointName="iris",
                                                     InputLocation=input_uri)
        _wait_object(s3_server, resp["OutputLocation"])
        keys = AsyncQueueKeys(queue=QUEUE)
        r = redis_server.client()
        wait_until(lambda: any(f.get("inference_id") == resp["InferenceId"]
                               for _, f in r.xrange(keys.dead_letter)), 40,
                   "the undeliverable notification to be dead-lettered", interval=0.2)
        entry = next(f for _, f in r.xrange(keys.dead_letter)
                     if f.get("inference_id") == resp["InferenceId"])
        assert "undeliverable after 3 deliveries" in entry["error"]
        assert r.hget(keys.inference(resp["InferenceId"]), "writes") == "1"  # inferred once
    finally:
        hooks.fail_first = hooks.failed


@pytest.fixture(scope="module")
def file_stack(tmp_path_factory: pytest.TempPathFactory, tenant_url: str,
               models_dir: Path, hooks: WebhookReceiver) -> Iterator[AsyncStack]:
    """The same endpoint with file:// paths (local mode's objects): no object store."""
    root = tmp_path_factory.mktemp("async-files")
    route = AsyncRoute(queue=f"{NS}.e2e-file", output_path=f"file://{root}/out",
                       failure_path=f"file://{root}/failed")
    env = worker_env(model_path=models_dir / "iris.onnx", redis_url=tenant_url,
                     route=route, s3_env={}, endpoint="iris-file", max_retries="0",
                     error_url=hooks.url + "/error")
    s = AsyncStack("iris-file", route, root / "work", env)
    s.start_gateway(tenant_url)
    s.start_worker()
    yield s
    s.stop()


def test_file_paths_take_extension_and_filename(file_stack: AsyncStack) -> None:
    import httpx

    assert file_stack.gateway is not None
    root = file_stack.workdir.parent
    data = root / "in.json"
    data.write_text(json.dumps({"instances": ROWS}))
    url = f"{file_stack.gateway.url}/endpoints/iris-file/async-invocations"
    placed = {"X-Amzn-SageMaker-S3OutputPathExtension": "tenant-b/run.1",
              "X-Amzn-SageMaker-Filename": "scores.json"}
    ok = httpx.post(url, headers={"X-Amzn-SageMaker-InputLocation": f"file://{data}",
                                  **placed})
    assert ok.status_code == 202, ok.text
    assert ok.headers["x-amzn-sagemaker-outputlocation"] == (
        f"file://{root}/out/tenant-b/run.1/scores.json")
    assert ok.json()["OutputLocation"] == ok.headers["x-amzn-sagemaker-outputlocation"]
    output = root / "out" / "tenant-b" / "run.1" / "scores.json"
    wait_until(output.exists, 20, f"output file {output}", interval=0.1)
    assert json.loads(output.read_bytes())["predictions"]["label"] == [0, 2]
    failed = httpx.post(url, headers={"X-Amzn-SageMaker-InputLocation": f"file://{root}/none",
                                      "X-Amzn-SageMaker-Filename": "scores.json"})
    assert failed.headers["x-amzn-sagemaker-failurelocation"] == (
        f"file://{root}/failed/scores-error.json")
    failure = root / "failed" / "scores-error.json"
    wait_until(failure.exists, 20, f"failure file {failure}", interval=0.1)
    assert "does not exist" in json.loads(failure.read_bytes())["Message"]
    escape = httpx.post(url, headers={"X-Amzn-SageMaker-InputLocation": f"file://{data}",
                                      "X-Amzn-SageMaker-S3OutputPathExtension": "../../tmp"})
    assert escape.status_code == 400 and "contains '..'" in escape.json()["Message"]
    # Nothing was written anywhere else under the root.
    written = sorted(str(p.relative_to(root)) for p in root.rglob("*")
                     if p.is_file() and "work" not in p.parts)
    assert written == ["failed/scores-error.json", "in.json", "out/tenant-b/run.1/scores.json"]


def test_a_failure_object_that_can_never_be_written_does_not_hold_the_request(
        file_stack: AsyncStack, redis_server: RedisServer, hooks: WebhookReceiver) -> None:
    """Queued before the gateway refused folder names over 255 bytes (or forged): neither
    its output nor its failure object can exist. It is dead-lettered and acknowledged
    with the reason, and notified, instead of looping forever on a worker slot."""
    from kubeinfer_runtime.queue.request import parse_async_request

    root = file_stack.workdir.parent
    data = file_stack.workdir / "in-long.json"
    data.write_text(json.dumps({"instances": ROWS}))
    req = parse_async_request("iris-file", file_stack.route, {
        "x-amzn-sagemaker-inputlocation": f"file://{data}",
        "x-amzn-sagemaker-inference-id": "long-segment",
        "x-amzn-sagemaker-s3outputpathextension": "short"})
    long = "/" + "a" * 300 + "/"
    fields = {**req.to_fields(),
              "output_location": req.output_location.replace("/short/", long),
              "failure_location": req.failure_location.replace("/short/", long)}
    keys = file_stack.route.keys
    r = redis_server.client()
    r.xadd(keys.stream, fields)

    def dead_letter() -> dict[str, str] | None:
        return next((f for _, f in r.xrange(keys.dead_letter)
                     if f.get("inference_id") == "long-segment"), None)

    wait_until(lambda: dead_letter() is not None, 20, "the request's dead letter")
    error = (dead_letter() or {})["error"]
    assert "no failure object was written" in error and "File name too long" in error
    wait_until(lambda: r.xlen(keys.stream) == 0, 10, "the entry to leave the stream")
    assert r.xpending(keys.stream, keys.group)["pending"] == 0
    state = r.hgetall(keys.inference("long-segment"))
    assert state["done"] == "failure" and state["dlq"] == "1" and "writes" not in state
    assert state["attempts"] == "1"  # failed at once: a name that cannot exist is no outage
    wait_until(lambda: any(n["inferenceId"] == "long-segment" for n in hooks.snapshot()), 10,
               "the error notification")
    note = next(n for n in hooks.snapshot() if n["inferenceId"] == "long-segment")
    assert note["path"] == "/error" and "no failure object was written" in note["failureReason"]
    assert not [p for p in root.rglob("*") if "a" * 300 in str(p)]


def test_a_failure_path_that_refuses_every_write_dead_letters_after_the_attempts(
        tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer,
        tenant_url: str, models_dir: Path) -> None:
    """A failure path the worker cannot write (here below a regular file: ENOTDIR) is
    waited out like any refusal that may be fixed, within the transient budget and the
    attempts; then the request is dead-lettered without its failure object, not retried
    forever."""
    import httpx

    root = tmp_path_factory.mktemp("unwritable")
    (root / "blocked").write_text("a file where the failure folder should be")
    route = AsyncRoute(queue=f"{NS}.unwritable", output_path=f"file://{root}/out",
                       failure_path=f"file://{root}/blocked/failed")
    env = worker_env(model_path=models_dir / "iris.onnx", redis_url=tenant_url,
                     route=route, s3_env={}, endpoint="blocked", max_retries="0",
                     transient_budget_s="1", transient_backoff_s="0.05",
                     transient_backoff_max_s="0.2")
    s = AsyncStack("blocked", route, root / "work", env)
    s.start_gateway(tenant_url)
    s.start_worker()
    try:
        assert s.gateway is not None
        resp = httpx.post(f"{s.gateway.url}/endpoints/blocked/async-invocations",
                          headers={"X-Amzn-SageMaker-InputLocation": f"file://{root}/none"})
        assert resp.status_code == 202, resp.text
        inference_id = resp.json()["InferenceId"]
        r = redis_server.client()
        wait_until(lambda: any(f.get("inference_id") == inference_id
                               for _, f in r.xrange(route.keys.dead_letter)), 30,
                   "the request's dead letter", interval=0.1)
        entry = next(f for _, f in r.xrange(route.keys.dead_letter)
                     if f.get("inference_id") == inference_id)
        assert "does not exist" in entry["error"]  # why the request failed
        assert "no failure object was written" in entry["error"]  # and why it has no object
        wait_until(lambda: r.xlen(route.keys.stream) == 0, 10, "the entry to leave the stream")
        assert r.hget(route.keys.inference(inference_id), "done") == "failure"
    finally:
        s.stop()
