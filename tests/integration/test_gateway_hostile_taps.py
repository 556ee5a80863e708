"""The gateway's taps and headers against hostile callers and hostile model servers.

Real processes: a gateway, ``tests.support.fake_upstream`` (echoes the headers
that reached it) as production, and ``tests.support.hostile_upstream`` (answers
without end, sends headers without end, leaks cookies) as a shadow or as
production. The gateway's memory is read from ``/proc`` while it happens: a
shadow that answers 512 MiB made the gateway hold all of it (the 512Mi limit
of a gateway pod: an OOM kill, production down with it), now it holds one
answer's bound. Callers' InvokeEndpoint headers over SageMaker's limits or
sent twice are refused before anything is forwarded or captured; captured
bodies come back byte for byte from records that stay one per line.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kubeinfer_runtime.contract import EndpointRoute, RouteTable, VariantRoute
from kubeinfer_runtime.contract.capture import CaptureRoute
from kubeinfer_runtime.contract.shadow import ShadowRoute
from kubeinfer_runtime.gateway.upstream import ResponseTooLarge, UpstreamClient
from tests.support.fake_upstream import start_fake_upstream
from tests.support.hostile_upstream import start_hostile_upstream
from tests.support.metrics import metric
from tests.support.ports import wait_until
from tests.support.procs import RuntimeProcess, start_runtime

_revisions = itertools.count(1)
SECRET = "Sekr1t-Value"


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hostile-taps")


@pytest.fixture(scope="module")
def echo(logs: Path) -> Iterator[RuntimeProcess]:
    proc = start_fake_upstream("echo", logs)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def hostile(logs: Path) -> Iterator[RuntimeProcess]:
    proc = start_hostile_upstream(logs)
    yield proc
    proc.stop()


def _gateway(tmp_path: Path, route: EndpointRoute, **env: str) -> RuntimeProcess:
    routes = tmp_path / "routes.json"
    RouteTable(revision=next(_revisions), endpoints={route.name: route}).write_atomic(routes)
    return start_runtime("gateway", {
        "KUBEINFER_ROUTE_TABLE_PATH": str(routes),
        "KUBEINFER_ROUTE_RELOAD_INTERVAL_S": "0.1",
        "KUBEINFER_HEALTH_INTERVAL_S": "0.2",
        "KUBEINFER_CAPTURE_FLUSH_INTERVAL_S": "0.2", **env}, tmp_path / "logs")


def _rss_mib(proc: RuntimeProcess) -> float:
    with open(f"/proc/{proc.proc.pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


class PeakRss:
    """The largest resident size of a process while the block runs (sampled)."""

    def __init__(self, proc: RuntimeProcess) -> None:
        self.proc = proc
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_mib(self.proc))
            time.sleep(0.02)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _invoke(client: httpx.Client, gateway: RuntimeProcess, endpoint: str = "e",
            headers: list[tuple[str, str | bytes]] | None = None,
            body: bytes = b"1,2\n") -> httpx.Response:
    return client.post(f"{gateway.url}/endpoints/{endpoint}/invocations", content=body,
                       headers=headers if headers is not None else [("content-type",
                                                                     "text/csv")])


def test_a_shadow_answering_without_end_costs_the_gateway_a_bound_not_its_memory(
        tmp_path: Path, echo: RuntimeProcess, hostile: RuntimeProcess) -> None:
    gateway = _gateway(tmp_path, EndpointRoute(
        name="e", variants=[VariantRoute(name="primary", weight=1, upstreams=[echo.url])],
        shadows=[ShadowRoute(name="evil", upstreams=[hostile.url], timeout_s=30,
                             concurrency=2)]))
    try:
        before = _rss_mib(gateway)
        n = 0
        with PeakRss(gateway) as rss, httpx.Client(timeout=10) as client:
            for mode in ("huge", "chunked", "headers"):
                for _ in range(4):
                    r = _invoke(client, gateway, headers=[
                        ("content-type", "text/csv"),
                        ("x-amzn-sagemaker-custom-attributes", f"mode={mode}")])
                    assert r.status_code == 200 and r.json()["name"] == "echo"
                    n += 1
            # Each copy fails as soon as the answer passes its bound (1 MiB here: twice
            # production's answer, at least 1 MiB), long before the shadow's 30 s timeout.
            try:
                wait_until(lambda: metric(gateway.url, "kubeinfer_shadow_copies_total",
                                           peer="evil", result="failed") == n, 20,
                           "every copy to the hostile shadow failed")
            except TimeoutError:
                raise AssertionError(f"copies still being read after 20 s; the gateway "
                                     f"grew by {rss.peak - before:.0f} MiB") from None
        assert rss.peak - before < 96, (before, rss.peak)
        assert metric(gateway.url, "kubeinfer_shadow_errors_total", peer="evil",
                       side="peer") == n
        with httpx.Client(timeout=10) as client:  # production never noticed
            assert _invoke(client, gateway).status_code == 200
    finally:
        gateway.stop()


def test_a_production_answer_over_the_bound_is_a_model_error(
        tmp_path: Path, hostile: RuntimeProcess) -> None:
    gateway = _gateway(tmp_path, EndpointRoute(name="e", variants=[VariantRoute(
        name="primary", weight=1, upstreams=[hostile.url])]),
        KUBEINFER_MAX_RESPONSE_BYTES=str(4 << 20))
    try:
        before = _rss_mib(gateway)
        with PeakRss(gateway) as rss, httpx.Client(timeout=30) as client:
            for mode, bound in (("huge", "4194304 bytes"), ("chunked", "4194304 bytes"),
                                ("headers", "65536 bytes of headers")):
                r = _invoke(client, gateway, headers=[
                    ("content-type", "text/csv"),
                    ("x-amzn-sagemaker-custom-attributes", f"mode={mode}")])
                assert r.status_code == 424, (mode, r.text)
                assert r.headers["x-amzn-errortype"].startswith("ModelError")
                message = r.json()["Message"]
                assert bound in message and "KUBEINFER_MAX_RESPONSE_BYTES" in message
            # The model server stays in rotation: the next answer is served.
            assert _invoke(client, gateway).status_code == 200
        assert rss.peak - before < 96, (before, rss.peak)
    finally:
        gateway.stop()


def test_a_caller_that_never_reads_its_answer_is_cut_and_the_answer_freed(
        tmp_path: Path, hostile: RuntimeProcess) -> None:
    """A 20 MiB answer to a caller that never reads: the kernel takes a few MB, the rest
    waited in the gateway's memory for as long as the caller kept the connection open.
    Now a caller that takes none of it for KUBEINFER_HTTP_SEND_TIMEOUT_S is cut."""
    gateway = _gateway(tmp_path, EndpointRoute(name="e", variants=[VariantRoute(
        name="primary", weight=1, upstreams=[hostile.url])]),
        KUBEINFER_HTTP_SEND_TIMEOUT_S="2")
    try:
        with _asks_for_a_big_answer(gateway) as sock:
            wait_until(lambda: _counter(gateway, "kubeinfer_http_send_stalled_connections_total")
                       == 1, 30, "the gateway to cut the caller that reads nothing")
            received = _drain(sock)
        assert received < 20 << 20  # cut, not delivered late
        with httpx.Client(timeout=10) as client:  # the gateway serves on
            assert _invoke(client, gateway).status_code == 200
    finally:
        gateway.stop()


def test_answers_waiting_for_slow_readers_count_against_the_processes_bound(
        tmp_path: Path, hostile: RuntimeProcess) -> None:
    """A caller that reads a byte just inside every send timeout is never stalled, and
    each of its connections held an answer for hours. Answers waiting to be sent count
    against KUBEINFER_HTTP_MAX_BODY_BYTES_HELD: over it, that caller's connection is cut
    (here one 20 MiB answer over an 8 MiB bound), and others are served on."""
    gateway = _gateway(tmp_path, EndpointRoute(name="e", variants=[VariantRoute(
        name="primary", weight=1, upstreams=[hostile.url])]),
        KUBEINFER_HTTP_SEND_TIMEOUT_S="300", KUBEINFER_HTTP_MAX_BODY_BYTES_HELD=str(8 << 20))
    try:
        with _asks_for_a_big_answer(gateway) as sock:
            wait_until(lambda: _counter(gateway, "kubeinfer_http_answers_cut_total") == 1, 30,
                       "the gateway to cut the answer over its bound")
            assert _counter(gateway, "kubeinfer_http_send_stalled_connections_total") == 0
            received = _drain(sock)
        assert received < 20 << 20
        with httpx.Client(timeout=10) as client:
            assert _invoke(client, gateway).status_code == 200
    finally:
        gateway.stop()


def _asks_for_a_big_answer(gateway: RuntimeProcess) -> socket.socket:
    """A connection that asked for the hostile upstream's 20 MiB answer and, with a 4 KiB
    receive buffer, takes almost none of it until read."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(30)
    sock.connect(("127.0.0.1", gateway.port))
    sock.sendall(b"POST /endpoints/e/invocations HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Type: text/csv\r\nX-Amzn-SageMaker-Custom-Attributes: mode=big\r\n"
                 b"Content-Length: 4\r\n\r\n1,2\n")
    return sock


def _drain(sock: socket.socket) -> int:
    """Bytes read until the connection ends (cut or closed)."""
    received = 0
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(1 << 20):
            received += len(chunk)
    return received


def _counter(gateway: RuntimeProcess, name: str) -> float:
    for line in httpx.get(gateway.url + "/metrics", timeout=5).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} is not exported")


def test_the_model_servers_own_headers_never_reach_the_caller(
        tmp_path: Path, hostile: RuntimeProcess) -> None:
    gateway = _gateway(tmp_path, EndpointRoute(name="e", variants=[VariantRoute(
        name="primary", weight=1, upstreams=[hostile.url])]))
    try:
        with httpx.Client(timeout=10) as client:
            r = _invoke(client, gateway, headers=[
                ("content-type", "text/csv"),
                ("x-amzn-sagemaker-custom-attributes", "mode=cookies")])
        assert r.status_code == 200 and r.json() == {"ok": 1}
        assert "set-cookie" not in r.headers and "x-internal-token" not in r.headers
        assert "strict-transport-security" not in r.headers
        assert r.headers.get("server") != "evil/1.0"
        assert r.headers["x-amzn-sagemaker-custom-attributes"] == "echo"
        assert r.headers["x-amzn-invoked-production-variant"] == "primary"
    finally:
        gateway.stop()


def test_invoke_endpoint_headers_are_held_to_sagemakers_limits(
        tmp_path: Path, echo: RuntimeProcess) -> None:
    captures = tmp_path / "captures"
    gateway = _gateway(tmp_path, EndpointRoute(
        name="e", variants=[VariantRoute(name="primary", weight=1, upstreams=[echo.url])],
        capture=CaptureRoute(destination=f"file://{captures}", sampling_percentage=100)))
    secret = SECRET
    refused: list[list[tuple[str, str | bytes]]] = [
        [("content-type", "text/csv"), ("content-type", "application/json")],
        [("content-type", "text/csv"), ("x-amzn-sagemaker-custom-attributes", "a=1"),
         ("x-amzn-sagemaker-custom-attributes", "b=2")],
        [("content-type", "text/csv"), ("x-amzn-sagemaker-inference-id", secret),
         ("x-amzn-sagemaker-inference-id", "other")],
        [("content-type", "text/csv"), ("x-amzn-sagemaker-custom-attributes", secret * 100)],
        [("content-type", "text/csv"),
         ("x-amzn-sagemaker-custom-attributes", secret.encode() + b"\xc3\xa9")],
        [("content-type", "text/csv"), ("x-amzn-sagemaker-inference-id", secret * 6)],
        [("content-type", "text/csv"), ("x-amzn-sagemaker-target-variant", secret + "_x")],
        [("content-type", "text/csv"),
         ("x-amzn-sagemaker-target-container-hostname", secret + ".x")],
    ]
    try:
        with httpx.Client(timeout=10) as client:
            for headers in refused:
                r = _invoke(client, gateway, headers=headers)
                assert r.status_code == 400, (headers, r.text)
                assert r.json()["ErrorCode"] == "ValidationError"
                assert "Header " in r.json()["Message"] and secret not in r.text
            # What boto3 sends at SageMaker's limits is served and captured as sent; the
            # hop-by-hop and signing headers stay at the gateway.
            custom, inference = "c=" + "x" * 1022, "req-" + "9" * 60
            r = _invoke(client, gateway, headers=[
                ("content-type", "text/csv"), ("accept", "application/json"),
                ("x-amzn-sagemaker-custom-attributes", custom),
                ("x-amzn-sagemaker-inference-id", inference),
                ("x-forwarded-for", "10.0.0.1"), ("forwarded", "for=10.0.0.1"),
                ("x-forwarded-host", "evil"), ("cookie", "session=1"),
                ("authorization", "Bearer nope"), ("x-amz-date", "20260101T000000Z")])
            assert r.status_code == 200
            assert set(r.json()["headers"]) == {
                "host", "content-length", "content-type", "accept",
                "x-amzn-sagemaker-custom-attributes", "x-amzn-sagemaker-inference-id"}
        assert metric(gateway.url, "kubeinfer_gateway_invocations_total", endpoint="e") == 1
        wait_until(lambda: metric(gateway.url, "kubeinfer_capture_records_total",
                                   result="written") == 1, 10, "the one record written")
        [path] = [p for p in captures.rglob("*.jsonl")]
        [line] = path.read_bytes().splitlines()
        meta = json.loads(line)["eventMetadata"]
        assert (meta["customAttributes"], meta["inferenceId"]) == (custom, inference)
    finally:
        gateway.stop()


def test_target_variant_never_reaches_a_shadow_or_a_green_fleet(
        tmp_path: Path, echo: RuntimeProcess, hostile: RuntimeProcess) -> None:
    gateway = _gateway(tmp_path, EndpointRoute(name="e", variants=[
        VariantRoute(name="primary", weight=1, upstreams=[echo.url]),
        VariantRoute(name="primary-green", weight=0, upstreams=[echo.url],
                     production_variant="primary")],
        shadows=[ShadowRoute(name="cand", upstreams=[hostile.url], sampling_percentage=0)]))
    count = int(httpx.get(hostile.url + "/count", timeout=5).text)
    try:
        with httpx.Client(timeout=10) as client:
            for target in ("cand", "primary-green"):
                r = _invoke(client, gateway, headers=[
                    ("content-type", "text/csv"),
                    ("x-amzn-sagemaker-target-variant", target)])
                assert r.status_code == 404, (target, r.text)
                assert "set TargetVariant to one of primary" in r.json()["Message"]
            r = _invoke(client, gateway, headers=[
                ("content-type", "text/csv"), ("x-amzn-sagemaker-target-variant", "primary")])
            assert r.status_code == 200
            assert r.headers["x-amzn-invoked-production-variant"] == "primary"
        assert int(httpx.get(hostile.url + "/count", timeout=5).text) == count
    finally:
        gateway.stop()


def test_captured_bodies_come_back_byte_for_byte_one_record_per_line(
        tmp_path: Path, echo: RuntimeProcess) -> None:
    captures = tmp_path / "captures"
    gateway = _gateway(tmp_path, EndpointRoute(
        name="e", variants=[VariantRoute(name="primary", weight=1, upstreams=[echo.url])],
        capture=CaptureRoute(destination=f"file://{captures}", sampling_percentage=100,
                             capture_output=False)))
    bodies = {
        "plain": (b'{"x": [1, 2]}\n', "JSON"),
        "newlines": (b'{"x": "a\\nb"}\n\n{"forged": 1}\n', "JSON"),
        "nul and quotes": (b'{"q": "say \\"hi\\"", "nul": "\x00", "pad": "' + b"a" * 40
                           + b'"}', "JSON"),
        "controls": (b"\x01" * (64 << 10), "BASE64"),   # JSON would be 6x: 384 KiB
        "not utf-8": (b"\xff\xfe{}", "BASE64"),
        "lone surrogate": (b'{"s": "\xed\xa0\x80"}', "BASE64"),
    }
    try:
        with httpx.Client(timeout=10) as client:
            for i, (body, _) in enumerate(bodies.values()):
                r = _invoke(client, gateway, headers=[
                    ("content-type", "application/json"),
                    ("x-amzn-sagemaker-inference-id", f"req-{i}")], body=body)
                assert r.status_code == 200
        wait_until(lambda: metric(gateway.url, "kubeinfer_capture_records_total",
                                   result="written") == len(bodies), 10, "every record written")
    finally:
        gateway.stop()
    lines = [line for p in captures.rglob("*.jsonl") for line in p.read_bytes().splitlines()]
    assert len(lines) == len(bodies)
    by_id = {json.loads(line)["eventMetadata"]["inferenceId"]: line for line in lines}
    for i, (name, (body, encoding)) in enumerate(bodies.items()):
        line = by_id[f"req-{i}"]
        data = json.loads(line)["captureData"]["endpointInput"]
        assert data["encoding"] == encoding, name
        back = (base64.b64decode(data["data"]) if encoding == "BASE64"
                else data["data"].encode("utf-8"))
        assert back == body, name
        assert len(line) < 2 * len(body) + 1024, name


def test_hostile_header_values_make_no_metric_series(
        tmp_path: Path, echo: RuntimeProcess) -> None:
    gateway = _gateway(tmp_path, EndpointRoute(name="e", variants=[VariantRoute(
        name="primary", weight=1, upstreams=[echo.url])]))

    def series() -> set[str]:
        text = httpx.get(gateway.url + "/metrics", timeout=5).text
        return {line.rsplit(" ", 1)[0] for line in text.splitlines()
                if line.startswith("kubeinfer_") and "_created" not in line}

    try:
        with httpx.Client(timeout=10) as client:
            for endpoint in ("e", "nope"):  # every code path once: its series exist
                _invoke(client, gateway, endpoint)
                _invoke(client, gateway, endpoint, headers=[
                    ("content-type", "text/csv"), ("x-amzn-sagemaker-target-variant", "zz")])
                _invoke(client, gateway, endpoint, headers=[
                    ("content-type", "text/csv"), ("accept", b"\xff")])
            known = series()
            for i in range(30):
                for endpoint in ("e", f"nope-{i}"):
                    _invoke(client, gateway, endpoint, headers=[
                        ("content-type", f"text/x-{i}"), ("accept", f"a/{i}"),
                        ("x-amzn-sagemaker-target-variant", f"v{i}"),
                        ("x-amzn-sagemaker-target-model", f"m{i}.tar.gz"),
                        ("x-amzn-sagemaker-target-container-hostname", f"c{i}"),
                        ("x-amzn-sagemaker-inference-id", f"id-{i}"),
                        ("x-amzn-sagemaker-custom-attributes", f"k={i}")])
                    _invoke(client, gateway, endpoint, headers=[
                        ("content-type", "text/csv"), ("accept", b"\xff%d" % i)])
        assert series() == known
    finally:
        gateway.stop()


def test_the_upstream_client_reads_answers_within_bounds(hostile: RuntimeProcess) -> None:
    """The client under both taps: each bound fails the request at once with
    ResponseTooLarge (never ConnectionLost: the model server stays in rotation)."""
    import asyncio

    async def run() -> None:
        client = UpstreamClient(max_response_bytes=2 << 20)
        try:
            for mode, limit in (("huge", None), ("chunked", None), ("huge", 1 << 20),
                                ("headers", None)):
                started = time.monotonic()
                with pytest.raises(ResponseTooLarge) as caught:
                    await client.request(hostile.url, b"POST", b"/invocations", [
                        (b"x-amzn-sagemaker-custom-attributes", f"mode={mode}".encode())],
                        b"", 20.0, max_body=limit)
                assert time.monotonic() - started < 5
                assert caught.value.url == hostile.url
                want = ("headers" if mode == "headers" else
                        f"more than {limit or 2 << 20} bytes")
                assert want in caught.value.detail
            ok = await client.request(hostile.url, b"POST", b"/invocations", [], b"", 5.0)
            assert ok.status == 200 and ok.body == b'{"ok": 1}'
        finally:
            await client.close()

    asyncio.run(run())
