"""Multi-model endpoints for real: 200 ONNX models in SeaweedFS S3, a cache sized for 20.

The model server runs as a process, reads models from a real S3 server and
serves a Zipf-distributed request stream from concurrent clients. Every answer
is checked against the model it names (model ``i`` answers ``sum(x) + i``), and
the server's own metrics prove the cache rules: resident bytes never above the
budget, one load per cold model however many requests wait for it, failures
not cached. Then traversal attempts, the model-management APIs, and boto3's
TargetModel through a gateway with two replicas (model affinity).
"""

from __future__ import annotations

import io
import re
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3
import httpx
import numpy as np
import pytest
from botocore.config import Config
from examples.build_multimodel_models import numbered_model_bytes

from kubeinfer_runtime.contract import EndpointRoute, RouteTable, VariantRoute
from tests.support.ports import wait_until
from tests.support.procs import RuntimeProcess, start_runtime
from tests.support.s3 import S3Server

N_MODELS = 200
CACHED = 20
PAD = 4096
BUCKET = "mme"
X = [[1.0, 2.0, 3.0, 4.0]]  # sum 10: model i answers 10 + i


def _name(i: int) -> str:
    return f"tenant-{i}/model.onnx"


@pytest.fixture(scope="module")
def bucket(s3_server: S3Server) -> dict[str, int]:
    """200 numbered models under models/, plus decoys; returns each name's size."""
    client = s3_server.minio()
    if not client.bucket_exists(BUCKET):
        client.make_bucket(BUCKET)
    objects = {f"models/{_name(i)}": numbered_model_bytes(i, PAD) for i in range(N_MODELS)}
    objects["secret/model.onnx"] = numbered_model_bytes(666, PAD)  # outside the prefix
    objects["models/big/model.onnx"] = numbered_model_bytes(1, PAD * 40)  # over the budget
    objects["models/broken/model.onnx"] = b"this is not an onnx model"

    def put(item: tuple[str, bytes]) -> None:
        key, data = item
        client.put_object(BUCKET, key, io.BytesIO(data), len(data))

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, objects.items()))
    return {k.removeprefix("models/"): len(v) for k, v in objects.items()}


def _budget(bucket: dict[str, int]) -> int:
    return CACHED * max(bucket[_name(i)] for i in range(N_MODELS))


def _start_mme(s3_server: S3Server, bucket: dict[str, int], tmp: Path,
               admin: bool = True) -> RuntimeProcess:
    return start_runtime("model-server", {
        "KUBEINFER_ADMIN_API": "true" if admin else "false",
        **s3_server.env(),
        "KUBEINFER_MULTI_MODEL_PREFIX": f"s3://{BUCKET}/models/",
        "KUBEINFER_CACHE_BYTES": str(_budget(bucket)),
        "KUBEINFER_DISK_CACHE_BYTES": str(3 * _budget(bucket)),
        "KUBEINFER_MODEL_CACHE_DIR": str(tmp / "cache"),
        "KUBEINFER_ENDPOINT_NAME": "zoo", "KUBEINFER_VARIANT_NAME": "all",
        "KUBEINFER_INFERENCE_THREADS": "2",
    }, tmp / "logs")


@pytest.fixture(scope="module")
def mme(s3_server: S3Server, bucket: dict[str, int],
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[RuntimeProcess]:
    proc = _start_mme(s3_server, bucket, tmp_path_factory.mktemp("mme"))
    yield proc
    proc.stop()


def invoke(client: httpx.Client, url: str, name: str) -> httpx.Response:
    return client.post(url + "/invocations", json=X,
                       headers={"X-Amzn-SageMaker-Target-Model": name})


def stats(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    out = {}
    for m in re.finditer(r'^kubeinfer_multimodel_(\w+)\{endpoint="zoo",variant="all"\} (\S+)$',
                         text, re.M):
        out[m.group(1)] = float(m.group(2))
    return out


def test_zipf_stream_from_concurrent_clients(mme: RuntimeProcess, bucket: dict[str, int],
                                             tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    ranks = np.arange(1, N_MODELS + 1, dtype=np.float64)
    p = ranks ** -1.1
    stream = rng.choice(N_MODELS, size=480, p=p / p.sum()).tolist()
    peak = {"resident": 0.0}
    done = threading.Event()

    def sample() -> None:  # the server's own accounting, watched while traffic runs
        while not done.is_set():
            peak["resident"] = max(peak["resident"], stats(mme.url)["resident_bytes"])
            done.wait(0.05)

    def client_run(chunk: list[int]) -> list[tuple[int, int, Any]]:
        with httpx.Client(timeout=30) as client:
            out = []
            for i in chunk:
                r = invoke(client, mme.url, _name(i))
                out.append((i, r.status_code, r.json()))
            return out

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            results = [x for part in pool.map(client_run, [stream[k::8] for k in range(8)])
                       for x in part]
    finally:
        done.set()
        sampler.join()
    wrong = [(i, s, b) for i, s, b in results if s != 200 or b["predictions"] != [[10.0 + i]]]
    assert wrong == []
    after = stats(mme.url)
    budget = _budget(bucket)
    assert after["budget_bytes"] == budget
    assert 0 < peak["resident"] <= budget and after["resident_bytes"] <= budget
    assert after["loaded_models"] <= CACHED
    distinct = len(set(stream))
    assert distinct > CACHED  # the stream really needs evictions
    assert after["evictions_total"] >= distinct - CACHED
    assert after["loads_total"] >= distinct
    assert after["cache_hits_total"] + after["cache_misses_total"] == len(stream)
    assert after["cache_hits_total"] > len(stream) / 3  # Zipf: the head stays warm
    assert after["load_failures_total"] == 0


def test_concurrent_requests_for_a_cold_model_load_it_once(mme: RuntimeProcess) -> None:
    loaded = {m["modelName"] for m in httpx.get(mme.url + "/models").json()["models"]}
    cold = next(_name(i) for i in range(N_MODELS - 1, 0, -1) if _name(i) not in loaded)
    index = int(cold.split("-")[1].split("/")[0])
    before = stats(mme.url)
    barrier = threading.Barrier(16)

    def one(_: int) -> httpx.Response:
        with httpx.Client(timeout=30) as client:
            barrier.wait()
            return invoke(client, mme.url, cold)

    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(one, range(16)))
    assert [r.json()["predictions"] for r in responses] == [[[10.0 + index]]] * 16
    after = stats(mme.url)
    assert after["loads_total"] - before["loads_total"] == 1
    assert after["cache_misses_total"] - before["cache_misses_total"] >= 2  # really concurrent


@pytest.mark.parametrize("target", [
    "../secret/model.onnx", "tenant-1/../../secret/model.onnx", "/secret/model.onnx",
    "%2e%2e/secret/model.onnx", "..%2Fsecret/model.onnx", "s3://mme/secret/model.onnx",
    "file:///etc/passwd", "tenant-1/./model.onnx", "tenant-1//model.onnx", "..\\secret",
])
def test_traversal_attempts_are_refused_before_any_read(mme: RuntimeProcess,
                                                        target: str) -> None:
    before = stats(mme.url)
    r = httpx.post(mme.url + "/invocations", json=X,
                   headers={"X-Amzn-SageMaker-Target-Model": target})
    assert r.status_code == 400, r.text
    assert r.headers["x-amzn-errortype"] == "ValidationError:"
    assert "Target model" in r.json()["Message"]
    after = stats(mme.url)
    assert (after["cache_misses_total"], after["loads_total"]) == (
        before["cache_misses_total"], before["loads_total"])


def test_missing_unknown_too_big_and_broken_models(mme: RuntimeProcess) -> None:
    r = httpx.post(mme.url + "/invocations", json=X)
    assert r.status_code == 400 and "X-Amzn-SageMaker-Target-Model is missing" in r.text
    r = httpx.post(mme.url + "/invocations", json=X,
                   headers={"X-Amzn-SageMaker-Target-Model": "tenant-9999/model.onnx"})
    assert r.status_code == 404 and r.headers["x-amzn-errortype"] == "ValidationError:"
    assert 'Model "tenant-9999/model.onnx" not found at s3://mme/models/tenant-9999/model.onnx' \
        in r.json()["Message"]
    r = httpx.post(mme.url + "/invocations", json=X,
                   headers={"X-Amzn-SageMaker-Target-Model": "big/model.onnx"})
    assert r.status_code == 507 and r.headers["x-amzn-errortype"] == "InsufficientStorage:"
    assert "raise multiModel.cacheBytes" in r.json()["Message"]
    before = stats(mme.url)
    for _ in range(2):  # a failure is not cached: each request tries again
        r = httpx.post(mme.url + "/invocations", json=X,
                       headers={"X-Amzn-SageMaker-Target-Model": "broken/model.onnx"})
        assert r.status_code == 424 and "cannot be loaded" in r.json()["Message"]
    after = stats(mme.url)
    assert after["load_failures_total"] - before["load_failures_total"] == 2
    assert after["resident_bytes"] <= after["budget_bytes"]


def test_sagemaker_and_v2_model_management(mme: RuntimeProcess) -> None:
    url = mme.url
    name = _name(3)
    httpx.delete(f"{url}/models/{name}")  # may or may not be loaded after the stream
    assert httpx.get(f"{url}/models/{name}").status_code == 404
    r = httpx.post(url + "/models", json={"model_name": name})
    assert r.status_code == 200, r.text
    assert httpx.post(url + "/models", json={"model_name": name}).status_code == 409
    assert httpx.get(f"{url}/models/{name}").json() == {
        "modelName": name, "modelUrl": f"s3://{BUCKET}/models/{name}"}
    assert name in {m["modelName"] for m in httpx.get(url + "/models").json()["models"]}
    r = httpx.post(f"{url}/models/{name}/invoke", json=X)
    assert r.json()["predictions"] == [[13.0]]
    assert httpx.delete(f"{url}/models/{name}").status_code == 200
    assert httpx.get(f"{url}/models/{name}").status_code == 404
    assert httpx.post(url + "/models", json={"model_name": "../secret/model.onnx"}
                      ).status_code == 400
    assert httpx.post(url + "/models", content=b"nope").status_code == 400
    # V2: repository load/unload, metadata and infer by model name.
    v2 = _name(4)
    r = httpx.post(f"{url}/v2/repository/models/{v2}/load")
    assert r.json() == {"name": v2, "state": "READY"}
    assert {"name": v2, "state": "READY"} in httpx.post(url + "/v2/repository/index").json()
    meta = httpx.get(f"{url}/v2/models/{v2}").json()
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    r = httpx.post(f"{url}/v2/models/{v2}/infer", json={"inputs": [
        {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]})
    assert r.json()["outputs"][0]["data"] == [14.0]
    assert httpx.post(f"{url}/v2/repository/models/{v2}/unload").status_code == 200
    r = httpx.get(f"{url}/v2/models/{v2}/ready")  # 400: what V2 clients read as not ready
    assert r.status_code == 400 and r.json()["ready"] is False and "not loaded" in r.json()["error"]


def test_boto3_target_model_sticks_to_one_replica(s3_server: S3Server, bucket: dict[str, int],
                                                  mme: RuntimeProcess, tmp_path: Path) -> None:
    # Two replicas: the module's server (its cache warm from the tests above)
    # and a fresh one; the test uses models neither holds yet.
    replicas = [mme, _start_mme(s3_server, bucket, tmp_path / "r1")]
    loaded = {m["modelName"] for m in httpx.get(mme.url + "/models").json()["models"]}
    routes = tmp_path / "routes.json"
    RouteTable(revision=1, endpoints={"zoo": EndpointRoute(name="zoo", variants=[
        VariantRoute(name="all", weight=1, upstreams=[r.url for r in replicas])])}
               ).write_atomic(routes)
    gateway = start_runtime("gateway", {"KUBEINFER_ROUTE_TABLE_PATH": str(routes),
                                        "KUBEINFER_HEALTH_INTERVAL_S": "0.2"}, tmp_path / "gw")
    try:
        wait_until(lambda: httpx.get(gateway.url + "/routes").json()["table"] is not None, 10,
                   "the gateway to load its routes")
        rt = boto3.client("sagemaker-runtime", endpoint_url=gateway.url,
                          region_name="us-east-1", aws_access_key_id="x",
                          aws_secret_access_key="x",
                          config=Config(retries={"total_max_attempts": 1, "mode": "standard"}))
        models = [i for i in range(N_MODELS) if _name(i) not in loaded][:12]
        for _ in range(3):
            for i in models:
                r = rt.invoke_endpoint(EndpointName="zoo", TargetModel=_name(i),
                                       ContentType="application/json", Body="[[1, 2, 3, 4]]")
                assert r["Body"].read() == b'{"predictions":[[%d.0]]}' % (10 + i)
        wanted = {_name(i) for i in models}
        held = [{m["modelName"] for m in httpx.get(r.url + "/models").json()["models"]} & wanted
                for r in replicas]
        # Each model was loaded by exactly one replica (3 calls each, never moved),
        # and both replicas took a share.
        assert held[0].isdisjoint(held[1])
        assert held[0] | held[1] == wanted
        assert held[0] and held[1]
        with pytest.raises(rt.exceptions.ValidationError) as info:
            rt.invoke_endpoint(EndpointName="zoo", TargetModel="../secret/model.onnx",
                               ContentType="application/json", Body="[[1, 2, 3, 4]]")
        assert "Target model" in str(info.value)
    finally:
        gateway.stop()
        replicas[1].stop()


def test_model_management_is_off_by_default(s3_server: S3Server, bucket: dict[str, int],
                                            tmp_path: Path) -> None:
    """Without KUBEINFER_ADMIN_API any pod reaching a model server could load and evict
    models: those routes answer 403; inference still loads models on first use."""
    server = _start_mme(s3_server, bucket, tmp_path, admin=False)
    try:
        url, name = server.url, _name(5)
        assert httpx.post(url + "/invocations", json=X, headers={
            "X-Amzn-SageMaker-Target-Model": name}).status_code == 200
        refused = [
            httpx.post(url + "/models", json={"model_name": _name(6)}),
            httpx.delete(f"{url}/models/{name}"),
            httpx.post(f"{url}/v2/repository/models/{_name(6)}/load"),
            httpx.post(f"{url}/v2/repository/models/{name}/unload"),
        ]
        for r in refused:
            assert r.status_code == 403, r.text
            assert r.headers["x-amzn-errortype"] == "AccessDeniedException:"
            # SageMaker routes answer {"Message"}; V2 routes V2's {"error"}.
            v2 = r.request.url.path.startswith("/v2/")
            assert "KUBEINFER_ADMIN_API=true" in r.json()["error" if v2 else "Message"]
        loaded = {m["modelName"] for m in httpx.get(url + "/models").json()["models"]}
        assert loaded == {name}  # still loaded: nothing was unloaded
    finally:
        server.stop()
