"""The operator's own HTTP over real sockets: its listeners' bounds and the answers it reads.

The scaler's ``/scale`` (reachable from gateway pods of every namespace) and the
operator's ``/metrics`` close connections at the end of their lifetime (idle,
half-sent head or body alike) and answer 503 past their connection cap; gateway
``/metrics`` and Prometheus answers over their limits read as unreachable. The
lifetime and cap are lowered here (0.5 s, 4 connections) so the tests take
seconds; the handlers' answers themselves are in tests/unit/test_scale_requests.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from aiohttp import web

from kubeinfer_operator import http_bounds
from kubeinfer_operator.local.scaler import LocalScaler
from kubeinfer_operator.observability import MetricsServer, OperatorMetrics
from kubeinfer_operator.render.k8s_secrets import scaler_token
from kubeinfer_operator.scaling.cluster import ClusterScaler
from kubeinfer_operator.scaling.rollouts import RolloutGuard
from kubeinfer_runtime.contract.outbound import OutboundPolicy
from tests.support.ports import free_port

KEY = b"k" * 32
LIFETIME_S = 0.5
CAP = 4
BODY = b'{"endpoint": "ep", "variant": "main", "namespace": "ml"}'


@pytest.fixture
def bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http_bounds, "CONNECTION_LIFETIME_S", LIFETIME_S)
    monkeypatch.setattr(http_bounds, "MAX_CONNECTIONS", CAP)


@asynccontextmanager
async def started_scaler() -> AsyncIterator[ClusterScaler]:
    """A scaler serving on a free port, its listener bounded as ``http_bounds`` says now."""
    scaler = ClusterScaler(port=free_port(), signing_key=KEY)
    scaler.known[("ml", "ep")] = frozenset({"main"})
    rounds: list[str] = []

    async def on_request(namespace: str, endpoint: str) -> None:
        rounds.append(endpoint)

    scaler.on_request = on_request
    await scaler.start()
    try:
        yield scaler
    finally:
        await scaler.close()


@pytest.fixture
async def scaler(bounds: None) -> AsyncIterator[ClusterScaler]:
    async with started_scaler() as scaler:
        yield scaler


async def exchange(port: int, data: bytes, wait_s: float = 5.0) -> bytes:
    """Send ``data`` and read until the server closes (b"" when it answers nothing)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), wait_s)
    finally:
        writer.close()


def scale_post(token: bytes, body: bytes = BODY) -> bytes:
    return (b"POST /scale HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer "
            + token + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)


def status_line(answer: bytes) -> bytes:
    return answer.split(b"\r\n", 1)[0]


async def test_an_undecodable_token_gets_401_not_500(
        scaler: ClusterScaler, caplog: pytest.LogCaptureFixture) -> None:
    assert scaler.port is not None
    answer = await exchange(scaler.port, scale_post(b"\xff\xfe"))
    assert status_line(answer) == b"HTTP/1.1 401 Unauthorized"
    assert b"malformed bearer token" in answer
    good = await exchange(scaler.port, scale_post(scaler_token(KEY, "ml").encode()))
    assert status_line(good) == b"HTTP/1.1 202 Accepted"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("sent", [
    b"",  # idle
    b"POST /scale HTTP/1.1\r\nHost: x\r\n",  # half a head
    b"POST /scale HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer x\r\n"
    b"Content-Length: 100\r\n\r\n{",  # half a body
], ids=["idle", "partial-head", "partial-body"])
async def test_the_scaler_closes_a_connection_at_the_end_of_its_lifetime(
        scaler: ClusterScaler, sent: bytes, caplog: pytest.LogCaptureFixture) -> None:
    assert scaler.port is not None
    started = asyncio.get_running_loop().time()
    assert await exchange(scaler.port, sent, wait_s=LIFETIME_S + 3) == b""
    assert asyncio.get_running_loop().time() - started < LIFETIME_S + 2
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_connections_past_the_cap_get_503_and_the_scaler_serves_again_after(
        bounds: None, monkeypatch: pytest.MonkeyPatch) -> None:
    # The cap, not the lifetime: the held connections must outlive the test's steps. At
    # LIFETIME_S (0.5 s) a loaded machine pausing the test for 0.4 s let the listener
    # close them before the connection over the cap came, which was then served (202).
    monkeypatch.setattr(http_bounds, "CONNECTION_LIFETIME_S", 60.0)
    async with started_scaler() as scaler:
        assert scaler.port is not None
        held = [await asyncio.open_connection("127.0.0.1", scaler.port) for _ in range(CAP)]
        await asyncio.sleep(0.1)  # accepted
        over = await exchange(scaler.port, scale_post(scaler_token(KEY, "ml").encode()))
        assert status_line(over) == b"HTTP/1.1 503 Service Unavailable"
        assert b"Retry-After: 1" in over
        for _, writer in held:
            writer.close()
        await asyncio.sleep(0.1)
        good = await exchange(scaler.port, scale_post(scaler_token(KEY, "ml").encode()))
        assert status_line(good) == b"HTTP/1.1 202 Accepted"


async def test_the_operator_metrics_listener_is_bounded_too(bounds: None) -> None:
    server = MetricsServer(OperatorMetrics(), free_port(), host="127.0.0.1")
    await server.start()
    assert server.port is not None
    try:
        assert await exchange(server.port, b"", wait_s=LIFETIME_S + 3) == b""
        answer = await exchange(server.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n"
                                              b"Connection: close\r\n\r\n")
        assert status_line(answer) == b"HTTP/1.1 200 OK"
        assert b"kubeinfer_operator_active" in answer
    finally:
        await server.close()


async def test_the_local_scaler_is_bounded_too(bounds: None, tmp_path: Path) -> None:
    supervisor = SimpleNamespace(name="ep", running={"main": object()}, paths=SimpleNamespace(
        root=tmp_path, log_file=lambda name: tmp_path / f"{name}.log"))
    local = LocalScaler(cast(Any, supervisor))
    url = await local.start_server()
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    try:
        assert await exchange(port, b"", wait_s=LIFETIME_S + 3) == b""
        answer = await exchange(port, scale_post(b"\xff"))
        assert status_line(answer) == b"HTTP/1.1 401 Unauthorized"
        answer = await exchange(port, scale_post(local.token.encode()))
        assert status_line(answer) == b"HTTP/1.1 202 Accepted"
    finally:
        await local.stop_server()


# -- answers read with a bound ----------------------------------------------------------------

#: Valid answers that are too big: read whole, they would be believed.
PADDED_METRICS = ("# padding\n" * ((http_bounds.MAX_METRICS_BYTES // 10) + 1)
                  + 'kubeinfer_gateway_invocations_total{endpoint="ep",variant="main"} 5\n'
                  ).encode()
PADDED_QUERY = json.dumps({"status": "success", "data": {"resultType": "vector", "result": [
    {"metric": {"pad": "x" * http_bounds.MAX_QUERY_BYTES}, "value": [0, "7"]}]}}).encode()
SMALL_QUERY = json.dumps({"status": "success", "data": {"resultType": "vector", "result": [
    {"metric": {}, "value": [0, "7"]}]}}).encode()


@pytest.fixture
async def big() -> AsyncIterator[str]:
    """``/{small,big,chunked}/metrics`` and ``/{small,big,chunked}/api/v1/query``."""

    async def answer(request: web.Request) -> web.StreamResponse:
        kind = request.match_info["kind"]
        query = request.path.endswith("/query")
        body = (SMALL_QUERY if query else PADDED_METRICS[-80:]) if kind == "small" else (
            PADDED_QUERY if query else PADDED_METRICS)
        content_type = "application/json" if query else "text/plain"
        if kind != "chunked":
            return web.Response(body=body, content_type=content_type)
        response = web.StreamResponse()
        response.content_type = content_type
        response.enable_chunked_encoding()
        await response.prepare(request)
        try:
            for i in range(0, len(body), 65536):
                await response.write(body[i:i + 65536])
        except (ConnectionError, RuntimeError):  # the client stopped reading: expected
            pass
        return response

    app = web.Application()
    app.router.add_get("/{kind}/metrics", answer)
    app.router.add_get("/{kind}/api/v1/query", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def test_oversized_gateway_metrics_read_as_a_failed_scrape(big: str) -> None:
    scaler = ClusterScaler(signing_key=KEY)
    guard = RolloutGuard(None)
    try:
        for fetch in (scaler._fetch, guard._fetch):
            small = await fetch(f"{big}/small/metrics")
            assert small is not None and "kubeinfer_gateway_invocations_total" in small
            assert await fetch(f"{big}/big/metrics") is None
            assert await fetch(f"{big}/chunked/metrics") is None
    finally:
        await scaler.close()
        await guard.close()


async def test_oversized_prometheus_answers_read_as_unknown(
        big: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    open_policy = OutboundPolicy.parse("", env={})
    scaler = ClusterScaler(outbound=open_policy)
    supervisor = SimpleNamespace(name="ep", outbound=open_policy, paths=SimpleNamespace(
        root=tmp_path, log_file=lambda name: tmp_path / f"{name}.log"))
    local = LocalScaler(cast(Any, supervisor))
    async def cluster(base: str, query: str) -> float | None:
        return await scaler._prometheus(base, query, "team-a")

    try:
        for query in (cluster, local._prometheus):
            up = 'up{namespace="team-a"}'
            assert await query(f"{big}/small", up) == 7.0
            assert await query(f"{big}/big", up) is None
            assert await query(f"{big}/chunked", up) is None
    finally:
        await scaler.close()
        await local.stop_server()
    assert not any("xxxx" in r.getMessage() for r in caplog.records)
