"""Content types, Accept lists, byte order marks and NaN as real clients send them, through
a real gateway and model server, with boto3 (raw bytes, as ``invoke_endpoint`` takes them)
and the bodies the SageMaker Python SDK's serializers write (``json.dumps``: NaN as
``NaN``). Every answer is the right body or a 4xx naming the type; never a 500."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.integration.test_gateway import Gateway, start_gateway
from tests.support.onnx_models import row_sum_model
from tests.support.procs import RuntimeProcess, start_runtime

BOM = b"\xef\xbb\xbf"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("encoding-audit")
    model = row_sum_model(tmp / "sum.onnx")  # X float32 [N, 2] -> Y [N, 1], the row sum
    server: RuntimeProcess = start_runtime("model-server", {
        "KUBEINFER_MODEL_URI": f"file://{model}", "KUBEINFER_ENDPOINT_NAME": "sum",
        "KUBEINFER_VARIANT_NAME": "primary", "KUBEINFER_MODEL_CACHE_DIR": str(tmp / "cache"),
    }, tmp / "logs", timeout=60)
    gw = start_gateway(Path(tmp))
    try:
        gw.publish({"sum": [("primary", 1.0, [server.url])]})
        yield gw
    finally:
        gw.proc.stop()
        server.stop()


def _invoke(gw: Gateway, body: bytes, content_type: str, accept: str | None = None
            ) -> tuple[str, bytes]:
    kw: dict[str, Any] = {"EndpointName": "sum", "Body": body, "ContentType": content_type}
    if accept is not None:
        kw["Accept"] = accept
    r = gw.client().invoke_endpoint(**kw)
    return r["ContentType"], r["Body"].read()


@pytest.mark.parametrize(("body", "content_type"), [
    (BOM + b"[[1,2],[3,4]]", "application/json"),
    (BOM + b'{"instances":[[1,2],[3,4]]}', "application/json; charset=UTF-8"),
    (BOM + b"1,2\r\n3,4\r\n", "text/csv; charset=utf-8"),
    (b"1,2\r\n3,4", "TEXT/CSV ;  charset=UTF-8"),
    (b"1e0,+2\n3.0E0,4\n", "text/csv"),
])
def test_boms_crlf_and_parameters_are_read(gateway: Gateway, body: bytes,
                                           content_type: str) -> None:
    ct, out = _invoke(gateway, body, content_type)
    assert (ct, json.loads(out)) == ("application/json", {"predictions": [[3.0], [7.0]]})


def test_nan_as_the_sdk_json_serializer_writes_it(gateway: Gateway) -> None:
    body = json.dumps([[float("nan"), 1.0], [3.0, 4.0]]).encode()  # JSONSerializer's bytes
    ct, out = _invoke(gateway, body, "application/json")
    assert json.loads(out) == {"predictions": [[None], [7.0]]}  # JSON has no NaN: null
    ct, out = _invoke(gateway, body, "application/json", accept="text/csv")
    assert (ct, out) == ("text/csv", b"nan\n7.0\n")  # what a CSV reader takes back


@pytest.mark.parametrize(("accept", "want"), [
    ("text/csv;q=0.5, application/json", "application/json"),
    ("application/json;q=0, text/csv", "text/csv"),
    ("application/x-npy, text/csv, application/json", "application/x-npy"),
    ("*/*", "application/json"),
])
def test_accept_lists_with_quality_values(gateway: Gateway, accept: str, want: str) -> None:
    ct, _ = _invoke(gateway, b"[[1,2]]", "application/json", accept=accept)
    assert ct == want


@pytest.mark.parametrize(("content_type", "accept", "named"), [
    ("application/jsonlines", None, "Content-Type 'application/jsonlines'"),
    ("application/x-recordio-protobuf", None, "Content-Type 'application/x-recordio-"),
    ("*/*", None, "Content-Type '*/*'"),
    ("application/json", "application/jsonlines", "Accept 'application/jsonlines'"),
    ("application/json", "application/json;q=0", "Accept 'application/json;q=0'"),
])
def test_types_we_do_not_speak_are_a_4xx_naming_them(gateway: Gateway, content_type: str,
                                                     accept: str | None, named: str) -> None:
    with pytest.raises(ClientError) as e:
        _invoke(gateway, b'{"a":1}\n', content_type, accept)
    err = e.value.response
    assert 400 <= err["ResponseMetadata"]["HTTPStatusCode"] < 500, err
    assert named in err["Error"]["Message"], err

