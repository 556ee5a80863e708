"""A hostile caller against an async endpoint: inputs outside the endpoint's paths, forged
queue entries, devices and oversized objects. Real gateway and worker processes, real Redis,
real S3 with authentication on (SeaweedFS), boto3 as the client.

What must hold: the gateway refuses with 400 before queueing; a worker reads only below the
endpoint's input paths, regular files only and within maxInputBytes, writes only below its
output and failure paths, and no failure object or notification quotes what it read.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubeinfer_runtime.contract import AsyncQueueKeys, AsyncRoute
from kubeinfer_runtime.contract.async_paths import FormerAsyncPaths, render_former_paths
from kubeinfer_runtime.queue.request import parse_async_request
from tests.support.async_stack import AsyncStack, worker_env
from tests.support.ports import wait_until
from tests.support.redis_server import RedisServer
from tests.support.s3 import SECRET_KEY
from tests.support.webhook import WebhookReceiver

BUCKET = "tenant-a"
OTHER = "other-tenant-bucket"
PAYROLL = b"name,salary\nalice,SECRET-PAYROLL-4242\n"
MAX_INPUT = 1 << 20


@pytest.fixture(scope="module")
def hooks() -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver()
    yield receiver
    receiver.close()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder the file:// endpoint may read (``in/``), next to one it may not."""
    root = tmp_path_factory.mktemp("async-files")
    (root / "in").mkdir()
    (root / "private").mkdir()
    (root / "private" / "key.csv").write_text("SECRET-PRIVATE-1717,1,2,3\n")
    os.symlink(root / "private" / "key.csv", root / "in" / "link.csv")
    os.symlink("/etc/passwd", root / "in" / "passwd.csv")
    os.mkfifo(root / "in" / "pipe.csv")
    with open(root / "in" / "big.json", "wb") as f:  # sparse: no disk used
        f.truncate(MAX_INPUT * 4)
    return root


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer, s3_server: Any,
          models_dir: Path, hooks: WebhookReceiver, files: Path) -> Iterator[AsyncStack]:
    client = s3_server.minio()
    for bucket in (BUCKET, OTHER):
        if not client.bucket_exists(bucket):
            client.make_bucket(bucket)
    client.put_object(OTHER, "payroll.csv", io.BytesIO(PAYROLL), len(PAYROLL))
    big = b"[" + b"1.0," * (MAX_INPUT // 4 + 10) + b"1.0]"
    client.put_object(BUCKET, "in/big.json", io.BytesIO(big), len(big))
    # Inputs from the tenant's bucket and one local folder (as a volume on a cluster).
    route = AsyncRoute(queue="hostile", output_path=f"s3://{BUCKET}/out",
                       failure_path=f"s3://{BUCKET}/failed",
                       input_paths=[f"s3://{BUCKET}/in/", f"file://{files}/in/"])
    env = worker_env(model_path=models_dir / "iris.onnx", redis_url=redis_server.url,
                     route=route, s3_env=s3_server.env(), endpoint="iris",
                     error_url=hooks.url + "/error", max_retries="0",
                     max_input_bytes=str(MAX_INPUT), notify_backoff_s="0.05")
    # The endpoint's paths before its spec changed (as the operator renders them): one
    # pair still writable, one past its deadline.
    env["KUBEINFER_FORMER_PATHS"] = render_former_paths([
        FormerAsyncPaths(outputPath=f"s3://{BUCKET}/old-out",
                         failurePath=f"s3://{BUCKET}/old-failed", until=time.time() + 3600),
        FormerAsyncPaths(outputPath=f"s3://{BUCKET}/older-out",
                         failurePath=f"s3://{BUCKET}/older-failed", until=time.time() - 1)])
    s = AsyncStack("iris", route, tmp_path_factory.mktemp("async-hostile"), env)
    s.start_gateway(redis_server.url)
    s.start_worker()
    yield s
    s.stop()


def _runtime(stack: AsyncStack) -> Any:
    import boto3
    from botocore.config import Config

    assert stack.gateway is not None
    return boto3.client("sagemaker-runtime", endpoint_url=stack.gateway.url,
                        region_name="us-east-1", aws_access_key_id="x",
                        aws_secret_access_key="x", config=Config(retries={"max_attempts": 1}))


def _object(s3_server: Any, uri: str) -> bytes | None:
    from minio.error import S3Error

    bucket, key = uri[len("s3://"):].split("/", 1)
    try:
        resp = s3_server.minio().get_object(bucket, key)
    except S3Error:
        return None
    try:
        return bytes(resp.read())
    finally:
        resp.close()
        resp.release_conn()


def _wait_object(s3_server: Any, uri: str) -> bytes:
    found: list[bytes] = []

    def there() -> bool:
        data = _object(s3_server, uri)
        if data is not None:
            found.append(data)
        return data is not None

    wait_until(there, 20.0, f"object {uri}", interval=0.1)
    return found[0]


def _notification(hooks: WebhookReceiver, inference_id: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = []

    def there() -> bool:
        found[:] = [n for n in hooks.snapshot() if n.get("inferenceId") == inference_id]
        return bool(found)

    wait_until(there, 20.0, f"notification of {inference_id}", interval=0.1)
    return found[0]


@pytest.mark.parametrize("location", [
    "file:///proc/self/environ",
    "file:///etc/passwd",
    "file:///dev/zero",
    f"s3://{OTHER}/payroll.csv",
    f"s3://{BUCKET}/out/someone-elses.out",
    f"s3://{BUCKET}/in/%2e%2e/out/x.out",
    "s3://[tenant-a/x",
])
def test_the_gateway_refuses_inputs_outside_the_paths_before_queueing(
        stack: AsyncStack, redis_server: RedisServer, location: str) -> None:
    from botocore.exceptions import ClientError

    keys = AsyncQueueKeys(queue=stack.route.queue)
    before = redis_server.client().xlen(keys.stream)
    with pytest.raises(ClientError) as info:
        _runtime(stack).invoke_endpoint_async(EndpointName="iris", InputLocation=location,
                                              ContentType="text/csv")
    error = info.value.response
    assert error["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert error["Error"]["Code"] == "ValidationError"
    assert "InputLocation" in error["Error"]["Message"]
    assert redis_server.client().xlen(keys.stream) == before


def _forge(stack: AsyncStack, redis_server: RedisServer, inference_id: str,
           **fields: str) -> None:
    """Queue an entry the way someone with Redis access would: no gateway involved."""
    req = parse_async_request("iris", stack.route, {
        "x-amzn-sagemaker-inputlocation": f"s3://{BUCKET}/in/x.csv",
        "x-amzn-sagemaker-inference-id": inference_id,
        "x-amzn-sagemaker-content-type": "text/csv"})
    keys = AsyncQueueKeys(queue=stack.route.queue)
    redis_server.client().xadd(keys.stream, {**req.to_fields(), **fields})


@pytest.mark.parametrize(("inference_id", "location"), [
    ("forged-environ", "file:///proc/self/environ"),
    ("forged-passwd", "file:///etc/passwd"),
    ("forged-payroll", f"s3://{OTHER}/payroll.csv"),
])
def test_a_forged_input_is_refused_by_the_worker_without_reading_it(
        stack: AsyncStack, redis_server: RedisServer, s3_server: Any, hooks: WebhookReceiver,
        inference_id: str, location: str) -> None:
    _forge(stack, redis_server, inference_id, input_location=location)
    failure = _wait_object(s3_server, f"s3://{BUCKET}/failed/{inference_id}-error.out")
    body = json.loads(failure)
    assert body["ErrorCode"] == "ValidationError"
    assert "outside the endpoint's input paths" in body["Message"]
    note = _notification(hooks, inference_id)
    assert note["invocationStatus"] == "Failed"
    for leaked in (SECRET_KEY, "root:x:0", "SECRET-PAYROLL", "KUBEINFER_"):
        assert leaked not in failure.decode()
        assert leaked not in json.dumps(note)


def test_a_forged_destination_is_dead_lettered_and_nothing_is_written(
        stack: AsyncStack, redis_server: RedisServer, s3_server: Any) -> None:
    keys = AsyncQueueKeys(queue=stack.route.queue)
    _forge(stack, redis_server, "forged-out", output_location=f"s3://{OTHER}/pwned.out")
    _forge(stack, redis_server, "forged-fail",
           input_location="file:///etc/passwd",
           failure_location=f"s3://{OTHER}/pwned-error.out")
    client = redis_server.client()

    def dead_lettered() -> bool:
        ids = {f.get("inference_id") for _, f in client.xrange(keys.dead_letter)}
        return {"forged-out", "forged-fail"} <= ids

    wait_until(dead_lettered, 20.0, "forged entries dead-lettered", interval=0.1)
    entries = {f["inference_id"]: f for _, f in client.xrange(keys.dead_letter)}
    assert "outside the endpoint's outputPath" in entries["forged-out"]["error"]
    assert "outside the endpoint's failurePath" in entries["forged-fail"]["error"]
    assert [o.object_name for o in s3_server.minio().list_objects(OTHER)] == ["payroll.csv"]
    for inference_id in ("forged-out", "forged-fail"):
        assert _object(s3_server, f"s3://{BUCKET}/out/{inference_id}.out") is None


def test_requests_queued_before_the_paths_changed_are_written_where_their_callers_look(
        stack: AsyncStack, redis_server: RedisServer, s3_server: Any) -> None:
    """Entries the gateway made under the endpoint's former outputPath/failurePath are
    answered there while that pair is writable; under an expired pair they are refused
    as before (dead-lettered, nothing written)."""
    row = b"5.1,3.5,1.4,0.2\n"
    s3_server.minio().put_object(BUCKET, "in/moved.csv", io.BytesIO(row), len(row))
    _forge(stack, redis_server, "moved-ok", input_location=f"s3://{BUCKET}/in/moved.csv",
           output_location=f"s3://{BUCKET}/old-out/moved-ok.out",
           failure_location=f"s3://{BUCKET}/old-failed/moved-ok-error.out")
    _forge(stack, redis_server, "moved-failed", input_location=f"s3://{BUCKET}/in/none.csv",
           output_location=f"s3://{BUCKET}/old-out/moved-failed.out",
           failure_location=f"s3://{BUCKET}/old-failed/moved-failed-error.out")
    _forge(stack, redis_server, "moved-expired",
           output_location=f"s3://{BUCKET}/older-out/moved-expired.out",
           failure_location=f"s3://{BUCKET}/older-failed/moved-expired-error.out")
    output = _wait_object(s3_server, f"s3://{BUCKET}/old-out/moved-ok.out")
    assert output.strip()  # the model's answer, where the caller was told to look
    failure = json.loads(_wait_object(s3_server,
                                      f"s3://{BUCKET}/old-failed/moved-failed-error.out"))
    assert failure["ErrorCode"]
    keys = AsyncQueueKeys(queue=stack.route.queue)
    client = redis_server.client()
    wait_until(lambda: "moved-expired" in {f.get("inference_id")
                                           for _, f in client.xrange(keys.dead_letter)},
               20.0, "the entry under the expired pair dead-lettered", interval=0.1)
    assert _object(s3_server, f"s3://{BUCKET}/older-out/moved-expired.out") is None
    assert _object(s3_server, f"s3://{BUCKET}/older-failed/moved-expired-error.out") is None


@pytest.mark.parametrize(("name", "expected"), [
    ("link.csv", "resolves outside"),        # a symlink out of the allowed folder
    ("passwd.csv", "resolves outside"),
    ("pipe.csv", "not a regular file"),      # would block a plain open()
    ("big.json", "maxInputBytes"),           # 4 MiB sparse file, never read whole
])
def test_file_inputs_must_be_regular_files_inside_the_folder(
        stack: AsyncStack, s3_server: Any, files: Path, name: str, expected: str) -> None:
    resp = _runtime(stack).invoke_endpoint_async(
        EndpointName="iris", InputLocation=f"file://{files}/in/{name}", ContentType="text/csv")
    failure = _wait_object(s3_server, resp["FailureLocation"])
    message = json.loads(failure)["Message"]
    assert expected in message
    assert "SECRET-PRIVATE" not in failure.decode() and "root:x:0" not in failure.decode()


def test_an_object_over_max_input_bytes_fails_without_killing_the_worker(
        stack: AsyncStack, s3_server: Any) -> None:
    worker = stack.workers[0]
    resp = _runtime(stack).invoke_endpoint_async(
        EndpointName="iris", InputLocation=f"s3://{BUCKET}/in/big.json",
        ContentType="application/json")
    failure = json.loads(_wait_object(s3_server, resp["FailureLocation"]))
    assert failure["ErrorCode"] == "ValidationError"
    assert f"maxInputBytes ({MAX_INPUT} bytes)" in failure["Message"]
    assert worker.proc.poll() is None  # the same process: not OOMKilled, not crashed


def test_the_dev_zero_input_costs_one_chunk(tmp_path_factory: pytest.TempPathFactory,
                                            redis_server: RedisServer, models_dir: Path) -> None:
    """An endpoint that (unwisely) allows file:///dev/: the worker still refuses devices."""
    import httpx

    root = tmp_path_factory.mktemp("devzero")
    route = AsyncRoute(queue="devzero", output_path=f"file://{root}/out",
                       failure_path=f"file://{root}/failed", input_paths=["file:///dev/"])
    env = worker_env(model_path=models_dir / "iris.onnx", redis_url=redis_server.url,
                     route=route, s3_env={}, endpoint="zero", max_retries="0")
    s = AsyncStack("zero", route, root / "work", env)
    s.start_gateway(redis_server.url)
    worker = s.start_worker()
    try:
        assert s.gateway is not None
        resp = httpx.post(f"{s.gateway.url}/endpoints/zero/async-invocations",
                          headers={"X-Amzn-SageMaker-InputLocation": "file:///dev/zero",
                                   "X-Amzn-SageMaker-Content-Type": "text/csv"})
        assert resp.status_code == 202, resp.text
        failure = root / "failed" / f"{resp.json()['InferenceId']}-error.out"
        wait_until(failure.exists, 20.0, f"failure file {failure}", interval=0.1)
        assert "not a regular file" in json.loads(failure.read_bytes())["Message"]
        assert worker.proc.poll() is None
        rss_kb = int(next(line.split()[1] for line in
                          Path(f"/proc/{worker.proc.pid}/status").read_text().splitlines()
                          if line.startswith("VmRSS:")))
        assert rss_kb < 600_000
    finally:
        s.stop()
