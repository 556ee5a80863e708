"""The gateway's HTTP/1.1 client (gateway/upstream.py) against a real uvicorn server."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest

from kubeinfer_runtime.gateway.upstream import (
    ConnectFailed,
    ConnectionLost,
    UpstreamClient,
    UpstreamResponse,
    UpstreamTimeout,
)
from tests.support.fake_upstream import start_fake_upstream
from tests.support.ports import free_port
from tests.support.procs import RuntimeProcess


@pytest.fixture(scope="module")
def echo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RuntimeProcess]:
    proc = start_fake_upstream("echo", tmp_path_factory.mktemp("upstream"))
    yield proc
    proc.stop()


async def post(client: UpstreamClient, url: str, body: bytes = b"{}",
               attributes: str | None = None, timeout_s: float = 10,
               total: bool = False) -> UpstreamResponse:
    headers = [(b"content-type", b"application/json")]
    if attributes:
        headers.append((b"x-amzn-sagemaker-custom-attributes", attributes.encode()))
    return await client.request(url, b"POST", b"/invocations", headers, body, timeout_s,
                                total=total)


def test_keep_alive_connection_is_reused(echo: RuntimeProcess) -> None:
    async def run() -> list[int]:
        client = UpstreamClient()
        ports = []
        for _ in range(3):
            response = await post(client, echo.url)
            assert response.status == 200
            assert response.header(b"content-type") == b"application/json"
            ports.append(json.loads(response.body)["peer_port"])
        assert client.idle_count(echo.url) == 1
        await client.close()
        assert client.idle_count(echo.url) == 0
        return ports

    ports = asyncio.run(run())
    assert len(set(ports)) == 1


def test_large_bodies_both_ways(echo: RuntimeProcess) -> None:
    body = b"x" * (5 * 1024 * 1024)

    async def run() -> UpstreamResponse:
        client = UpstreamClient()
        try:
            return await post(client, echo.url, body)
        finally:
            await client.close()

    response = asyncio.run(run())
    assert json.loads(response.body)["body_len"] == len(body)


def test_concurrent_requests_open_more_connections_and_keep_at_most_max_idle(
        echo: RuntimeProcess) -> None:
    async def run() -> set[int]:
        client = UpstreamClient(max_idle=2)
        responses = await asyncio.gather(*(post(client, echo.url, attributes="sleep=0.2")
                                           for _ in range(5)))
        assert client.idle_count(echo.url) == 2
        await client.close()
        return {json.loads(r.body)["peer_port"] for r in responses}

    assert len(asyncio.run(run())) == 5


def test_idle_connections_past_their_ttl_are_not_reused(echo: RuntimeProcess) -> None:
    async def run() -> list[int]:
        client = UpstreamClient(idle_ttl_s=0.2)
        first = await post(client, echo.url)
        await asyncio.sleep(0.3)
        second = await post(client, echo.url)
        await client.close()
        return [json.loads(r.body)["peer_port"] for r in (first, second)]

    first, second = asyncio.run(run())
    assert first != second


def test_refused_connection_is_connect_failed() -> None:
    url = f"http://127.0.0.1:{free_port()}"

    async def run() -> None:
        client = UpstreamClient()
        await post(client, url)

    with pytest.raises(ConnectFailed) as exc:
        asyncio.run(run())
    assert exc.value.url == url and "could not be reached" in exc.value.detail


@pytest.mark.parametrize("url", ["https://127.0.0.1:1", "127.0.0.1:8080", "http://h:99999"])
def test_bad_upstream_url_is_connect_failed(url: str) -> None:
    async def run() -> None:
        await post(UpstreamClient(), url)

    with pytest.raises(ConnectFailed, match="not a valid upstream URL"):
        asyncio.run(run())


def test_timeout_closes_the_connection_and_the_next_request_works(echo: RuntimeProcess) -> None:
    async def run() -> UpstreamResponse:
        client = UpstreamClient()
        with pytest.raises(UpstreamTimeout, match=r"did not answer within 0\.2s"):
            await post(client, echo.url, attributes="sleep=1", timeout_s=0.2)
        assert client.idle_count(echo.url) == 0
        response = await post(client, echo.url)
        await client.close()
        return response

    assert asyncio.run(run()).status == 200


def test_a_total_timeout_counts_the_time_spent_connecting(echo: RuntimeProcess) -> None:
    """``total=True`` (a shadow's copy): connecting takes from the same budget, so the
    answer gets only what is left (the timeout it reports), not the whole timeout."""

    class SlowConnect(UpstreamClient):
        async def _connect(self, origin: Any, deadline: float | None = None) -> Any:
            await asyncio.sleep(0.2)
            return await super()._connect(origin, deadline)

    async def run() -> str:
        client = SlowConnect()
        with pytest.raises(UpstreamTimeout) as exc:
            await post(client, echo.url, attributes="sleep=1", timeout_s=0.3, total=True)
        await client.close()
        return exc.value.detail

    detail = asyncio.run(run())
    found = re.fullmatch(r"did not answer within ([0-9.e-]+)s", detail)
    assert found is not None, detail
    assert float(found.group(1)) <= 0.1 + 1e-6, detail


def test_forgotten_upstream_closes_connections_in_flight_on_release(
        echo: RuntimeProcess) -> None:
    async def run() -> None:
        client = UpstreamClient()
        await post(client, echo.url)
        pending = asyncio.create_task(post(client, echo.url, attributes="sleep=0.3"))
        await asyncio.sleep(0.1)
        client.forget(set())  # a reload dropped it while the request was in flight
        response = await pending
        assert response.status == 200
        assert client.idle_count(echo.url) == 0
        await client.close()

    asyncio.run(run())


class OneShotServer:
    """Answers the first request on each connection, then closes it on the second
    without answering: a server closing an idle keep-alive connection just as the
    client reuses it, made deterministic."""

    def __init__(self) -> None:
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        for n in (1, 2):
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                break
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            await reader.readexactly(length)
            if n == 2:
                break
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            await writer.drain()
        writer.close()


def test_reused_connection_closed_by_the_server_is_retried_on_a_fresh_one() -> None:
    async def run() -> tuple[UpstreamResponse, int]:
        server = OneShotServer()
        url = await server.start()
        client = UpstreamClient()
        await post(client, url)
        response = await post(client, url)  # reuses the pooled connection first
        await client.close()
        return response, server.connections

    response, connections = asyncio.run(run())
    assert (response.status, response.body) == (200, b"ok")
    assert connections == 2


def test_failed_reconnect_after_a_lost_connection_is_not_connect_failed() -> None:
    # The request may have reached the application before the connection broke,
    # so the gateway must not treat it as "certainly not delivered".
    async def run() -> None:
        server = OneShotServer()
        url = await server.start()
        client = UpstreamClient()
        await post(client, url)
        assert server.server is not None
        server.server.close()  # stop listening: the reconnect is refused
        await post(client, url)

    with pytest.raises(ConnectionLost, match="could not be reached"):
        asyncio.run(run())
