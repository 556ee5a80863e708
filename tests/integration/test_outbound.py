"""Outbound calls through the guarded connector, over real sockets on 127.0.0.1.

127.0.0.1 is an allowed destination, so the real server answers; for the
refusals the policy is given ``extra_refused=127.0.0.0/8`` (and ``::1``), so the
same server stands for a refused one — and must see nothing at all.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

import aiohttp
import pytest
from aiohttp import web

from kubeinfer_operator.scaling.cluster import ClusterScaler
from kubeinfer_runtime.contract.outbound import OutboundPolicy, OutboundRefused
from kubeinfer_runtime.contract.outbound_io import guarded_connector
from kubeinfer_runtime.queue.notifier import Delivery, Notifier

OPEN = OutboundPolicy.parse("", env={})
LOOPBACK_REFUSED = replace(OPEN, extra_refused=(ipaddress.ip_network("127.0.0.0/8"),
                                                ipaddress.ip_network("::1/128")))


@dataclass
class Server:
    base: str
    hits: list[str] = field(default_factory=list)
    #: The PromQL each query to /prom carried.
    queries: list[str] = field(default_factory=list)


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    """A hook (``/hook``), redirects (to it, to the metadata service), a Prometheus API."""
    seen = Server(base="")

    async def hook(request: web.Request) -> web.Response:
        seen.hits.append(f"{request.method} {request.path}")
        await request.read()
        return web.Response(status=200)

    async def moved(request: web.Request) -> web.Response:
        seen.hits.append(f"{request.method} {request.path}")
        raise web.HTTPFound(location="/hook")

    async def to_metadata(request: web.Request) -> web.Response:
        seen.hits.append(f"{request.method} {request.path}")
        raise web.HTTPFound(location="http://169.254.169.254/latest/meta-data/")

    async def query(request: web.Request) -> web.Response:
        seen.hits.append(f"{request.method} {request.path}")
        seen.queries.append(request.query.get("query", ""))
        return web.json_response({"status": "success", "data": {
            "resultType": "vector", "result": [{"metric": {}, "value": [0, "42.5"]}]}})

    async def endless(request: web.Request) -> web.StreamResponse:
        """A 200 whose body never ends (until the client hangs up)."""
        seen.hits.append(f"{request.method} {request.path}")
        await request.read()
        response = web.StreamResponse(status=200)
        await response.prepare(request)
        try:
            while True:
                await response.write(b"x" * 65536)
        except (ConnectionError, RuntimeError):  # the client hung up
            pass
        return response

    app = web.Application()
    app.router.add_route("*", "/hook", hook)  # a followed redirect would show here
    app.router.add_post("/endless", endless)
    app.router.add_post("/moved", moved)
    app.router.add_get("/to-metadata", to_metadata)
    app.router.add_get("/prom/api/v1/query", query)
    app.router.add_get("/moved/api/v1/query", moved)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    seen.base = f"http://127.0.0.1:{port}"
    yield seen
    await runner.cleanup()


async def test_post_through_the_guarded_connector_reaches_an_allowed_server(
        server: Server) -> None:
    async with aiohttp.ClientSession(connector=guarded_connector(OPEN)) as session, \
            session.post(server.base + "/hook", data=b"{}") as response:
        assert response.status == 200
    assert server.hits == ["POST /hook"]


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_refused_destination_gets_no_connection(server: Server, host: str) -> None:
    url = server.base.replace("127.0.0.1", host) + "/hook"
    async with aiohttp.ClientSession(connector=guarded_connector(LOOPBACK_REFUSED)) as session:
        with pytest.raises(aiohttp.ClientConnectorError) as info:
            await session.post(url, data=b"{}")
    assert isinstance(info.value.os_error, OutboundRefused)
    assert "a refused network" in str(info.value)
    assert server.hits == []


async def test_notifier_delivers_and_never_follows_redirects(server: Server) -> None:
    notifier = Notifier(policy=OPEN, attempts=1, backoff_first_s=0.01)
    try:
        assert await notifier.send(server.base + "/hook", b"{}", "id-1") is True
        assert server.hits == ["POST /hook"]
        # A 3xx is a failed delivery: the target it names is never called.
        assert await notifier.send(server.base + "/moved", b"{}", "id-2") is False
        assert server.hits == ["POST /hook", "POST /moved"]
    finally:
        await notifier.close()


async def test_a_webhook_reply_is_read_only_up_to_a_bound(server: Server) -> None:
    """Only the status counts: an endless (or huge) 2xx body neither holds the worker until
    the timeout, turning a delivered notification into an outage, nor fills its memory."""
    notifier = Notifier(policy=OPEN, attempts=1, backoff_first_s=0.01, timeout_s=5.0)
    try:
        started = time.monotonic()
        assert await notifier.deliver(server.base + "/endless", b"{}", "id-1") \
            is Delivery.DELIVERED
        assert time.monotonic() - started < 3.0
        # The cut connection is not reused: the next POST gets a fresh one.
        assert await notifier.send(server.base + "/hook", b"{}", "id-2") is True
    finally:
        await notifier.close()
    assert server.hits == ["POST /endless", "POST /hook"]


async def test_notifier_refused_destination_gets_nothing(server: Server) -> None:
    notifier = Notifier(policy=LOOPBACK_REFUSED, attempts=3, backoff_first_s=30.0)
    try:
        assert await notifier.send(server.base + "/hook", b"{}", "id-1") is False
    finally:
        await notifier.close()
    assert server.hits == []


async def test_even_a_followed_redirect_cannot_reach_a_refused_address(server: Server) -> None:
    """Defence in depth: a client that did follow redirects still meets the guard."""
    async with aiohttp.ClientSession(connector=guarded_connector(OPEN)) as session:
        with pytest.raises(aiohttp.ClientConnectorError, match="cloud metadata service") as info:
            await session.get(server.base + "/to-metadata")  # aiohttp follows by default
    assert isinstance(info.value.os_error, OutboundRefused)
    assert server.hits == ["GET /to-metadata"]


async def test_operator_prometheus_queries_obey_the_policy(server: Server) -> None:
    scaler = ClusterScaler(outbound=OPEN)
    refusing = ClusterScaler(outbound=LOOPBACK_REFUSED)
    up = 'up{namespace="{namespace}"}'
    try:
        assert await scaler._prometheus(server.base + "/prom", up, "team-a") == 42.5
        assert server.hits == ["GET /prom/api/v1/query"]
        assert server.queries == ['up{namespace="team-a"}']  # the placeholder filled in
        assert await scaler._prometheus(server.base + "/moved", up, "team-a") is None
        assert server.hits == ["GET /prom/api/v1/query", "GET /moved/api/v1/query"]
        assert await refusing._prometheus(server.base + "/prom", up, "team-a") is None
        assert await scaler._prometheus("http://169.254.169.254/", up, "team-a") is None
        assert len(server.hits) == 2
    finally:
        await scaler.close()
        await refusing.close()


async def test_operator_prometheus_queries_read_only_their_namespace(server: Server) -> None:
    """Checked again as sent (admission checked it too): a query that could read another
    namespace's series is never sent; with the check off (a Prometheus per tenant), it is."""
    scaler = ClusterScaler(outbound=OPEN)
    unchecked = ClusterScaler(outbound=OPEN, promql_label="")
    base = server.base + "/prom"
    try:
        for query in ("up", 'sum(rate(x{namespace="team-b"}[5m]))',
                      'x{namespace="team-a"} / on() y', 'x{namespace=~"team-a|team-b"}'):
            assert await scaler._prometheus(base, query, "team-a") is None, query
        assert server.hits == []
        assert await scaler._prometheus(base, 'x{namespace="{namespace}"} / on() '
                                              'y{namespace="team-a"}', "team-a") == 42.5
        assert await unchecked._prometheus(base, "up", "team-a") == 42.5
        assert server.queries == ['x{namespace="team-a"} / on() y{namespace="team-a"}', "up"]
        # A query in the URL would come first, and Prometheus runs the first one.
        smuggled = base + '/api/v1/query?query=sum(x{namespace="team-b"})&x='
        assert await scaler._prometheus(smuggled, 'x{namespace="{namespace}"}',
                                        "team-a") is None
        assert len(server.queries) == 2
    finally:
        await scaler.close()
        await unchecked.close()
