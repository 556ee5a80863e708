"""Data capture end to end: a real gateway process, a real upstream, real stores.

The upstream is ``tests.support.fake_upstream`` (a uvicorn process answering
JSON fast), so 2,000 requests take seconds. Captures go to a file:// folder
and to SeaweedFS (S3, credentials enforced), and every line read back must
be a valid SageMaker capture record. The outage test kills the S3 server
while requests flow: answers stay 200, the buffer stays within its bound and
counts its drops, and once the store is back every record accepted is
written or counted as dropped, and nothing accepted after recovery is lost.
"""

from __future__ import annotations

import base64
import itertools
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest

from kubeinfer_runtime.contract import EndpointRoute, RouteTable, VariantRoute
from kubeinfer_runtime.contract.capture import CaptureRoute
from tests.support.fake_upstream import start_fake_upstream
from tests.support.metrics import metric
from tests.support.ports import wait_until
from tests.support.procs import RuntimeProcess, start_runtime
from tests.support.s3 import ACCESS_KEY, SECRET_KEY, S3Server, start_s3

_revisions = itertools.count(1)
_ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
_KEY = re.compile(r"/iris/primary/\d{4}/\d\d/\d\d/\d\d/\d\d-\d\d-\d{3}-[0-9a-f-]{36}\.jsonl$")


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RuntimeProcess]:
    proc = start_fake_upstream("capture", tmp_path_factory.mktemp("upstream"))
    yield proc
    proc.stop()


def _gateway(tmp_path: Path, upstream: RuntimeProcess, capture: CaptureRoute,
             **env: str) -> RuntimeProcess:
    routes = tmp_path / "routes.json"
    table = RouteTable(revision=next(_revisions), endpoints={"iris": EndpointRoute(
        name="iris", variants=[VariantRoute(name="primary", weight=1,
                                            upstreams=[upstream.url])], capture=capture)})
    table.write_atomic(routes)
    return start_runtime("gateway", {
        "KUBEINFER_ROUTE_TABLE_PATH": str(routes),
        "KUBEINFER_ROUTE_RELOAD_INTERVAL_S": "0.1",
        "KUBEINFER_HEALTH_INTERVAL_S": "0.2",
        "KUBEINFER_CAPTURE_FLUSH_INTERVAL_S": "0.2",
        **env}, tmp_path / "logs")


def _invoke(client: httpx.Client, gateway: RuntimeProcess, i: int) -> httpx.Response:
    return client.post(gateway.url + "/endpoints/iris/invocations",
                       content=f"{i},5.1,3.5\n".encode(),
                       headers={"Content-Type": "text/csv", "Accept": "application/json",
                                "X-Amzn-SageMaker-Inference-Id": f"req-{i}",
                                "X-Amzn-SageMaker-Custom-Attributes": f"n={i}"})


def _check_line(line: bytes) -> dict[str, Any]:
    """One capture line, valid in SageMaker's format (input CSV, output JSON)."""
    record: dict[str, Any] = json.loads(line)
    assert set(record) == {"captureData", "eventMetadata", "eventVersion"}
    assert record["eventVersion"] == "0"
    data = record["captureData"]
    assert data["endpointInput"]["mode"] == "INPUT"
    assert data["endpointInput"]["observedContentType"] == "text/csv"
    assert data["endpointInput"]["encoding"] == "CSV"
    assert data["endpointOutput"]["mode"] == "OUTPUT"
    assert data["endpointOutput"]["encoding"] == "JSON"
    json.loads(data["endpointOutput"]["data"])  # the upstream's JSON, as text
    meta = record["eventMetadata"]
    assert _ISO.match(meta["inferenceTime"]) and len(meta["eventId"]) == 36
    n = data["endpointInput"]["data"].split(",", 1)[0]
    assert meta["inferenceId"] == f"req-{n}" and meta["customAttributes"] == f"n={n}"
    return record


def test_file_capture_samples_at_the_rate(tmp_path: Path, upstream: RuntimeProcess) -> None:
    out = tmp_path / "captures"
    gateway = _gateway(tmp_path, upstream, CaptureRoute(
        destination=f"file://{out}", sampling_percentage=30))
    try:
        with httpx.Client(timeout=10) as client:
            for i in range(2000):
                assert _invoke(client, gateway, i).status_code == 200
        wait_until(lambda: metric(gateway.url, "kubeinfer_capture_records_total",
                                   result="written") + metric(
            gateway.url, "kubeinfer_capture_records_total", result="sampled_out") == 2000,
                   20, "every request written or sampled out")
        assert metric(gateway.url, "kubeinfer_capture_records_total", result="dropped") == 0
    finally:
        gateway.stop()  # SIGTERM: flushes what is left
    files = sorted(p for p in out.rglob("*") if p.is_file())
    assert files and all(_KEY.search(p.as_uri()) for p in files)
    lines = [line for p in files for line in p.read_bytes().splitlines()]
    ids = {_check_line(line)["eventMetadata"]["eventId"] for line in lines}
    assert len(ids) == len(lines)
    # 30% of 2,000 within 3 percentage points (~3 standard deviations of the draw).
    assert 540 <= len(lines) <= 660, len(lines)


def _s3_lines(server: S3Server, bucket: str) -> list[bytes]:
    s3 = boto3.client("s3", endpoint_url=server.endpoint_url, region_name="us-east-1",
                      aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)
    lines: list[bytes] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            assert _KEY.search("/" + obj["Key"]), obj["Key"]
            body = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
            lines += body.splitlines()
    return lines


def test_s3_capture_reads_back_with_boto3(tmp_path: Path, upstream: RuntimeProcess,
                                          s3_server: S3Server) -> None:
    s3_server.minio().make_bucket("captures")
    gateway = _gateway(tmp_path, upstream, CaptureRoute(
        destination="s3://captures/prod", sampling_percentage=100,
        json_content_types=()), **s3_server.env())
    try:
        with httpx.Client(timeout=10) as client:
            for i in range(50):
                assert _invoke(client, gateway, i).status_code == 200
        wait_until(lambda: metric(gateway.url, "kubeinfer_capture_records_total",
                                   result="written") == 50, 20, "50 records written")
    finally:
        gateway.stop()
    lines = _s3_lines(s3_server, "captures")
    assert len(lines) == 50
    for line in lines:
        out = json.loads(line)["captureData"]["endpointOutput"]
        # application/json is not listed here: the output is BASE64, every byte kept.
        assert out["encoding"] == "BASE64"
        json.loads(base64.b64decode(out["data"]))


def test_store_outage_bounds_memory_counts_drops_and_loses_nothing_after(
        tmp_path: Path, upstream: RuntimeProcess) -> None:
    server = start_s3(tmp_path / "s3")
    bound = 64 * 1024
    try:
        server.minio().make_bucket("captures")
        gateway = _gateway(tmp_path, upstream, CaptureRoute(
            destination="s3://captures/prod", sampling_percentage=100),
            KUBEINFER_CAPTURE_BUFFER_BYTES=str(bound),
            KUBEINFER_CAPTURE_BATCH_BYTES="8192", **server.env())
        try:
            server.down()
            with httpx.Client(timeout=10) as client:
                for i in range(400):
                    response = _invoke(client, gateway, i)
                    assert response.status_code == 200
                    assert response.json()["name"] == "capture"
                    if i % 50 == 0:
                        assert metric(gateway.url, "kubeinfer_capture_buffer_bytes") <= bound
                wait_until(lambda: metric(gateway.url, "kubeinfer_capture_upload_failures_total")
                           > 0, 30, "a failed upload")
                assert metric(gateway.url, "kubeinfer_capture_buffer_bytes") <= bound
                dropped = metric(gateway.url, "kubeinfer_capture_records_total", result="dropped")
                assert dropped > 0

                server.up()

                def settled(expected: int) -> bool:
                    written = metric(gateway.url, "kubeinfer_capture_records_total",
                                      result="written")
                    dropped = metric(gateway.url, "kubeinfer_capture_records_total",
                                      result="dropped")
                    return written + dropped == expected and metric(
                        gateway.url, "kubeinfer_capture_buffer_bytes") == 0

                wait_until(lambda: settled(400), 60, "the buffer written after the outage")
                dropped = metric(gateway.url, "kubeinfer_capture_records_total", result="dropped")
                for i in range(400, 500):
                    assert _invoke(client, gateway, i).status_code == 200
                wait_until(lambda: settled(500), 30, "the later records written")
                # Nothing accepted after the store came back was dropped.
                assert metric(gateway.url, "kubeinfer_capture_records_total",
                               result="dropped") == dropped
                written = metric(gateway.url, "kubeinfer_capture_records_total", result="written")
        finally:
            gateway.stop()
        lines = _s3_lines(server, "captures")
        assert len(lines) == written
        numbers = {int(_check_line(line)["eventMetadata"]["inferenceId"][4:])
                   for line in lines}
        assert set(range(400, 500)) <= numbers
        assert "5.1,3.5" not in gateway.log()  # captured bytes are never logged
    finally:
        server.stop()
