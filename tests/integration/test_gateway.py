"""The gateway role end to end: real gateway and model-server processes, boto3 client.

Two real model servers (iris.onnx as "primary", iris-v2.onnx as "canary") sit
behind one real gateway process whose route table is a file in a temp dir, as
in local mode. Header forwarding, timeouts, killed upstreams and SIGTERM are
checked against ``tests.support.fake_upstream`` (a tiny uvicorn app that
echoes what reached it), since the model server does not echo headers.
"""

from __future__ import annotations

import itertools
import json
import signal
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from kubeinfer_runtime.contract import EndpointRoute, RouteTable, VariantRoute
from tests.support.fake_upstream import in_flight, start_fake_upstream
from tests.support.ports import wait_until
from tests.support.procs import RuntimeProcess, start_runtime

IRIS_ROW = [5.0, 3.4, 1.5, 0.2]
_revisions = itertools.count(1)


class Gateway:
    """A gateway process plus its route-table file."""

    def __init__(self, proc: RuntimeProcess, routes: Path) -> None:
        self.proc = proc
        self.routes = routes

    @property
    def url(self) -> str:
        return self.proc.url

    def publish(self, endpoints: dict[str, list[tuple[str, float, list[str]]]]) -> int:
        """Write a new route table atomically and wait until the gateway serves it."""
        revision = next(_revisions)
        table = RouteTable(revision=revision, endpoints={
            name: EndpointRoute(name=name, variants=[
                VariantRoute(name=v, weight=w, upstreams=u) for v, w, u in variants])
            for name, variants in endpoints.items()})
        table.write_atomic(self.routes)
        self.wait_revision(revision)
        return revision

    def state(self) -> dict[str, Any]:
        data: dict[str, Any] = httpx.get(self.url + "/routes", timeout=5).json()
        return data

    def wait_revision(self, revision: int) -> None:
        def served() -> bool:
            table = self.state()["table"]
            return table is not None and table["revision"] == revision
        wait_until(served, 10, f"route table revision {revision}")

    def client(self) -> Any:
        return boto3.client(
            "sagemaker-runtime", endpoint_url=self.url, region_name="us-east-1",
            aws_access_key_id="test", aws_secret_access_key="test",
            # No retries: each test must see the gateway's first answer.
            config=Config(retries={"total_max_attempts": 1, "mode": "standard"},
                          read_timeout=30),
        )


def start_gateway(tmp_path: Path, **settings: str) -> Gateway:
    routes = tmp_path / "state" / "routes.json"
    env = {
        "KUBEINFER_ROUTE_TABLE_PATH": str(routes),
        "KUBEINFER_ROUTE_RELOAD_INTERVAL_S": "0.1",
        "KUBEINFER_HEALTH_INTERVAL_S": "0.2",
        **settings,
    }
    return Gateway(start_runtime("gateway", env, tmp_path / "logs"), routes)


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gateway")


@pytest.fixture(scope="module")
def model_servers(models_dir: Path, module_tmp: Path) -> Iterator[dict[str, RuntimeProcess]]:
    started: dict[str, RuntimeProcess] = {}
    try:
        for variant, model in (("primary", "iris.onnx"), ("canary", "iris-v2.onnx")):
            started[variant] = start_runtime("model-server", {
                "KUBEINFER_MODEL_URI": f"file://{models_dir / model}",
                "KUBEINFER_ENDPOINT_NAME": "iris",
                "KUBEINFER_VARIANT_NAME": variant,
                "KUBEINFER_MODEL_CACHE_DIR": str(module_tmp / "cache"),
            }, module_tmp / "logs", timeout=60)
        yield started
    finally:
        for proc in started.values():
            proc.stop()


@pytest.fixture(scope="module")
def echo(module_tmp: Path) -> Iterator[RuntimeProcess]:
    proc = start_fake_upstream("echo", module_tmp / "logs")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def gateway(module_tmp: Path) -> Iterator[Gateway]:
    gw = start_gateway(module_tmp)
    yield gw
    gw.proc.stop()


@pytest.fixture
def iris(gateway: Gateway, model_servers: dict[str, RuntimeProcess]) -> Gateway:
    """The gateway routing endpoint "iris" 50/50 over the two real model servers."""
    gateway.publish({"iris": [("primary", 0.5, [model_servers["primary"].url]),
                              ("canary", 0.5, [model_servers["canary"].url])]})
    return gateway


def direct(server: RuntimeProcess, body: bytes, content_type: str) -> bytes:
    response = httpx.post(server.url + "/invocations", content=body,
                          headers={"content-type": content_type}, timeout=10)
    assert response.status_code == 200, response.text
    return response.content


def error_of(exc: pytest.ExceptionInfo[ClientError]) -> tuple[str, int, str]:
    err = exc.value.response
    return (err["Error"]["Code"], err["ResponseMetadata"]["HTTPStatusCode"],
            err["Error"]["Message"])


# ------------------------------------------------------------------ happy paths


def test_boto3_invoke_json_and_csv_match_the_model_server(
        iris: Gateway, model_servers: dict[str, RuntimeProcess]) -> None:
    client = iris.client()
    for body, content_type in ((json.dumps([IRIS_ROW]).encode(), "application/json"),
                               (b"5.0,3.4,1.5,0.2\n6.6,3.0,5.6,2.0\n", "text/csv")):
        for variant in ("primary", "canary"):
            out = client.invoke_endpoint(EndpointName="iris", Body=body, ContentType=content_type,
                                         Accept="application/json", TargetVariant=variant)
            assert out["InvokedProductionVariant"] == variant
            assert out["ContentType"] == "application/json"
            assert out["Body"].read() == direct(model_servers[variant], body, content_type)


def test_the_two_variants_really_differ(model_servers: dict[str, RuntimeProcess]) -> None:
    # Guards the pinning test above: it could not tell the variants apart otherwise.
    body = json.dumps([IRIS_ROW]).encode()
    assert direct(model_servers["primary"], body, "application/json") != direct(
        model_servers["canary"], body, "application/json")


def test_weights_split_traffic(gateway: Gateway, model_servers: dict[str, RuntimeProcess]) -> None:
    gateway.publish({"iris": [("primary", 3.0, [model_servers["primary"].url]),
                              ("canary", 1.0, [model_servers["canary"].url])]})
    client = gateway.client()
    body = json.dumps([IRIS_ROW]).encode()
    counts = Counter(
        client.invoke_endpoint(EndpointName="iris", Body=body,
                               ContentType="application/json")["InvokedProductionVariant"]
        for _ in range(400))
    # Binomial(400, 0.25): sd 8.7, so +-40 is more than 4.5 sd.
    assert set(counts) == {"primary", "canary"}
    assert 60 <= counts["canary"] <= 140, counts


def test_custom_attributes_and_inference_id_are_forwarded(gateway: Gateway,
                                                          echo: RuntimeProcess) -> None:
    gateway.publish({"echo": [("only", 1.0, [echo.url])]})
    out = gateway.client().invoke_endpoint(
        EndpointName="echo", Body=b"a,b\n", ContentType="text/csv", Accept="text/csv",
        CustomAttributes="trace=abc", InferenceId="req-42", TargetVariant="only")
    seen = json.loads(out["Body"].read())
    headers = seen["headers"]
    assert (seen["method"], seen["path"], seen["body_len"]) == ("POST", "/invocations", 4)
    assert headers["content-type"] == "text/csv"
    assert headers["accept"] == "text/csv"
    assert headers["x-amzn-sagemaker-custom-attributes"] == "trace=abc"
    assert headers["x-amzn-sagemaker-inference-id"] == "req-42"
    # Signing and routing headers stay at the gateway.
    assert "authorization" not in headers and "x-amz-date" not in headers
    assert "x-amzn-sagemaker-target-variant" not in headers
    assert out["CustomAttributes"] == "echo:trace=abc"
    assert out["InvokedProductionVariant"] == "only"


def test_route_table_rewrite_changes_weights_without_restarts(
        gateway: Gateway, model_servers: dict[str, RuntimeProcess]) -> None:
    pids = {gateway.proc.proc.pid, *(p.proc.pid for p in model_servers.values())}
    client = gateway.client()
    body = json.dumps([IRIS_ROW]).encode()

    def variants(n: int) -> set[str]:
        return {client.invoke_endpoint(EndpointName="iris", Body=body,
                                       ContentType="application/json")["InvokedProductionVariant"]
                for _ in range(n)}

    gateway.publish({"iris": [("primary", 1.0, [model_servers["primary"].url]),
                              ("canary", 0.0, [model_servers["canary"].url])]})
    assert variants(30) == {"primary"}
    gateway.publish({"iris": [("primary", 0.0, [model_servers["primary"].url]),
                              ("canary", 1.0, [model_servers["canary"].url])]})
    assert variants(30) == {"canary"}
    # The zero-weight variant still answers when targeted.
    out = client.invoke_endpoint(EndpointName="iris", Body=body, ContentType="application/json",
                                 TargetVariant="primary")
    assert out["InvokedProductionVariant"] == "primary"
    assert all(p.proc.poll() is None for p in model_servers.values())
    assert gateway.proc.proc.poll() is None
    assert pids == {gateway.proc.proc.pid, *(p.proc.pid for p in model_servers.values())}


def test_reload_never_drops_a_request_in_flight(gateway: Gateway, echo: RuntimeProcess,
                                               tmp_path: Path) -> None:
    other = start_fake_upstream("other", tmp_path)
    try:
        gateway.publish({"echo": [("only", 1.0, [echo.url])]})
        result: dict[str, httpx.Response] = {}

        def call() -> None:
            # Held 3 s: still in flight once the new table is served, on a loaded machine too.
            result["r"] = httpx.post(gateway.url + "/endpoints/echo/invocations", content=b"{}",
                                     headers={"x-amzn-sagemaker-custom-attributes": "sleep=3"},
                                     timeout=20)

        thread = threading.Thread(target=call)
        thread.start()
        wait_until(lambda: in_flight(echo) == 1, 10, "the request waiting in the upstream")
        # The new table no longer has the upstream the request is waiting on.
        gateway.publish({"echo": [("only", 1.0, [other.url])]})
        thread.join(15)
        assert result["r"].status_code == 200
        assert result["r"].json()["name"] == "echo"
        out = gateway.client().invoke_endpoint(EndpointName="echo", Body=b"{}")
        assert json.loads(out["Body"].read())["name"] == "other"
    finally:
        other.stop()


def test_invalid_route_table_keeps_serving_the_old_one(iris: Gateway) -> None:
    revision = iris.state()["table"]["revision"]
    iris.routes.write_text('{"endpoints": {"iris": {"name": "iris", "variants": "oops"}}}')
    wait_until(lambda: "is invalid, keeping revision" in iris.proc.log(), 10,
               "the gateway to report the invalid route table")
    assert iris.state()["table"]["revision"] == revision
    out = iris.client().invoke_endpoint(EndpointName="iris", Body=json.dumps([IRIS_ROW]),
                                        ContentType="application/json")
    assert out["InvokedProductionVariant"] in {"primary", "canary"}
    metrics = httpx.get(iris.url + "/metrics").text
    assert "kubeinfer_gateway_route_table_rejected_total 1.0" in metrics


def test_metrics_count_invocations_and_errors(iris: Gateway) -> None:
    client = iris.client()
    client.invoke_endpoint(EndpointName="iris", Body=json.dumps([IRIS_ROW]),
                           ContentType="application/json", TargetVariant="canary")
    with pytest.raises(ClientError):
        client.invoke_endpoint(EndpointName="iris", Body=b"[[1, 2]]",
                               ContentType="application/json", TargetVariant="canary")
    metrics = httpx.get(iris.url + "/metrics").text
    assert 'kubeinfer_gateway_invocations_total{endpoint="iris",variant="canary"}' in metrics
    assert ('kubeinfer_gateway_errors_total{code="ValidationError",endpoint="iris",'
            'variant="canary"}') in metrics
    assert 'kubeinfer_gateway_overhead_seconds_count{endpoint="iris",variant="canary"}' in metrics


# ------------------------------------------------------------------ errors


def test_unknown_endpoint_is_a_validation_error(iris: Gateway) -> None:
    with pytest.raises(ClientError) as exc:
        iris.client().invoke_endpoint(EndpointName="nope", Body=b"{}",
                                      ContentType="application/json")
    code, status, message = error_of(exc)
    assert (code, status) == ("ValidationError", 404)
    assert '"nope"' in message


def test_response_stream_api_is_refused_clearly(iris: Gateway) -> None:
    with pytest.raises(ClientError) as exc:
        iris.client().invoke_endpoint_with_response_stream(
            EndpointName="iris", Body=b"{}", ContentType="application/json")
    code, status, message = error_of(exc)
    assert (code, status) == ("ValidationError", 400)
    assert "InvokeEndpointWithResponseStream" in message and "InvokeEndpoint" in message


def test_unknown_variant_is_a_validation_error_listing_variants(iris: Gateway) -> None:
    with pytest.raises(ClientError) as exc:
        iris.client().invoke_endpoint(EndpointName="iris", Body=b"{}",
                                      ContentType="application/json", TargetVariant="blue")
    code, status, message = error_of(exc)
    assert (code, status) == ("ValidationError", 404)
    assert '"blue"' in message and "primary, canary" in message


def test_payload_over_6_mb_is_413(iris: Gateway) -> None:
    with pytest.raises(ClientError) as exc:
        iris.client().invoke_endpoint(EndpointName="iris", Body=b"1," * (3 * 1024 * 1024 + 1),
                                      ContentType="text/csv")
    code, status, message = error_of(exc)
    assert (code, status) == ("ValidationError", 413)
    assert "6291456 bytes" in message


def test_model_server_errors_pass_through(iris: Gateway) -> None:
    with pytest.raises(ClientError) as exc:
        iris.client().invoke_endpoint(EndpointName="iris", Body=b"[[1, 2]]",
                                      ContentType="application/json", TargetVariant="primary")
    code, status, message = error_of(exc)
    assert (code, status) == ("ValidationError", 400)
    assert "expects shape" in message
    assert exc.value.response["ResponseMetadata"]["HTTPHeaders"][
        "x-amzn-invoked-production-variant"] == "primary"


def test_model_error_passes_through_as_424(gateway: Gateway, echo: RuntimeProcess) -> None:
    gateway.publish({"echo": [("only", 1.0, [echo.url])]})
    with pytest.raises(ClientError) as exc:
        gateway.client().invoke_endpoint(EndpointName="echo", Body=b"{}",
                                         CustomAttributes="status=424")
    code, status, message = error_of(exc)
    assert (code, status, message) == ("ModelError", 424, "Fake model failed on purpose")
    assert exc.value.response["Error"]["Code"] == "ModelError"
    assert type(exc.value).__name__ == "ModelError"


def test_killed_upstream_is_taken_out_and_comes_back(gateway: Gateway, tmp_path: Path) -> None:
    a1 = start_fake_upstream("a1", tmp_path)
    a2 = start_fake_upstream("a2", tmp_path)
    b1 = start_fake_upstream("b1", tmp_path)
    try:
        gateway.publish({"pair": [("a", 1.0, [a1.url, a2.url]), ("b", 1.0, [b1.url])]})
        client = gateway.client()

        def invoke(**kw: str) -> dict[str, Any]:
            out: dict[str, Any] = client.invoke_endpoint(EndpointName="pair", Body=b"{}", **kw)
            out["Seen"] = json.loads(out["Body"].read())["name"]
            return out

        assert {invoke(TargetVariant="a")["Seen"] for _ in range(4)} == {"a1", "a2"}

        # One of two upstreams dies: its share moves to the other, nobody sees an error.
        a1.proc.send_signal(signal.SIGKILL)
        a1.proc.wait()
        assert {invoke(TargetVariant="a")["Seen"] for _ in range(6)} == {"a2"}
        wait_until(lambda: a1.url in gateway.state()["down"], 5, "a1 marked down")

        # The variant's last upstream dies: pinned requests get 503 naming the variant,
        # unpinned ones go to the healthy variant.
        a2.proc.send_signal(signal.SIGKILL)
        a2.proc.wait()
        with pytest.raises(ClientError) as exc:
            invoke(TargetVariant="a")
        code, status, message = error_of(exc)
        assert (code, status) == ("ServiceUnavailable", 503)
        assert '"a"' in message
        assert {invoke()["InvokedProductionVariant"] for _ in range(10)} == {"b"}

        # A model server is back on the same address: the health check returns it.
        a2 = start_fake_upstream("a2", tmp_path, port=a2.port)
        wait_until(lambda: a2.url not in gateway.state()["down"], 10, "a2 back in rotation")
        assert invoke(TargetVariant="a")["Seen"] == "a2"
    finally:
        for proc in (a1, a2, b1):
            proc.stop()


def test_connection_dropped_mid_request_is_503(gateway: Gateway, tmp_path: Path) -> None:
    slow = start_fake_upstream("slow", tmp_path)
    try:
        gateway.publish({"slow": [("only", 1.0, [slow.url])]})
        result: dict[str, httpx.Response] = {}

        def call() -> None:
            result["r"] = httpx.post(gateway.url + "/endpoints/slow/invocations", content=b"{}",
                                     headers={"x-amzn-sagemaker-custom-attributes": "sleep=10"},
                                     timeout=20)

        thread = threading.Thread(target=call)
        thread.start()
        wait_until(lambda: in_flight(slow) == 1, 10, "the request waiting in the upstream")
        slow.proc.send_signal(signal.SIGKILL)
        thread.join(15)
        response = result["r"]
        assert response.status_code == 503
        assert response.headers["x-amzn-errortype"] == "ServiceUnavailable:"
        assert slow.url in response.json()["Message"]
    finally:
        slow.stop()


# ------------------------------------------------------------------ own gateway


def test_missing_route_table_then_appearing(tmp_path: Path, echo: RuntimeProcess) -> None:
    gw = start_gateway(tmp_path)
    try:
        assert httpx.get(gw.url + "/ping").status_code == 200
        with pytest.raises(ClientError) as exc:
            gw.client().invoke_endpoint(EndpointName="echo", Body=b"{}")
        assert error_of(exc)[:2] == ("ValidationError", 404)
        gw.publish({"echo": [("only", 1.0, [echo.url])]})
        out = gw.client().invoke_endpoint(EndpointName="echo", Body=b"{}")
        assert out["InvokedProductionVariant"] == "only"
    finally:
        gw.proc.stop()


def test_upstream_timeout_is_a_424_model_error(tmp_path: Path, echo: RuntimeProcess) -> None:
    gw = start_gateway(tmp_path, KUBEINFER_UPSTREAM_TIMEOUT_S="0.5")
    try:
        gw.publish({"echo": [("only", 1.0, [echo.url])]})
        with pytest.raises(ClientError) as exc:
            gw.client().invoke_endpoint(EndpointName="echo", Body=b"{}",
                                        CustomAttributes="sleep=1.5")
        code, status, message = error_of(exc)
        assert (code, status) == ("ModelError", 424)
        assert "did not answer within 0.5s" in message
        # The timed-out connection is not reused: the next request is fine.
        out = gw.client().invoke_endpoint(EndpointName="echo", Body=b"{}")
        assert json.loads(out["Body"].read())["name"] == "echo"
    finally:
        gw.proc.stop()


def test_sigterm_finishes_in_flight_requests_then_exits(tmp_path: Path,
                                                        echo: RuntimeProcess) -> None:
    gw = start_gateway(tmp_path)
    gw.publish({"echo": [("only", 1.0, [echo.url])]})
    results: list[httpx.Response] = []

    def call() -> None:
        results.append(httpx.post(gw.url + "/endpoints/echo/invocations", content=b"{}",
                                  headers={"x-amzn-sagemaker-custom-attributes": "sleep=1"},
                                  timeout=10))

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    wait_until(lambda: in_flight(echo) == 3, 10, "the three requests in the upstream")
    gw.proc.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(10)
    assert [r.status_code for r in results] == [200, 200, 200]
    # uvicorn re-raises the signal once it has shut down cleanly.
    assert gw.proc.proc.wait(10) in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in gw.proc.log()
    with pytest.raises(httpx.ConnectError):
        httpx.get(gw.url + "/ping", timeout=1)

