"""Admission at a real gateway: a burst larger than a variant's slots and waiting line gets
fast 429 ThrottlingException answers with JSON bodies (boto3 raises them), admitted
requests keep their latency, nothing waits past the bound, and the next request after the
burst is served as before. The upstream is the fake model server taking 0.2 s a request."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from kubeinfer_runtime.contract import EndpointRoute, RouteTable, VariantRoute
from tests.support.fake_upstream import start_fake_upstream
from tests.support.procs import RuntimeProcess, start_runtime

SLOW = {"X-Amzn-SageMaker-Custom-Attributes": "sleep=0.2", "Content-Type": "application/json"}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RuntimeProcess, Path]]:
    tmp = tmp_path_factory.mktemp("admission")
    upstream = start_fake_upstream("slow", tmp / "logs")
    routes = tmp / "routes.json"
    RouteTable(endpoints={
        # 2 in flight (fixed), at most 0.5 s of waiting.
        "tight": EndpointRoute(name="tight", variants=[VariantRoute(
            name="main", weight=1, upstreams=[upstream.url], max_in_flight_per_upstream=2,
            max_queue_wait_s=0.5)]),
        # The adaptive limit, with room to wait: on a loaded machine the 0.2 s answers
        # come slower, the measured rate drops, and the default 1 s bound would shed
        # what this endpoint's test expects to be admitted.
        "roomy": EndpointRoute(name="roomy", variants=[VariantRoute(
            name="main", weight=1, upstreams=[upstream.url], max_queue_wait_s=5.0)]),
    }).write_atomic(routes)
    gw = start_runtime("gateway", {"KUBEINFER_ROUTE_TABLE_PATH": str(routes)}, tmp / "logs")
    yield gw, routes
    gw.stop()
    upstream.stop()


def timed_post(url: str, client: httpx.Client | None = None
               ) -> tuple[int, float, httpx.Response]:
    started = time.monotonic()
    r = (client or httpx).post(url, content=b"{}", headers=SLOW, timeout=30)
    return r.status_code, time.monotonic() - started, r


def test_a_burst_is_shed_with_429_and_admitted_requests_keep_their_latency(
        gateway: tuple[RuntimeProcess, Path]) -> None:
    gw, _ = gateway
    url = f"{gw.url}/endpoints/tight/invocations"
    barrier = threading.Barrier(20)

    def burst(_: int) -> tuple[int, float, httpx.Response]:
        # Each client is built first (tens of ms of CPU each), then the 20 requests leave
        # together: built on the way, they reached the gateway spread over as long as a
        # loaded machine took to build 20 clients, and the slots admitted more of them.
        with httpx.Client(timeout=30) as client:
            barrier.wait(timeout=60)
            return timed_post(url, client)

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(burst, range(20)))
    ok = [t for code, t, _ in results if code == 200]
    shed = [(t, r) for code, t, r in results if code == 429]
    assert len(ok) + len(shed) == 20, [code for code, _, _ in results]
    assert 2 <= len(ok) <= 8  # two slots, each 0.2 s, and 0.5 s of waiting
    assert len(shed) >= 12
    for t, r in shed:
        assert r.headers["x-amzn-errortype"] == "ThrottlingException:"
        body = r.json()
        assert body["ErrorCode"] == "ThrottlingException" and "capacity" in body["Message"]
        assert t < 2.0
    assert max(ok) < 2.0  # admitted ones waited at most the bound, plus their 0.2 s
    # The burst is over: the next request is served at once.
    code, took, _ = timed_post(url)
    assert code == 200 and took < 1.0


def test_boto3_sees_a_throttling_exception(gateway: tuple[RuntimeProcess, Path]) -> None:
    import boto3
    from botocore.config import Config
    from botocore.exceptions import ClientError

    gw, _ = gateway
    client = boto3.client("sagemaker-runtime", endpoint_url=gw.url, region_name="us-east-1",
                          aws_access_key_id="x", aws_secret_access_key="x",
                          config=Config(retries={"total_max_attempts": 1, "mode": "standard"},
                                        max_pool_connections=20))

    def call(_: int) -> str:
        try:
            client.invoke_endpoint(EndpointName="tight", Body=b"{}",
                                   ContentType="application/json",
                                   CustomAttributes="sleep=0.2")
            return "ok"
        except ClientError as exc:
            return str(exc.response["Error"]["Code"])

    with ThreadPoolExecutor(12) as pool:
        codes = set(pool.map(call, range(12)))
    assert codes <= {"ok", "ThrottlingException"} and "ThrottlingException" in codes


def test_the_adaptive_limit_admits_what_the_model_servers_keep_up_with(
        gateway: tuple[RuntimeProcess, Path]) -> None:
    """16 at once on a model server that answers every request in 0.2 s, in parallel:
    8 (the floor) go, 8 wait a moment, and the measured rate lets them all in."""
    gw, _ = gateway
    url = f"{gw.url}/endpoints/roomy/invocations"
    with ThreadPoolExecutor(16) as pool:
        codes = [code for code, _, _ in pool.map(lambda _: timed_post(url), range(16))]
    assert codes == [200] * 16
    assert json.loads(httpx.get(f"{gw.url}/routes").text)["table"] is not None
