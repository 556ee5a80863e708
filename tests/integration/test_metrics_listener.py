"""The metrics-only port of runtime processes (``KUBEINFER_METRICS_PORT``): GET /metrics and
nothing else, so a NetworkPolicy can open it to scrapers without opening inference."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.ports import free_port
from tests.support.procs import RuntimeProcess, start_runtime


@pytest.fixture(scope="module")
def servers(models_dir: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[dict[str, tuple[RuntimeProcess, int]]]:
    tmp = tmp_path_factory.mktemp("metrics-port")
    routes = tmp / "routes.json"
    routes.write_text('{"endpoints": {}}')
    out: dict[str, tuple[RuntimeProcess, int]] = {}
    try:
        port = free_port()
        out["model-server"] = (start_runtime("model-server", {
            "KUBEINFER_MODEL_URI": f"file://{models_dir / 'iris.onnx'}",
            "KUBEINFER_ENDPOINT_NAME": "iris", "KUBEINFER_VARIANT_NAME": "main",
            "KUBEINFER_METRICS_PORT": str(port)}, tmp / "logs"), port)
        port = free_port()
        out["gateway"] = (start_runtime("gateway", {
            "KUBEINFER_ROUTE_TABLE_PATH": str(routes), "KUBEINFER_METRICS_PORT": str(port)},
            tmp / "logs"), port)
        yield out
    finally:
        for proc, _ in out.values():
            proc.stop()


@pytest.mark.parametrize("role", ["model-server", "gateway"])
def test_the_metrics_port_serves_metrics_only(servers: dict[str, tuple[RuntimeProcess, int]],
                                              role: str) -> None:
    proc, port = servers[role]
    base = f"http://127.0.0.1:{port}"
    r = httpx.get(base + "/metrics")
    assert r.status_code == 200 and "kubeinfer_" in r.text
    for method, path in (("POST", "/invocations"), ("POST", "/endpoints/iris/invocations"),
                         ("GET", "/ping"), ("GET", "/routes"), ("POST", "/metrics")):
        refused = httpx.request(method, base + path, content=b'{"instances": [[1,2,3,4]]}')
        assert refused.status_code == 404, (method, path)
    assert httpx.get(proc.url + "/ping").status_code == 200  # the main port is unchanged


def test_a_client_that_never_finishes_its_request_is_dropped(
        servers: dict[str, tuple[RuntimeProcess, int]]) -> None:
    _, port = servers["model-server"]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # no blank line: never ends
        started = time.monotonic()
        assert sock.recv(1024) == b""  # closed by the server, not answered
        assert time.monotonic() - started < 9
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            sock.sendall(b"GET /metrics HTTP/1.1\r\n" + b"X: " + b"a" * 20_000
                         + b"\r\n\r\n")
            answer = sock.recv(1024)
        except (ConnectionResetError, BrokenPipeError):
            answer = b""  # closed while the rest was in flight: a reset, as well
        assert answer == b""  # a head over 8 KiB is not read


def test_connections_past_the_limit_are_closed_at_once(
        servers: dict[str, tuple[RuntimeProcess, int]]) -> None:
    """Idle connections (the port is open to any source by default) cannot take the
    process's file descriptors: past MAX_CONNECTIONS new ones are closed, not held."""
    from kubeinfer_runtime.metrics_listener import MAX_CONNECTIONS

    _, port = servers["gateway"]
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10)
            for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.3)  # all accepted, each waiting for its request head
        with socket.create_connection(("127.0.0.1", port), timeout=3) as extra:
            try:
                answer = extra.recv(1024)
            except ConnectionResetError:
                answer = b""
            assert answer == b""  # closed at once (not after the 5 s head timeout)
    finally:
        for sock in idle:
            sock.close()
    for _ in range(50):  # the idle ones gone, scrapes are served again
        try:
            if httpx.get(f"http://127.0.0.1:{port}/metrics").status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    else:
        raise AssertionError("the metrics port did not serve again")
