"""The model server as a real process: SageMaker contract, V2, S3 models, every error path.

Predictions are compared with onnxruntime run in-process on the same file, so
a wrong decode/encode anywhere between the socket and the backend shows up.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from tests.support.onnx_models import add_3_model
from tests.support.ports import wait_until
from tests.support.procs import RuntimeProcess, start_runtime
from tests.support.s3 import S3Server

ROWS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3], [5.9, 2.8, 4.3, 1.3]]
LABELS = 'endpoint="iris",model="primary",variant="primary"'


def _env(uri: str, **extra: str) -> dict[str, str]:
    return {"KUBEINFER_MODEL_URI": uri, "KUBEINFER_MODEL_NAME": "primary",
            "KUBEINFER_ENDPOINT_NAME": "iris", "KUBEINFER_VARIANT_NAME": "primary", **extra}


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model-server-logs")


@pytest.fixture(scope="module")
def iris(models_dir: Path, logs: Path, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[RuntimeProcess]:
    cache = tmp_path_factory.mktemp("cache")
    proc = start_runtime("model-server", _env(f"file://{models_dir / 'iris.onnx'}",
                                              KUBEINFER_MODEL_CACHE_DIR=str(cache)), logs)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def reference(models_dir: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(models_dir / "iris.onnx"), providers=["CPUExecutionProvider"])


def _x() -> np.ndarray:
    return np.array(ROWS, dtype=np.float32)


def _assert_error(r: httpx.Response, status: int, code: str, *fragments: str) -> str:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    assert r.headers["x-amzn-errortype"] == f"{code}:"
    doc = r.json()
    assert doc["ErrorCode"] == code and doc["Message"] == doc["message"]
    for f in fragments:
        assert f in doc["Message"], doc["Message"]
    return str(doc["Message"])


def _assert_v2_error(r: httpx.Response, status: int, *fragments: str) -> str:
    """A V2 route's error: the body V2 clients read, ``{"error": ...}``, same status."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    message = r.json()["error"]
    for f in fragments:
        assert f in message, message
    return str(message)


# ------------------------------------------------------------------ health and metadata


def test_ping_and_v2_health(iris: RuntimeProcess) -> None:
    r = httpx.get(iris.url + "/ping")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert httpx.get(iris.url + "/v2/health/live").json() == {"live": True}
    assert httpx.get(iris.url + "/v2/health/ready").json() == {"ready": True}
    assert httpx.get(iris.url + "/v2/models/primary/ready").json() == {"name": "primary",
                                                                       "ready": True}
    assert httpx.get(iris.url + "/docs").status_code == 200
    paths = httpx.get(iris.url + "/openapi.json").json()["paths"]
    assert "/invocations" in paths and "/v2/models/{name}/infer" in paths


def test_v2_model_metadata(iris: RuntimeProcess) -> None:
    doc = httpx.get(iris.url + "/v2/models/primary").json()
    assert doc["name"] == "primary" and doc["platform"] == "onnxruntime_onnx"
    assert doc["inputs"] == [{"name": "X", "datatype": "FP32", "shape": [-1, 4]}]
    assert doc["outputs"] == [{"name": "label", "datatype": "INT64", "shape": [-1]},
                              {"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]}]
    assert re.fullmatch(r"[0-9a-f]{12}", doc["versions"][0])


# ------------------------------------------------------------------ /invocations


@pytest.mark.parametrize("body", [{"instances": ROWS}, ROWS, {"inputs": {"X": ROWS}}])
def test_json_in_json_out_matches_onnxruntime(iris: RuntimeProcess,
                                              reference: ort.InferenceSession,
                                              body: object) -> None:
    r = httpx.post(iris.url + "/invocations", json=body)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    label, probs = reference.run(None, {"X": _x()})
    preds = r.json()["predictions"]
    assert preds["label"] == label.tolist()
    np.testing.assert_allclose(preds["probabilities"], probs, rtol=1e-6)


def test_csv_in_csv_out(iris: RuntimeProcess, reference: ort.InferenceSession) -> None:
    body = "\n".join(",".join(str(v) for v in row) for row in ROWS)
    r = httpx.post(iris.url + "/invocations", content=body,
                   headers={"content-type": "text/csv; charset=utf-8", "accept": "text/csv"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "text/csv"
    assert r.text.split() == [str(v) for v in reference.run(["label"], {"X": _x()})[0]]


def test_npy_in_npy_out(iris: RuntimeProcess, reference: ort.InferenceSession) -> None:
    buf = io.BytesIO()
    np.save(buf, np.array(ROWS))  # float64: coerced to the model's float32
    r = httpx.post(iris.url + "/invocations", content=buf.getvalue(),
                   headers={"content-type": "application/x-npy", "accept": "application/x-npy"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/x-npy"
    got = np.load(io.BytesIO(r.content), allow_pickle=False)
    np.testing.assert_array_equal(got, reference.run(["label"], {"X": _x()})[0])


# ------------------------------------------------------------------ V2 infer


def test_v2_infer_matches_onnxruntime(iris: RuntimeProcess,
                                      reference: ort.InferenceSession) -> None:
    body = {"id": "req-1", "inputs": [{"name": "X", "shape": [3, 4], "datatype": "FP32",
                                       "data": [v for row in ROWS for v in row]}]}
    r = httpx.post(iris.url + "/v2/models/primary/infer", json=body)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["model_name"] == "primary" and doc["id"] == "req-1"
    label, probs = reference.run(None, {"X": _x()})
    out = {o["name"]: o for o in doc["outputs"]}
    assert out["label"] == {"name": "label", "shape": [3], "datatype": "INT64",
                            "data": label.tolist()}
    assert out["probabilities"]["shape"] == [3, 3]
    np.testing.assert_allclose(out["probabilities"]["data"], probs.ravel(), rtol=1e-6)


def test_v2_requested_output_only(iris: RuntimeProcess) -> None:
    body = {"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32", "data": ROWS[0]}],
            "outputs": [{"name": "probabilities"}]}
    doc = httpx.post(iris.url + "/v2/models/primary/infer", json=body).json()
    assert [o["name"] for o in doc["outputs"]] == ["probabilities"]


def test_v2_unknown_model_is_404(iris: RuntimeProcess) -> None:
    for r in (httpx.post(iris.url + "/v2/models/other/infer", json={}),
              httpx.get(iris.url + "/v2/models/other"),
              httpx.get(iris.url + "/v2/models/other/ready")):
        assert set(r.json()) == {"error"} and r.headers["x-amzn-errortype"] == "ValidationError:"
        _assert_v2_error(r, 404, 'Model "other" is not served here')


def test_v2_bad_request_names_the_problem(iris: RuntimeProcess) -> None:
    body = {"inputs": [{"name": "X", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}
    _assert_v2_error(httpx.post(iris.url + "/v2/models/primary/infer", json=body), 400,
                     'Input "X" expects shape [N, 4] float32, got [1, 3]')


# ------------------------------------------------------------------ errors


def test_bad_json(iris: RuntimeProcess) -> None:
    r = httpx.post(iris.url + "/invocations", content=b"{nope",
                   headers={"content-type": "application/json"})
    _assert_error(r, 400, "ValidationError", "Request body is not valid JSON")


def test_wrong_shape_names_the_input(iris: RuntimeProcess) -> None:
    r = httpx.post(iris.url + "/invocations", json=[[1, 2, 3]])
    msg = _assert_error(r, 400, "ValidationError")
    assert msg == 'Input "X" expects shape [N, 4] float32, got [1, 3]'


def test_wrong_dtype_names_the_input(iris: RuntimeProcess) -> None:
    r = httpx.post(iris.url + "/invocations", json=[["a", "b", "c", "d"]])
    _assert_error(r, 400, "ValidationError", 'Input "X" expects shape [N, 4] float32',
                  "string")


def test_unsupported_content_type_and_accept(iris: RuntimeProcess) -> None:
    r = httpx.post(iris.url + "/invocations", content=b"x",
                   headers={"content-type": "image/png"})
    _assert_error(r, 400, "ValidationError", "'image/png' is not supported")
    r = httpx.post(iris.url + "/invocations", json=ROWS, headers={"accept": "image/png"})
    _assert_error(r, 400, "ValidationError", "Accept 'image/png' is not supported",
                  "application/json, text/csv, application/x-npy or application/x-npz")


def test_payload_over_6_mb_is_413(iris: RuntimeProcess) -> None:
    big = b"[" + b"1.0," * 1_600_000 + b"1.0]"  # 6.4 MB > 6 MiB
    assert len(big) > 6 * 1024 * 1024
    with httpx.Client() as client:
        r = client.post(iris.url + "/invocations", content=big,
                        headers={"content-type": "application/json"})
        _assert_error(r, 413, "ValidationError", "exceeds the limit of 6291456 bytes")

        def chunks() -> Iterator[bytes]:  # no Content-Length: cut off while streaming
            for _ in range(7):
                yield b" " * 1_000_000

        r = client.post(iris.url + "/invocations", content=chunks(),
                        headers={"content-type": "application/json"})
        _assert_error(r, 413, "ValidationError", "exceeds the limit")
        # The server is still fine on the same client afterwards.
        assert client.post(iris.url + "/invocations", json=ROWS).status_code == 200


def test_get_on_invocations_is_405(iris: RuntimeProcess) -> None:
    _assert_error(httpx.get(iris.url + "/invocations"), 405, "ValidationError", "use POST")


def test_unknown_route_is_404_in_the_same_style(iris: RuntimeProcess) -> None:
    _assert_error(httpx.get(iris.url + "/nope"), 404, "ValidationError", "No route GET /nope")


# ------------------------------------------------------------------ metrics


def _metric(text: str, name: str, labels: str) -> float:
    m = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


def _sorted_labels(**kw: str) -> str:
    return ",".join(f'{k}="{v}"' for k, v in sorted(kw.items()))


def test_metrics_count_invocations_and_errors_by_code(iris: RuntimeProcess) -> None:
    def scrape() -> str:
        r = httpx.get(iris.url + "/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        return r.text

    err400 = _sorted_labels(code="400", endpoint="iris", model="primary", variant="primary")
    err404 = _sorted_labels(code="404", endpoint="iris", model="primary", variant="primary")
    before = scrape()
    for _ in range(3):
        assert httpx.post(iris.url + "/invocations", json=ROWS).status_code == 200
    httpx.post(iris.url + "/invocations", json=[[1]])
    httpx.post(iris.url + "/invocations", content=b"{", headers={"content-type": "text/csv"})
    httpx.post(iris.url + "/v2/models/other/infer", json={})
    after = scrape()

    def delta(name: str, labels: str) -> float:
        return _metric(after, name, labels) - _metric(before, name, labels)

    assert delta("kubeinfer_invocations_total", LABELS) == 6
    assert delta("kubeinfer_invocation_errors_total", err400) == 2
    assert delta("kubeinfer_invocation_errors_total", err404) == 1
    assert delta("kubeinfer_model_latency_seconds_count", LABELS) == 3
    assert delta("kubeinfer_overhead_latency_seconds_count", LABELS) == 3
    assert _metric(after, "kubeinfer_model_loaded", LABELS) == 1
    load = _sorted_labels(endpoint="iris", model="primary", phase="load", variant="primary")
    assert _metric(after, "kubeinfer_model_load_seconds_count", load) == 1


# ------------------------------------------------------------------ other models and sources


def test_thread_pool_two_workers_and_relative_uri(models_dir: Path, logs: Path) -> None:
    """mlp.onnx via file://mlp.onnx against the base dir, predict in the pool, 2 workers."""
    proc = start_runtime("model-server", _env(
        "file://mlp.onnx", KUBEINFER_MODEL_BASE_DIR=str(models_dir),
        KUBEINFER_INFERENCE_MODE="thread", KUBEINFER_WORKERS="2",
        KUBEINFER_INFERENCE_THREADS="2"), logs)
    try:
        x = np.random.default_rng(1).standard_normal((4, 256)).astype(np.float32)
        ref = ort.InferenceSession(str(models_dir / "mlp.onnx")).run(None, {"input": x})[0]
        deadline = time.monotonic() + 30
        for _ in range(4):  # new connections spread over both workers
            # Each worker loads its own copy: one may still answer 503 "loading"
            # after the other is ready, which is correct, so wait that out.
            while True:
                r = httpx.post(proc.url + "/invocations", json={"instances": x.tolist()})
                if r.status_code != 503 or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            assert r.status_code == 200, r.text
            np.testing.assert_allclose(r.json()["predictions"], ref, rtol=1e-5, atol=1e-6)
        assert "in the thread pool" in proc.log()
    finally:
        proc.stop()
    assert proc.proc.returncode == 0


def test_model_failure_is_424(tmp_path: Path, logs: Path) -> None:
    # Answers its warm-up (N == 1) and N == 3, fails inside for other N.
    model = add_3_model(tmp_path / "add3.onnx")
    proc = start_runtime("model-server", _env(f"file://{model}"), logs)
    try:
        assert httpx.post(proc.url + "/invocations", json=[1, 2, 3]).json() == {
            "predictions": [1.0, 2.0, 3.0]}
        r = httpx.post(proc.url + "/invocations", json=[1, 2, 3, 4])
        _assert_error(r, 424, "ModelError", "Model failed", "broadcast")
        # A model error does not take the model out of service.
        assert httpx.get(proc.url + "/ping").status_code == 200
    finally:
        proc.stop()


def test_model_from_s3(s3_server: S3Server, models_dir: Path, logs: Path,
                       tmp_path: Path, reference: ort.InferenceSession) -> None:
    uri = s3_server.put_file("models", "iris/v1/iris.onnx", models_dir / "iris.onnx")
    cache = tmp_path / "cache"
    proc = start_runtime("model-server", _env(uri, KUBEINFER_MODEL_CACHE_DIR=str(cache),
                                              **s3_server.env()), logs)
    try:
        r = httpx.post(proc.url + "/invocations", json={"instances": ROWS})
        assert r.status_code == 200, r.text
        assert r.json()["predictions"]["label"] == reference.run(["label"], {"X": _x()})[0].tolist()
        (cached,) = cache.glob("*/iris.onnx")
        assert cached.read_bytes() == (models_dir / "iris.onnx").read_bytes()
        assert not list(cache.glob("*/.download-*"))  # no temp file left behind
        sha = cached.with_name("iris.onnx.sha256").read_text().split()[0]
        assert httpx.get(proc.url + "/v2/models/primary").json()["versions"] == [sha[:12]]
    finally:
        proc.stop()


# ------------------------------------------------------------------ models that cannot load


def _start_failing(uri: str, logs: Path, **extra: str) -> RuntimeProcess:
    proc = start_runtime("model-server", _env(uri, **extra), logs, expect_ready=False)

    def failed() -> bool:
        return "failed to load" in httpx.get(proc.url + "/ping").text

    try:
        wait_until(failed, 30, "the model load to fail")
    except BaseException:
        proc.stop()
        raise
    return proc


def _assert_not_ready(proc: RuntimeProcess, *fragments: str) -> None:
    """Every readiness and inference route says why; liveness stays up; nothing crashed.

    SageMaker routes answer 503 in their style; V2 routes in V2's (``{"error"}``),
    the ready routes with 400, which V2 clients read as "not ready".
    """
    said = {_assert_error(r, 503, "ServiceUnavailable", 'Model "primary" failed to load from',
                          *fragments)
            for r in (httpx.get(proc.url + "/ping"),
                      httpx.post(proc.url + "/invocations", json=ROWS))}
    for status, r in ((400, httpx.get(proc.url + "/v2/health/ready")),
                      (400, httpx.get(proc.url + "/v2/models/primary/ready")),
                      (503, httpx.get(proc.url + "/v2/models/primary")),
                      (503, httpx.post(proc.url + "/v2/models/primary/infer", json={}))):
        said.add(_assert_v2_error(r, status, 'Model "primary" failed to load from', *fragments))
        assert r.headers["x-amzn-errortype"] == "ServiceUnavailable:"
    assert len(said) == 1  # one reason, everywhere
    assert httpx.get(proc.url + "/v2/health/live").status_code == 200
    assert proc.proc.poll() is None


def test_corrupt_model_keeps_the_server_up_and_not_ready(tmp_path: Path, logs: Path) -> None:
    bad = tmp_path / "corrupt.onnx"
    bad.write_bytes(b"\x08\x01garbage that is not an ONNX protobuf")
    proc = _start_failing(f"file://{bad}", logs)
    try:
        _assert_not_ready(proc, f"file://{bad}")
        assert "failed to load" in proc.log()
    finally:
        proc.stop()
    # SIGTERM is a graceful shutdown (uvicorn then re-raises it, hence -15).
    assert proc.proc.returncode in (0, -15)
    assert "Application shutdown complete" in proc.log()


def test_missing_model_file(tmp_path: Path, logs: Path) -> None:
    missing = tmp_path / "missing.onnx"
    proc = _start_failing(f"file://{missing}", logs)
    try:
        _assert_not_ready(proc, f"Model file {missing} does not exist")
    finally:
        proc.stop()


def test_missing_s3_object(s3_server: S3Server, models_dir: Path, logs: Path,
                           tmp_path: Path) -> None:
    s3_server.put_file("models", "present.onnx", models_dir / "iris.onnx")  # bucket exists
    proc = _start_failing("s3://models/absent/model.onnx", logs,
                          KUBEINFER_MODEL_CACHE_DIR=str(tmp_path), **s3_server.env())
    try:
        _assert_not_ready(proc, "Model object s3://models/absent/model.onnx does not exist")
    finally:
        proc.stop()


def test_missing_settings_fail_fast_with_the_variable_name(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBEINFER_")}
    r = subprocess.run([sys.executable, "-m", "kubeinfer_runtime", "serve", "--role",
                        "model-server"], env=env, capture_output=True, text=True, timeout=60,
                       cwd=tmp_path)
    assert r.returncode == 2
    assert "KUBEINFER_MODEL_URI" in r.stderr
