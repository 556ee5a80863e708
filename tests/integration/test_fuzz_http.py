"""Property-based fuzzing of every HTTP route of every runtime role (hypothesis).

Real processes: a model server (iris), a multi-model server, a serial pipeline (handler
and model steps), a gateway in front of them (real-time and async endpoints, with a real
Redis) and an async worker. Hypothesis draws methods, paths (the routes, with random names
and query strings), headers (random names and values, hostile SageMaker and V2 headers,
random Content-Types) and bodies (random bytes, JSON trees, CSV, .npy and .npz look-alikes,
V2 documents, binary-extension bodies). Whatever arrives: no 500, no hang (a bounded answer
time), no process exit. The example count is bounded so the suite stays fast in CI.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubeinfer_runtime.contract import (
    AsyncRoute,
    EndpointRoute,
    InferenceExecution,
    PipelineSpec,
    PipelineStep,
    RouteTable,
    VariantRoute,
)
from tests.support.procs import RuntimeProcess, start_runtime
from tests.support.redis_server import RedisServer, start_redis

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = int(os.environ.get("KUBEINFER_FUZZ_EXAMPLES", "120"))
#: An answer slower than this is a hang as far as this test is concerned.
ANSWER_TIMEOUT_S = 10.0

ROUTES: dict[str, list[tuple[str, str]]] = {
    "model-server": [
        ("POST", "/invocations"), ("GET", "/ping"), ("POST", "/v2/models/{m}/infer"),
        ("GET", "/v2/models/{m}"), ("GET", "/v2/models/{m}/ready"), ("GET", "/v2/health/live"),
        ("GET", "/v2/health/ready"), ("GET", "/v2"), ("GET", "/metrics"),
        ("POST", "/v2/models/{m}/versions/{v}/infer"), ("GET", "/{x}"),
    ],
    "multi-model": [
        ("POST", "/invocations"), ("POST", "/models/{m}/invoke"), ("GET", "/models"),
        ("POST", "/models"), ("GET", "/models/{m}"), ("DELETE", "/models/{m}"),
        ("POST", "/v2/models/{m}/infer"), ("GET", "/v2/models/{m}/ready"),
        ("POST", "/v2/repository/index"), ("POST", "/v2/repository/models/{m}/load"),
        ("POST", "/v2/repository/models/{m}/unload"), ("GET", "/v2/models/{m}"),
    ],
    "pipeline": [("POST", "/invocations"), ("GET", "/ping"), ("GET", "/v2/health/ready")],
    "gateway": [
        ("POST", "/endpoints/{e}/invocations"), ("POST", "/endpoints/{e}/async-invocations"),
        ("POST", "/endpoints/{e}/invocations-response-stream"), ("GET", "/ping"),
        ("GET", "/routes"), ("GET", "/metrics"), ("POST", "/{x}"),
    ],
    "async-worker": [("GET", "/ping"), ("GET", "/v2/health/ready"), ("GET", "/metrics"),
                     ("POST", "/invocations")],
}
KNOWN = {"m": ["main", "tenant-0/model.onnx", "tenant-1/model.onnx", "model"],
         "e": ["iris", "iris-async", "pipe", "zoo"], "v": ["1"], "x": ["docs", "openapi.json"]}
CONTENT_TYPES = ["application/json", "text/csv", "application/x-npy", "application/x-npz",
                 "application/octet-stream", "application/jsonlines", "text/plain",
                 "application/json; charset=utf-8", "", "multipart/form-data; boundary=x"]
SAGEMAKER_HEADERS = ["x-amzn-sagemaker-target-variant", "x-amzn-sagemaker-target-model",
                     "x-amzn-sagemaker-target-container-hostname",
                     "x-amzn-sagemaker-custom-attributes", "x-amzn-sagemaker-inference-id",
                     "x-amzn-sagemaker-inputlocation", "x-amzn-sagemaker-content-type",
                     "x-amzn-sagemaker-accept", "x-amzn-sagemaker-requestttlseconds",
                     "x-amzn-sagemaker-invocationtimeoutseconds",
                     "x-amzn-sagemaker-s3outputpathextension", "x-amzn-sagemaker-filename",
                     "inference-header-content-length", "accept", "authorization",
                     "x-amz-date", "content-encoding", "expect"]

_token = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=20)
_value = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF,
                                        exclude_characters="\x7f"), max_size=200)
_json = st.recursive(st.none() | st.booleans() | st.floats(allow_nan=True) | st.integers()
                     | st.text(max_size=20),
                     lambda inner: st.lists(inner, max_size=6)
                     | st.dictionaries(st.text(max_size=10), inner, max_size=6), max_leaves=30)


def _npy(shape: tuple[int, ...], dtype: str) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.zeros(shape, dtype=dtype), allow_pickle=False)
    return buf.getvalue()


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["bytes", "json", "csv", "npy", "npz", "v2", "v2bin"]))
    if kind == "bytes":
        return draw(st.binary(max_size=2048))
    if kind == "json":
        return json.dumps(draw(_json), allow_nan=True).encode()
    if kind == "csv":
        rows = draw(st.lists(st.lists(st.one_of(st.floats(allow_nan=True).map(str),
                                                 st.text(max_size=5)), max_size=6),
                             max_size=8))
        return "\n".join(",".join(r) for r in rows).encode()
    if kind == "npy":
        data = _npy(tuple(draw(st.lists(st.integers(0, 5), max_size=3))),
                    draw(st.sampled_from(["f4", "f8", "i8", "u1", "?"])))
        cut = draw(st.integers(0, len(data)))
        return data[:cut] + draw(st.binary(max_size=64))
    if kind == "npz":
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            # No NUL: zipfile cuts a member name at it, and a name that starts with one
            # makes zipfile itself raise while the test builds the body.
            names = st.text(st.characters(blacklist_categories=("Cs",),
                                          blacklist_characters="\x00"), min_size=1,
                            max_size=8)
            for name in draw(st.lists(names, max_size=3, unique=True)):
                z.writestr(name + ".npy", _npy((1, 4), "f4")[: draw(st.integers(0, 200))])
        return buf.getvalue()
    doc: dict[str, Any] = {"inputs": [{
        "name": draw(st.sampled_from(["X", "x", "float_input", draw(st.text(max_size=5))])),
        "shape": draw(st.lists(st.integers(-2, 10**13), max_size=4)),
        "datatype": draw(st.sampled_from(["FP32", "INT64", "BYTES", "BOOL", "FP16", "??"])),
        "data": draw(_json)}]}
    if draw(st.booleans()):
        doc["outputs"] = [{"name": draw(st.text(max_size=6)),
                           "parameters": {"binary_data": draw(st.booleans())}}]
    head = json.dumps(doc, allow_nan=True).encode()
    if kind == "v2":
        return head
    return head + draw(st.binary(max_size=128))


@st.composite
def requests(draw: st.DrawFn, role: str) -> tuple[str, str, dict[str, str], bytes]:
    method, template = draw(st.sampled_from(ROUTES[role]))
    if draw(st.integers(0, 9)) == 0:
        method = draw(st.sampled_from(["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]))
    path = template
    for key, known in KNOWN.items():
        if "{" + key + "}" in path:
            name = draw(st.one_of(st.sampled_from(known), _token,
                                  st.sampled_from(["..", "../etc/passwd", "%2e%2e", "a/../../b",
                                                   "x" * 300, "tenant-0%2Fmodel.onnx"])))
            path = path.replace("{" + key + "}", name)
    if draw(st.integers(0, 4)) == 0:
        path += "?" + draw(st.text(alphabet="abc=&%20x/", max_size=20))
    headers = {"content-type": draw(st.sampled_from(CONTENT_TYPES) | _value)}
    for name in draw(st.lists(st.sampled_from(SAGEMAKER_HEADERS) | _token, max_size=5)):
        headers[name] = draw(_value)
    if role == "multi-model" and draw(st.booleans()):
        headers["x-amzn-sagemaker-target-model"] = draw(st.sampled_from(KNOWN["m"]))
    return method, path, headers, draw(bodies())


@pytest.fixture(scope="module")
def servers(models_dir: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[dict[str, RuntimeProcess]]:
    from examples.build_multimodel_models import build as build_tenants

    tmp = tmp_path_factory.mktemp("fuzz")
    redis: RedisServer = start_redis(tmp / "redis")
    build_tenants(tmp / "zoo", 2)
    out: dict[str, RuntimeProcess] = {}
    logs = tmp / "logs"
    try:
        iris = f"file://{models_dir / 'iris.onnx'}"
        out["model-server"] = start_runtime("model-server", {
            "KUBEINFER_MODEL_URI": iris, "KUBEINFER_MODEL_NAME": "main"}, logs, timeout=60)
        out["multi-model"] = start_runtime("model-server", {
            "KUBEINFER_MULTI_MODEL_PREFIX": f"file://{tmp / 'zoo'}/",
            "KUBEINFER_MODEL_CACHE_DIR": str(tmp / "cache")}, logs, timeout=60)
        pipeline = PipelineSpec(execution=InferenceExecution.SERIAL, steps=[
            PipelineStep(name="pre", handler="iris_steps:preprocess",
                         code_dir=str(REPO / "examples" / "handlers")),
            PipelineStep(name="iris", model_uri=iris),
            PipelineStep(name="post", handler="iris_steps:postprocess",
                         code_dir=str(REPO / "examples" / "handlers"))])
        out["pipeline"] = start_runtime("model-server", {
            "KUBEINFER_PIPELINE": pipeline.model_dump_json()}, logs, timeout=60)
        async_route = AsyncRoute(queue="fuzz", output_path=f"file://{tmp}/out",
                                 failure_path=f"file://{tmp}/failed")
        routes = tmp / "routes.json"
        RouteTable(endpoints={
            "iris": EndpointRoute(name="iris", variants=[VariantRoute(
                name="main", weight=1, upstreams=[out["model-server"].url])]),
            "zoo": EndpointRoute(name="zoo", variants=[VariantRoute(
                name="all", weight=1, upstreams=[out["multi-model"].url])]),
            "pipe": EndpointRoute(name="pipe", variants=[VariantRoute(
                name="main", weight=1, upstreams=[out["pipeline"].url])]),
            "iris-async": EndpointRoute(name="iris-async", type="Async", variants=[
                VariantRoute(name="main", weight=1)], async_config=async_route),
        }).write_atomic(routes)
        out["gateway"] = start_runtime("gateway", {
            "KUBEINFER_ROUTE_TABLE_PATH": str(routes), "KUBEINFER_REDIS_URL": redis.url}, logs)
        out["async-worker"] = start_runtime("async-worker", {
            "KUBEINFER_MODEL_URI": iris, "KUBEINFER_REDIS_URL": redis.url,
            "KUBEINFER_QUEUE": "fuzz", "KUBEINFER_OUTPUT_PATH": async_route.output_path,
            "KUBEINFER_FAILURE_PATH": async_route.failure_path}, logs, timeout=60)
        yield out
    finally:
        for proc in out.values():
            proc.stop()
        redis.stop()


def _check(proc: RuntimeProcess, request: tuple[str, str, dict[str, str], bytes],
           client: httpx.Client) -> None:
    method, path, text_headers, body = request
    headers = {k: v.encode("latin-1") for k, v in text_headers.items()}  # any octet
    try:
        r = client.request(method, proc.url + path, headers=headers,
                           content=body if method not in ("GET", "HEAD") else None)
    except httpx.TimeoutException:
        pytest.fail(f"{method} {path} hung (no answer in {ANSWER_TIMEOUT_S}s)")
    except httpx.TransportError as exc:
        # The server may refuse and close (431, 413); it must not die.
        assert proc.proc.poll() is None, f"{method} {path} killed the server: {exc!r}"
        return
    assert r.status_code < 500 or r.status_code in (503, 507), (
        f"{method} {path} {text_headers} -> {r.status_code} {r.text[:300]}")
    assert proc.proc.poll() is None


@pytest.mark.parametrize("role", list(ROUTES))
def test_no_request_makes_a_500_a_hang_or_an_exit(servers: dict[str, RuntimeProcess],
                                                  role: str) -> None:
    proc = servers[role]
    with httpx.Client(timeout=ANSWER_TIMEOUT_S) as client:

        @settings(max_examples=EXAMPLES, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow,
                                         HealthCheck.function_scoped_fixture])
        @given(request=requests(role))
        def fuzz(request: tuple[str, str, dict[str, str], bytes]) -> None:
            _check(proc, request, client)

        fuzz()
    assert httpx.get(proc.url + ("/ping"), timeout=10).status_code in (200, 503)
