"""The coalescing HTTP protocol keeps uvicorn's behaviour on every path (real server).

``kubeinfer_runtime.http_protocol`` holds a fixed-length response's head until
its body so both go out in one write. These tests run
``tests/support/protocol_app.py`` under uvicorn with that protocol and check,
over real sockets, everything that could break: fixed-length bodies in one
or several messages, streamed (chunked) bodies, HEAD, request bodies and
``Expect: 100-continue``, 8 MB bodies (flow control), errors before and after
the app sends the response's start, ``Connection: close`` and pipelined requests.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.ports import free_port, wait_until

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("protocol") / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tests.support.protocol_app", str(port)],
                                cwd=REPO, env={**os.environ}, stdout=out,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"protocol app exited:\n{log.read_text()}")
        try:
            return httpx.get(url + "/fixed", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(up, 30, "the protocol test app")
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def raw(url: str, request: bytes, *, until_close: bool = False) -> bytes:
    """Send raw bytes; read until the peer closes, or until 1 s of silence."""
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        sock.settimeout(5 if until_close else 1)
        data = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                assert not until_close, f"connection not closed; got {data!r}"
                return data
            if not chunk:
                return data
            data += chunk


def test_fixed_length_responses(server: str) -> None:
    with httpx.Client(base_url=server) as client:
        for _ in range(3):  # keep-alive: one connection, several responses
            r = client.get("/fixed")
            assert (r.status_code, r.content, r.headers["content-length"]) == (200, b"hello", "5")
            assert r.headers["content-type"] == "text/plain"
            assert "date" in r.headers and "server" in r.headers  # uvicorn's defaults
        r = client.get("/pieces")
        assert r.content == b"abcdef"
        r = client.get("/missing")
        assert (r.status_code, r.content) == (404, b"")


def test_request_bodies_and_expect_continue(server: str) -> None:
    with httpx.Client(base_url=server) as client:
        body = os.urandom(300_000)
        assert client.post("/echo", content=body).content == body
        assert client.post("/echo", content=iter([b"a" * 10, b"b" * 20])).content == (
            b"a" * 10 + b"b" * 20)  # chunked request body
    response = raw(server, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
                           b"Expect: 100-continue\r\n\r\nping")
    assert response.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n")
    assert response.endswith(b"\r\n\r\nping")


def test_streamed_response_is_chunked(server: str) -> None:
    with httpx.Client(base_url=server) as client, client.stream("GET", "/stream") as r:
        assert r.headers.get("transfer-encoding") == "chunked"
        assert b"".join(r.iter_bytes()) == b"one,two,three"


def test_head_has_length_and_no_body(server: str) -> None:
    response = raw(server, b"HEAD /fixed HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, rest = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and b"content-length: 5" in head
    assert rest == b""


def test_large_body_survives_flow_control(server: str) -> None:
    with httpx.Client(base_url=server, timeout=30) as client, client.stream("GET", "/big") as r:
        size = 0
        for chunk in r.iter_bytes():
            size += len(chunk)
        assert size == 8 * 1024 * 1024 and r.headers["content-length"] == str(size)


def test_connection_close_is_honoured(server: str) -> None:
    response = raw(server, b"GET /close HTTP/1.1\r\nHost: x\r\n\r\n", until_close=True)
    assert response.startswith(b"HTTP/1.1 200 OK") and response.endswith(b"\r\n\r\nbye")
    assert b"connection: close" in response
    # A client asking to close gets its response before the close, too.
    response = raw(server, b"GET /fixed HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                   until_close=True)
    assert response.endswith(b"\r\n\r\nhello")


def test_app_errors(server: str) -> None:
    with httpx.Client(base_url=server) as client:
        r = client.get("/fail-before")
        assert (r.status_code, r.content) == (500, b"Internal Server Error")
        # A fixed-length start is held until its body: when the app fails or
        # returns before the body, nothing was sent yet and uvicorn answers 500.
        for path in ("/fail-after", "/no-body"):
            r = client.get(path)
            assert (r.status_code, r.content) == (500, b"Internal Server Error")
        assert client.get("/fixed").content == b"hello"  # the server is fine


def test_pipelined_requests_answer_in_order(server: str) -> None:
    requests = b"".join(f"GET {p} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
                        for p in ("/fixed", "/pieces", "/stream", "/fixed"))
    response = raw(server, requests + b"GET /close HTTP/1.1\r\nHost: x\r\n\r\n",
                   until_close=True)
    assert response.count(b"HTTP/1.1 200 OK") == 5
    order = [response.index(marker) for marker in (b"hello", b"abcdef", b"three", b"bye")]
    assert order == sorted(order)
    assert response.count(b"hello") == 2
