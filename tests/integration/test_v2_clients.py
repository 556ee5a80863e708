"""Stock Open Inference Protocol clients against real model-server processes.

``tritonclient.http`` with its defaults sends tensors as binary data after a
JSON header, asks for binary outputs, reads readiness from status codes and
errors from ``{"error": ...}``: all of it must work unchanged against a
single-model server (iris.onnx, compared with onnxruntime in-process) and a
multi-model server (models load on first use; readiness never loads one).
Also here: both HTTP paths answer binary requests byte for byte alike, every
output of a model reaches ``/invocations`` callers whatever the Accept, GET
/models joins a relative prefix and a model name with one "/", and ``kubeinfer
up``'s probe of a multi-model server loads nothing.
"""

from __future__ import annotations

import http.client
import io
import re
from collections.abc import Iterator
from pathlib import Path

import boto3
import httpx
import numpy as np
import onnxruntime as ort
import orjson
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from kubeinfer_operator.cli import _sample_for
from kubeinfer_operator.local.state import EndpointState, ProcessState, ProcState
from tests.integration.test_gateway import start_gateway
from tests.support.procs import RuntimeProcess, start_runtime

X = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3], [5.9, 2.8, 4.3, 1.3]], np.float32)
CUSTOM_ATTRIBUTES = "X-Amzn-SageMaker-Custom-Attributes"


@pytest.fixture(scope="module")
def iris(models_dir: Path, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[RuntimeProcess]:
    tmp = tmp_path_factory.mktemp("v2-iris")
    proc = start_runtime("model-server", {
        "KUBEINFER_MODEL_URI": f"file://{models_dir / 'iris.onnx'}",
        "KUBEINFER_MODEL_NAME": "primary", "KUBEINFER_ENDPOINT_NAME": "iris",
        "KUBEINFER_VARIANT_NAME": "primary", "KUBEINFER_MODEL_CACHE_DIR": str(tmp / "cache"),
    }, tmp / "logs")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def zoo(models_dir: Path, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[RuntimeProcess]:
    """A multi-model server whose prefix is relative, without a trailing "/"."""
    tmp = tmp_path_factory.mktemp("v2-zoo")
    proc = start_runtime("model-server", {
        "KUBEINFER_MULTI_MODEL_PREFIX": f"file://{models_dir.name}",
        "KUBEINFER_MODEL_BASE_DIR": str(models_dir.parent),
        "KUBEINFER_MODEL_CACHE_DIR": str(tmp / "cache"),
        "KUBEINFER_ENDPOINT_NAME": "zoo", "KUBEINFER_VARIANT_NAME": "all",
    }, tmp / "logs")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def reference(models_dir: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(models_dir / "iris.onnx"), providers=["CPUExecutionProvider"])


def _client(proc: RuntimeProcess) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(url=f"127.0.0.1:{proc.port}")


def _input(x: np.ndarray = X, binary: bool = True) -> triton.InferInput:
    inp = triton.InferInput("X", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    return inp


def _mme_stats(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics").text
    return {m.group(1): float(m.group(2)) for m in re.finditer(
        r'^kubeinfer_multimodel_(\w+)\{endpoint="zoo",variant="all"\} (\S+)$', text, re.M)}


# ------------------------------------------------------------------ single model, tritonclient


def test_tritonclient_health_metadata_config_and_readiness(iris: RuntimeProcess) -> None:
    client = _client(iris)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("primary")
    assert not client.is_model_ready("other")  # 404: not served here
    meta = client.get_model_metadata("primary")
    assert meta["inputs"] == [{"name": "X", "datatype": "FP32", "shape": [-1, 4]}]
    assert [o["name"] for o in meta["outputs"]] == ["label", "probabilities"]
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    config = client.get_model_config("primary")
    assert config["input"] == [{"name": "X", "data_type": "TYPE_FP32", "dims": [-1, 4]}]
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata("other")
    assert info.value.status() == "404"
    assert 'Model "other" is not served here' in info.value.message()
    client.close()


def test_tritonclient_infer_with_its_defaults_matches_onnxruntime(
        iris: RuntimeProcess, reference: ort.InferenceSession) -> None:
    client = _client(iris)
    label, probs = reference.run(None, {"X": X})
    # No outputs named: tritonclient asks for every output as binary data.
    result = client.infer("primary", [_input()], request_id="r-1")
    response = result.get_response()
    assert response["id"] == "r-1" and response["model_name"] == "primary"
    assert all("binary_data_size" in o["parameters"] for o in response["outputs"])
    np.testing.assert_array_equal(result.as_numpy("label"), label)
    np.testing.assert_allclose(result.as_numpy("probabilities"), probs, rtol=1e-6)
    # InferRequestedOutput's default is binary too; one output named, one answered.
    result = client.infer("primary", [_input()],
                          outputs=[triton.InferRequestedOutput("probabilities")])
    assert [o["name"] for o in result.get_response()["outputs"]] == ["probabilities"]
    np.testing.assert_allclose(result.as_numpy("probabilities"), probs, rtol=1e-6)
    # JSON both ways still works through the same client.
    result = client.infer("primary", [_input(binary=False)],
                          outputs=[triton.InferRequestedOutput("label", binary_data=False)])
    assert result.get_response()["outputs"][0]["data"] == label.tolist()
    stats = client.get_inference_statistics("primary")["model_stats"][0]
    assert stats["inference_count"] >= 3 and stats["inference_stats"]["success"]["ns"] > 0
    client.close()


def test_tritonclient_errors_carry_the_servers_message(iris: RuntimeProcess) -> None:
    client = _client(iris)
    with pytest.raises(InferenceServerException) as info:
        client.infer("other", [_input()])
    assert info.value.status() == "404"
    assert info.value.message().startswith('Model "other" is not served here')
    with pytest.raises(InferenceServerException) as info:
        client.infer("primary", [_input(X[:, :3].copy())])
    assert info.value.status() == "400"
    assert info.value.message() == 'Input "X" expects shape [N, 4] float32, got [3, 3]'
    client.close()


def test_v2_errors_have_v2_bodies_and_sagemaker_routes_keep_theirs(iris: RuntimeProcess) -> None:
    for r in (httpx.post(iris.url + "/v2/models/other/infer", json={}),
              httpx.get(iris.url + "/v2/models/other"),
              httpx.get(iris.url + "/v2/nope")):
        assert r.status_code == 404 and r.headers["content-type"] == "application/json"
        assert set(r.json()) == {"error"} and r.headers["x-amzn-errortype"] == "ValidationError:"
    r = httpx.post(iris.url + "/invocations", json=[[1, 2, 3]])
    assert r.status_code == 400 and set(r.json()) == {"ErrorCode", "Message", "message"}


def test_binary_answers_are_framed_as_the_extension_says(iris: RuntimeProcess) -> None:
    header = orjson.dumps({"inputs": [{"name": "X", "shape": [3, 4], "datatype": "FP32",
                                       "parameters": {"binary_data_size": X.nbytes}}],
                           "outputs": [{"name": "label", "parameters": {"binary_data": True}},
                                       {"name": "probabilities"}]})
    r = httpx.post(iris.url + "/v2/models/primary/infer", content=header + X.tobytes(),
                   headers={"Inference-Header-Content-Length": str(len(header)),
                            "Content-Type": "application/octet-stream"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    n = int(r.headers["inference-header-content-length"])
    doc = orjson.loads(r.content[:n])
    assert doc["outputs"][0]["parameters"] == {"binary_data_size": 24}
    assert len(doc["outputs"][1]["data"]) == 9  # asked for as JSON
    assert np.frombuffer(r.content[n:], "<i8").tolist() == [0, 2, 1]
    # A lie about the sizes is a 400 in V2's shape, naming the input.
    r = httpx.post(iris.url + "/v2/models/primary/infer", content=header + X.tobytes()[:40],
                   headers={"Inference-Header-Content-Length": str(len(header))})
    assert r.status_code == 400
    assert r.json()["error"].startswith('V2 input "X" declares binary_data_size 48 but only 40')


def _exchange(conn: http.client.HTTPConnection, target: str, body: bytes,
              headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    conn.request("POST", target, body=body, headers=headers)
    resp = conn.getresponse()
    got = {k.lower(): v for k, v in resp.getheaders() if k.lower() != "date"}
    return resp.status, got, resp.read()


@pytest.mark.parametrize("case", ["binary", "binary-json-out", "truncated", "bad-header",
                                  "huge-shape", "csv-output", "npz", "unknown-output"])
def test_inline_and_asgi_paths_answer_alike(iris: RuntimeProcess, case: str) -> None:
    """The inline protocol answers a target without a query; ``?path=asgi`` takes ASGI."""
    header = orjson.dumps({"inputs": [{"name": "X", "shape": [3, 4], "datatype": "FP32",
                                       "parameters": {"binary_data_size": X.nbytes}}],
                           "parameters": {"binary_data_output": case != "binary-json-out"}})
    v2 = {"Inference-Header-Content-Length": str(len(header))}
    huge = header.replace(b"[3,4]", b"[10000000000,4]")  # 4e10 values claimed
    target, body, headers = {
        "binary": ("/v2/models/primary/infer", header + X.tobytes(), v2),
        "binary-json-out": ("/v2/models/primary/infer", header + X.tobytes(), v2),
        "truncated": ("/v2/models/primary/infer", header + X.tobytes()[:7], v2),
        "bad-header": ("/v2/models/primary/infer", header + X.tobytes(),
                       {"Inference-Header-Content-Length": "12x"}),
        "huge-shape": ("/v2/models/primary/infer", huge + X.tobytes(),
                       {"Inference-Header-Content-Length": str(len(huge))}),
        "csv-output": ("/invocations", orjson.dumps(X.tolist()),
                       {"Accept": "text/csv", CUSTOM_ATTRIBUTES: "output=probabilities"}),
        "npz": ("/invocations", orjson.dumps(X.tolist()), {"Accept": "application/x-npz"}),
        "unknown-output": ("/invocations", orjson.dumps(X.tolist()),
                           {"Accept": "application/x-npy", CUSTOM_ATTRIBUTES: "output=nope"}),
    }[case]
    conn = http.client.HTTPConnection("127.0.0.1", iris.port, timeout=10)
    try:
        inline = _exchange(conn, target, body, headers)
        asgi = _exchange(conn, target + "?path=asgi", body, headers)
    finally:
        conn.close()
    assert inline == asgi
    expected = {"binary": 200, "binary-json-out": 200, "truncated": 400, "bad-header": 400,
                "huge-shape": 413, "csv-output": 200, "npz": 200, "unknown-output": 400}[case]
    assert inline[0] == expected, inline


# ------------------------------------------------------------------ /invocations: every output


def test_every_output_reaches_invocations_callers(iris: RuntimeProcess,
                                                  reference: ort.InferenceSession) -> None:
    label, probs = reference.run(None, {"X": X})
    url = iris.url + "/invocations"
    r = httpx.post(url, json=X.tolist(), headers={"Accept": "application/x-npz"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-npz"
    with np.load(io.BytesIO(r.content), allow_pickle=False) as archive:
        assert archive.files == ["label", "probabilities"]
        np.testing.assert_array_equal(archive["label"], label)
        np.testing.assert_allclose(archive["probabilities"], probs, rtol=1e-6)
    # CSV: the first output by default, and the answer says so.
    r = httpx.post(url, json=X.tolist(), headers={"Accept": "text/csv"})
    assert r.text.split() == [str(v) for v in label]
    assert r.headers["x-kubeinfer-output"] == "label"
    assert r.headers[CUSTOM_ATTRIBUTES] == "output=label"
    # ... or the one CustomAttributes names.
    r = httpx.post(url, json=X.tolist(), headers={
        "Accept": "application/x-npy", CUSTOM_ATTRIBUTES: "trace=1; output=probabilities"})
    assert r.headers["x-kubeinfer-output"] == "probabilities"
    np.testing.assert_allclose(np.load(io.BytesIO(r.content)), probs, rtol=1e-6)
    r = httpx.post(url, json=X.tolist(), headers={"Accept": "text/csv",
                                                  CUSTOM_ATTRIBUTES: "output=nope"})
    assert r.status_code == 400
    assert '"label", "probabilities"' in r.json()["Message"]
    # JSON keeps every output by name, with no output header.
    r = httpx.post(url, json=X.tolist())
    assert set(r.json()["predictions"]) == {"label", "probabilities"}
    assert "x-kubeinfer-output" not in r.headers


def test_boto3_through_the_gateway_learns_which_output_it_got(
        iris: RuntimeProcess, tmp_path: Path, reference: ort.InferenceSession) -> None:
    gateway = start_gateway(tmp_path)
    try:
        gateway.publish({"iris": [("primary", 1.0, [iris.url])]})
        rt = boto3.client("sagemaker-runtime", endpoint_url=gateway.url, region_name="us-east-1",
                          aws_access_key_id="x", aws_secret_access_key="x")
        r = rt.invoke_endpoint(EndpointName="iris", ContentType="application/json",
                               Accept="text/csv", CustomAttributes="output=probabilities",
                               Body=orjson.dumps(X.tolist()))
        assert r["CustomAttributes"] == "output=probabilities"
        got = np.array([[float(v) for v in row.split(",")]
                        for row in r["Body"].read().decode().split()])
        np.testing.assert_allclose(got, reference.run(["probabilities"], {"X": X})[0],
                                   rtol=1e-6)
        r = rt.invoke_endpoint(EndpointName="iris", ContentType="application/json",
                               Accept="application/x-npz", Body=orjson.dumps(X.tolist()))
        with np.load(io.BytesIO(r["Body"].read())) as archive:
            assert archive.files == ["label", "probabilities"]
    finally:
        gateway.proc.stop()


# ------------------------------------------------------------------ readiness when not ready


def test_a_server_that_cannot_load_is_not_ready_to_tritonclient(tmp_path: Path) -> None:
    missing = tmp_path / "missing.onnx"
    proc = start_runtime("model-server", {
        "KUBEINFER_MODEL_URI": f"file://{missing}", "KUBEINFER_MODEL_NAME": "primary",
        "KUBEINFER_MODEL_CACHE_DIR": str(tmp_path / "cache")}, tmp_path / "logs",
        expect_ready=False)
    try:
        client = _client(proc)
        assert client.is_server_live()
        assert not client.is_server_ready() and not client.is_model_ready("primary")
        r = httpx.get(proc.url + "/v2/health/ready")
        assert r.status_code == 400 and r.json()["ready"] is False
        assert "primary" in r.json()["error"]
        with pytest.raises(InferenceServerException) as info:
            client.infer("primary", [_input()])
        assert info.value.status() == "503" and "primary" in info.value.message()
        client.close()
    finally:
        proc.stop()


# ------------------------------------------------------------------ multi-model server


def test_tritonclient_against_a_multi_model_server(zoo: RuntimeProcess, models_dir: Path,
                                                   reference: ort.InferenceSession) -> None:
    client = _client(zoo)
    before = _mme_stats(zoo.url)
    assert client.is_server_live() and client.is_server_ready()
    # Not loaded yet, and unknown: both not ready; neither probe loads (or looks up) anything.
    assert not client.is_model_ready("iris-v2.onnx")
    assert not client.is_model_ready("nope.onnx")
    after = _mme_stats(zoo.url)
    assert (after["cache_misses_total"], after["load_failures_total"]) == (
        before["cache_misses_total"], before["load_failures_total"])
    result = client.infer("iris-v2.onnx", [_input()])
    assert result.as_numpy("label").shape == (3,)
    assert client.is_model_ready("iris-v2.onnx")
    result = client.infer("iris.onnx", [_input()])
    np.testing.assert_array_equal(result.as_numpy("label"), reference.run(["label"], {"X": X})[0])
    assert client.get_model_metadata("iris.onnx")["inputs"][0]["name"] == "X"
    assert client.get_model_config("iris.onnx")["output"][1]["name"] == "probabilities"
    with pytest.raises(InferenceServerException) as info:
        client.infer("nope.onnx", [_input()])
    assert info.value.status() == "404" and 'Model "nope.onnx" not found' in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        client.get_inference_statistics("iris.onnx")
    assert "/metrics" in info.value.message()
    client.close()


def test_models_listing_joins_a_relative_prefix_and_the_name(zoo: RuntimeProcess,
                                                              models_dir: Path) -> None:
    r = httpx.post(zoo.url + "/invocations", json=X.tolist(),
                   headers={"X-Amzn-SageMaker-Target-Model": "iris.onnx"})
    assert r.status_code == 200, r.text
    listed = {m["modelName"]: m["modelUrl"] for m in httpx.get(zoo.url + "/models").json()[
        "models"]}
    assert listed["iris.onnx"] == f"file://{models_dir}/iris.onnx"
    assert httpx.get(zoo.url + "/models/iris.onnx").json()["modelUrl"] == (
        f"file://{models_dir}/iris.onnx")
    # Every output here too: CSV names its output.
    r = httpx.post(zoo.url + "/invocations", json=X.tolist(), headers={
        "X-Amzn-SageMaker-Target-Model": "iris.onnx", "Accept": "text/csv",
        CUSTOM_ATTRIBUTES: "output=probabilities"})
    assert r.headers["x-kubeinfer-output"] == "probabilities" and len(r.text.split()) == 3


# ------------------------------------------------------------------ kubeinfer up's probe


def _state(proc: RuntimeProcess, variant: str) -> EndpointState:
    return EndpointState(endpoint="e", supervisor_pid=1, processes=[ProcessState(
        name=f"{variant}-0", role="model-server", variant=variant, port=proc.port,
        url=proc.url, state=ProcState.READY, routed=True, log="")])


def test_up_probe_loads_nothing_on_a_multi_model_server(zoo: RuntimeProcess,
                                                        iris: RuntimeProcess) -> None:
    before = _mme_stats(zoo.url)
    assert _sample_for(_state(zoo, "all")) is None  # the placeholder is printed instead
    after = _mme_stats(zoo.url)
    for counter in ("cache_misses_total", "load_failures_total", "loads_total"):
        assert after[counter] == before[counter], counter
    # A single-model server still gets a sample that fits its input.
    assert orjson.loads(_sample_for(_state(iris, "primary")) or "") == {
        "instances": [[1.0, 1.0, 1.0, 1.0]]}
