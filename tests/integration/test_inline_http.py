"""HTTP/1.1 semantics of the model server's inline path, over raw sockets.

The model server answers clean inference requests inline in its HTTP
protocol (``inline_http``) and everything else through uvicorn's ASGI path.
These tests speak HTTP byte by byte to a real server process: both paths
answer alike, pipelined requests come back in order across the two paths,
bodies split across packets, ``Connection: close``, HTTP/1.0, ``Expect:
100-continue``, chunked bodies, oversize bodies, a client that leaves
mid-body, and SIGTERM while a body is half sent (answered, then closed). The
gateway's InvokeEndpoint takes the same inline path, its hop to the model
server awaited in a task.
A request target with a query string always takes the ASGI path, which is
how the comparison reaches it.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httptools
import httpx
import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubeinfer_runtime.models.base import ModelMetadata
from kubeinfer_runtime.models.onnx import OnnxBackend
from tests.integration.test_gateway import Gateway, start_gateway
from tests.support.fake_upstream import start_fake_upstream
from tests.support.procs import RuntimeProcess, start_runtime
from tests.support.v2_requests import requests

ROWS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]


def _env(models_dir: Path, **extra: str) -> dict[str, str]:
    return {"KUBEINFER_MODEL_URI": f"file://{models_dir / 'iris.onnx'}",
            "KUBEINFER_MODEL_NAME": "primary", "KUBEINFER_ENDPOINT_NAME": "inline",
            "KUBEINFER_VARIANT_NAME": "primary", **extra}


@pytest.fixture(scope="module")
def server(models_dir: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[RuntimeProcess]:
    proc = start_runtime("model-server", _env(models_dir, KUBEINFER_MAX_PAYLOAD_BYTES="4096"),
                         tmp_path_factory.mktemp("inline-logs"))
    yield proc
    proc.stop()


@dataclass
class Response:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


class Reader:
    """Parses the responses arriving on one connection, in order (httptools)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.done: list[Response] = []
        self._current = Response()
        self._parser = httptools.HttpResponseParser(self)
        self.closed = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self._current.headers[name.decode().lower()] = value.decode()

    def on_headers_complete(self) -> None:
        self._current.status = self._parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self._current.body += body

    def on_message_complete(self) -> None:
        self.done.append(self._current)
        self._current = Response()

    def read(self, count: int, timeout: float = 10.0) -> list[Response]:
        """Block until ``count`` responses have arrived (or the server closed)."""
        deadline = time.monotonic() + timeout
        while len(self.done) < count and not self.closed:
            self.sock.settimeout(max(deadline - time.monotonic(), 0.01))
            data = self.sock.recv(65536)
            if not data:
                self.closed = True
                break
            if data.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"):
                self.done.append(Response(status=100))
                data = data[len(b"HTTP/1.1 100 Continue\r\n\r\n"):]
                if not data:
                    continue
            self._parser.feed_data(data)
        return self.done[:count]

    def wait_closed(self, timeout: float = 10.0) -> bool:
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True


def _connect(proc: RuntimeProcess) -> tuple[socket.socket, Reader]:
    sock = socket.create_connection(("127.0.0.1", proc.port), timeout=10)
    return sock, Reader(sock)


def _post(target: str, body: bytes, *headers: str, version: str = "1.1") -> bytes:
    head = [f"POST {target} HTTP/{version}", "Host: test", f"Content-Length: {len(body)}",
            *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def _json(doc: object) -> bytes:
    return orjson.dumps(doc)


def _npy(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


#: (target, body, headers): every kind of answer the inference routes give.
CASES = [
    ("/invocations", _json({"instances": ROWS}), ["Content-Type: application/json"]),
    ("/invocations", _json(ROWS), []),
    ("/invocations", b"5.1,3.5,1.4,0.2\n6.7,3.0,5.2,2.3\n", ["Content-Type: text/csv"]),
    ("/invocations", _npy(np.array(ROWS, np.float32)),
     ["Content-Type: application/x-npy", "Accept: application/x-npy"]),
    ("/invocations", _json({"instances": ROWS}), ["Accept: text/csv"]),
    ("/invocations", b'{"instances": [[1, 2', ["Content-Type: application/json"]),
    ("/invocations", _json({"instances": [[1, 2, 3]]}), ["Content-Type: application/json"]),
    ("/invocations", _json({"instances": [["a", "b", "c", "d"]]}), []),
    ("/invocations", b"", ["Content-Type: application/json"]),
    ("/v2/models/primary/infer", _json({"id": "r1", "inputs": [
        {"name": "input", "shape": [2, 4], "datatype": "FP32", "data": ROWS}]}), []),
    ("/v2/models/primary/versions/1/infer", _json({"inputs": [
        {"name": "input", "shape": [1, 4], "datatype": "FP64", "data": ROWS[:1]}]}), []),
    ("/v2/models/primary/infer", b"not json", []),
    ("/v2/models/other/infer", _json({"inputs": []}), []),
    ("/invocations", _json(ROWS), ["Accept: image/png"]),
    ("/invocations", _json(ROWS), ["Content-Type: application/xml"]),
]


@pytest.mark.parametrize(("target", "body", "headers"), CASES,
                         ids=[f"{i}-{c[0].split('/')[-1]}" for i, c in enumerate(CASES)])
def test_inline_and_asgi_paths_answer_alike(server: RuntimeProcess, target: str, body: bytes,
                                            headers: list[str]) -> None:
    sock, reader = _connect(server)
    with sock:
        sock.sendall(_post(target, body, *headers))
        (inline,) = reader.read(1)
        sock.sendall(_post(target + "?path=asgi", body, *headers))
        (asgi,) = reader.read(1)
    for r in (inline, asgi):
        r.headers.pop("date", None)
    assert (inline.status, inline.headers, inline.body) == (asgi.status, asgi.headers, asgi.body)
    assert inline.headers["content-length"] == str(len(inline.body))


# ------------------------------------------------------------------ V2, generated
# The inline path decodes V2 requests with the model's V2 lane (``codec_v2_fast``);
# the ASGI path, all of it with KUBEINFER_INLINE_HTTP=false, with the general
# decoder. Generated requests, clean and not (tests/support/v2_requests.py), to
# both servers: every answer alike, byte for byte, and none a 500. The servers
# live for the module, so the lane's learned layouts carry over between examples.

V2_EXAMPLES = int(os.environ.get("KUBEINFER_V2_HTTP_EXAMPLES", "150"))
V2_TARGETS = ["/v2/models/primary/infer"] * 6 + [
    "/v2/models/primary/versions/1/infer", "/v2/models/other/infer", "/v2/models/primary/infer?x=1"]


@pytest.fixture(scope="module")
def asgi_server(models_dir: Path, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[RuntimeProcess]:
    proc = start_runtime("model-server", _env(models_dir, KUBEINFER_MAX_PAYLOAD_BYTES="4096",
                                              KUBEINFER_INLINE_HTTP="false"),
                         tmp_path_factory.mktemp("asgi-logs"))
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def pooled_servers(models_dir: Path, tmp_path_factory: pytest.TempPathFactory
                   ) -> Iterator[tuple[RuntimeProcess, RuntimeProcess]]:
    """The same pair with the model in the inference thread pool (the inline path's task)."""
    logs = tmp_path_factory.mktemp("pooled-logs")
    env = {"KUBEINFER_MAX_PAYLOAD_BYTES": "4096", "KUBEINFER_INFERENCE_MODE": "thread"}
    inline = start_runtime("model-server", _env(models_dir, **env), logs)
    try:
        asgi = start_runtime("model-server",
                             _env(models_dir, **env, KUBEINFER_INLINE_HTTP="false"), logs)
    except Exception:
        inline.stop()
        raise
    yield inline, asgi
    inline.stop()
    asgi.stop()


@st.composite
def _v2_http(draw: st.DrawFn, meta: ModelMetadata) -> bytes:
    body, header_length = draw(requests(meta))
    headers = []
    if draw(st.integers(0, 3)):
        headers.append("Content-Type: " + draw(st.sampled_from(
            ["application/json", "application/octet-stream", "text/plain"])))
    if header_length is not None:
        value = (draw(st.sampled_from(["abc", "-1", " 12", "9" * 20, ""]))
                 if draw(st.integers(0, 19)) == 0 else str(header_length))
        headers.append(f"Inference-Header-Content-Length: {value}")
    if draw(st.integers(0, 19)) == 0:
        body += b" " * 4096  # over KUBEINFER_MAX_PAYLOAD_BYTES
    return _post(draw(st.sampled_from(V2_TARGETS)), body, *headers)


def _answer(proc: RuntimeProcess, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    sock, reader = _connect(proc)
    with sock:
        sock.sendall(raw)
        got = reader.read(1)
    assert got, f"no answer to {raw[:200]!r}"
    r = got[0]
    r.headers.pop("date", None)
    return r.status, r.headers, r.body


@pytest.mark.parametrize("mode", ["inline", "thread"])
def test_v2_requests_answer_alike_on_both_paths(
        request: pytest.FixtureRequest, server: RuntimeProcess, models_dir: Path,
        mode: str) -> None:
    if mode == "inline":
        inline, asgi = server, request.getfixturevalue("asgi_server")
    else:
        inline, asgi = request.getfixturevalue("pooled_servers")
    backend = OnnxBackend()
    backend.load(models_dir / "iris.onnx")
    meta = backend.metadata()
    statuses: list[int] = []

    @settings(max_examples=V2_EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow,
                                     HealthCheck.function_scoped_fixture])
    @given(raw=_v2_http(meta))
    def check(raw: bytes) -> None:
        fast = _answer(inline, raw)
        assert fast == _answer(asgi, raw), raw[:300]
        assert fast[0] < 500, (raw[:300], fast)
        statuses.append(fast[0])

    check()
    # The generator is not all errors: a good share of the answers are successes.
    assert statuses.count(200) >= len(statuses) // 8, statuses


def test_pipelined_requests_come_back_in_order_across_both_paths(server: RuntimeProcess) -> None:
    good = _post("/invocations", _json(ROWS))
    bad = _post("/invocations", b"[[1,2", "Content-Type: application/json")
    ping = b"GET /ping HTTP/1.1\r\nHost: test\r\n\r\n"
    slow = _post("/invocations?path=asgi", _json(ROWS[:1]))
    sock, reader = _connect(server)
    with sock:
        sock.sendall(good + ping + bad + slow + good + good)
        got = reader.read(6)
    assert [r.status for r in got] == [200, 200, 400, 200, 200, 200]
    assert len(orjson.loads(got[3].body)["predictions"]["label"]) == 1
    assert got[0].body == got[4].body == got[5].body
    assert len(orjson.loads(got[0].body)["predictions"]["label"]) == 2


def test_a_body_split_across_packets(server: RuntimeProcess) -> None:
    raw = _post("/invocations", _json({"instances": ROWS}), "Content-Type: application/json")
    sock, reader = _connect(server)
    with sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(0, len(raw), 7):
            sock.sendall(raw[i:i + 7])
            time.sleep(0.002)
        (r,) = reader.read(1)
    assert r.status == 200 and len(orjson.loads(r.body)["predictions"]["label"]) == 2


def test_connection_close_and_http_1_0_are_answered_then_closed(server: RuntimeProcess) -> None:
    for raw in (_post("/invocations", _json(ROWS), "Connection: close"),
                _post("/invocations", _json(ROWS), version="1.0")):
        sock, reader = _connect(server)
        with sock:
            sock.sendall(raw)
            (r,) = reader.read(1)
            assert r.status == 200 and r.headers.get("connection") == "close"
            assert reader.wait_closed()


def test_expect_100_continue(server: RuntimeProcess) -> None:
    body = _json(ROWS)
    head = _post("/invocations", body, "Expect: 100-continue")[:-len(body)]
    sock, reader = _connect(server)
    with sock:
        sock.sendall(head)
        (cont,) = reader.read(1)
        assert cont.status == 100
        sock.sendall(body)
        ok = reader.read(2)[1]
    assert ok.status == 200


def test_chunked_body(server: RuntimeProcess) -> None:
    body = _json(ROWS)
    raw = (b"POST /invocations HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n"
           + b"%x\r\n%s\r\n" % (10, body[:10]) + b"%x\r\n%s\r\n" % (len(body) - 10, body[10:])
           + b"0\r\n\r\n")
    sock, reader = _connect(server)
    with sock:
        sock.sendall(raw)
        (r,) = reader.read(1)
    assert r.status == 200


def test_declared_body_over_the_limit_is_413_before_it_is_sent(server: RuntimeProcess) -> None:
    sock, reader = _connect(server)
    with sock:
        sock.sendall(b"POST /invocations HTTP/1.1\r\nHost: test\r\nContent-Length: 5000\r\n\r\n")
        (r,) = reader.read(1)
    assert r.status == 413 and orjson.loads(r.body)["ErrorCode"] == "ValidationError"


def _errors_499(proc: RuntimeProcess) -> float:
    text = httpx.get(proc.url + "/metrics").text
    for line in text.splitlines():
        if line.startswith("kubeinfer_invocation_errors_total{") and 'code="499"' in line \
                and 'endpoint="inline"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_client_leaving_mid_body_is_counted_and_the_server_goes_on(
        server: RuntimeProcess) -> None:
    before = _errors_499(server)
    raw = _post("/invocations", _json({"instances": ROWS}))
    sock, _ = _connect(server)
    sock.sendall(raw[:-5])
    time.sleep(0.1)
    sock.close()
    deadline = time.monotonic() + 5
    while _errors_499(server) != before + 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _errors_499(server) == before + 1
    r = httpx.post(server.url + "/invocations", json=ROWS)
    assert r.status_code == 200


def test_sigterm_while_a_body_is_half_sent_answers_it_then_closes(
        models_dir: Path, tmp_path: Path) -> None:
    proc = start_runtime("model-server", _env(models_dir), tmp_path)
    try:
        raw = _post("/invocations", _json({"instances": ROWS}))
        sock, reader = _connect(proc)
        with sock:
            sock.sendall(raw[:-5])
            time.sleep(0.2)
            proc.proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            assert proc.proc.poll() is None, "the server must wait for the request in flight"
            sock.sendall(raw[-5:])
            (r,) = reader.read(1)
            assert r.status == 200 and r.headers.get("connection") == "close"
            assert len(orjson.loads(r.body)["predictions"]["label"]) == 2
            assert reader.wait_closed()
        # uvicorn re-raises the SIGTERM it handled once it has shut down cleanly.
        assert proc.proc.wait(15) in (0, -signal.SIGTERM)
    finally:
        proc.stop()


# ------------------------------------------------------------------ the gateway
# InvokeEndpoint through the gateway is answered inline too, with the hop to
# the model server awaited in a task: pipelined requests must still come back
# in order behind a slow one, whichever path each takes.


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("inline-gateway")
    echo = start_fake_upstream("echo", tmp / "logs")
    gw = start_gateway(tmp)
    try:
        gw.publish({"echo": [("only", 1.0, [echo.url])]})
        yield gw
    finally:
        gw.proc.stop()
        echo.stop()


def _invoke(target: str, body: bytes, *headers: str) -> bytes:
    return _post(f"/endpoints/echo/{target}", body, *headers)


def test_gateway_pipelined_requests_come_back_in_order_behind_a_slow_one(
        gateway: Gateway) -> None:
    raw = (_invoke("invocations", b"1", "X-Amzn-SageMaker-Custom-Attributes: sleep=0.3")
           + _invoke("invocations", b"22")
           + _invoke("invocations?path=asgi", b"333",
                     "X-Amzn-SageMaker-Custom-Attributes: sleep=0.1")
           + _invoke("invocations", b"4444"))
    sock, reader = _connect(gateway.proc)
    with sock:
        sock.sendall(raw)
        got = reader.read(4)
    assert [r.status for r in got] == [200] * 4
    assert [orjson.loads(r.body)["body_len"] for r in got] == [1, 2, 3, 4]
    assert all(r.headers["x-amzn-invoked-production-variant"] == "only" for r in got)


@pytest.mark.parametrize("headers", [
    [],
    ["X-Amzn-SageMaker-Custom-Attributes: status=424"],
    ["X-Amzn-SageMaker-Target-Variant: nope"],
    ["Content-Type: text/csv", "Accept: text/csv", "X-Amzn-SageMaker-Inference-Id: i-1"],
], ids=["ok", "model-error", "unknown-variant", "forwarded-headers"])
def test_gateway_inline_and_asgi_paths_answer_alike(gateway: Gateway,
                                                    headers: list[str]) -> None:
    sock, reader = _connect(gateway.proc)
    with sock:
        sock.sendall(_invoke("invocations", b"[1]", *headers))
        (inline,) = reader.read(1)
        sock.sendall(_invoke("invocations?path=asgi", b"[1]", *headers))
        (asgi,) = reader.read(1)
    for r in (inline, asgi):
        r.headers.pop("date", None)
        if r.status == 200:
            r.body = orjson.dumps({k: v for k, v in orjson.loads(r.body).items()
                                   if k != "peer_port"})
    assert (inline.status, inline.headers, inline.body) == (asgi.status, asgi.headers, asgi.body)


def test_gateway_client_leaving_while_its_answer_is_in_flight(gateway: Gateway) -> None:
    sock, _ = _connect(gateway.proc)
    sock.sendall(_invoke("invocations", b"{}", "X-Amzn-SageMaker-Custom-Attributes: sleep=0.3"))
    time.sleep(0.05)
    sock.close()
    time.sleep(0.5)  # the hop finishes with nobody to answer
    r = httpx.post(gateway.url + "/endpoints/echo/invocations", content=b"{}")
    assert r.status_code == 200
    assert "Traceback" not in gateway.proc.log()


def test_the_switch_off_serves_every_request_through_asgi_alike(
        server: RuntimeProcess, models_dir: Path, tmp_path: Path) -> None:
    off = start_runtime("model-server", _env(models_dir, KUBEINFER_MAX_PAYLOAD_BYTES="4096",
                                             KUBEINFER_INLINE_HTTP="false"), tmp_path)
    try:
        raw = _post("/invocations", _json(ROWS)) + _post("/invocations", b"[[1,")
        answers = []
        for proc in (server, off):
            sock, reader = _connect(proc)
            with sock:
                sock.sendall(raw)
                got = reader.read(2)
            for r in got:
                r.headers.pop("date", None)
            answers.append([(r.status, r.headers, r.body) for r in got])
        assert answers[0] == answers[1]
        assert [a[0] for a in answers[1]] == [200, 400]
    finally:
        off.stop()
