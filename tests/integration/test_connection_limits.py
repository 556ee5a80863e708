"""Hostile connections against real runtime processes: every bound of ``http_limits``.

Each case is what a hostile or broken client did to the code before: connections that never
finish their request, slow headers, bodies shorter than their Content-Length, one huge
header, 100,000 headers, unfinished 8 MB headers on many connections, and enough idle
connections to exhaust a 1,024 file-descriptor limit. Checked on the model server (inline
and ASGI paths) and the gateway, with raw sockets: the server answers 431/408/503 (or closes
a connection that never spoke), stays small, and keeps serving normal requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kubeinfer_runtime.contract import EndpointRoute, RouteTable, VariantRoute
from kubeinfer_runtime.http_limits import bytes_acked
from tests.support.fake_upstream import start_fake_upstream
from tests.support.limited_protocol import answering
from tests.support.procs import RuntimeProcess, start_runtime

BODY = json.dumps({"instances": [[5.1, 3.5, 1.4, 0.2]]}).encode()
LIMITS = {"KUBEINFER_HTTP_HEADER_TIMEOUT_S": "1", "KUBEINFER_HTTP_BODY_TIMEOUT_S": "1",
          "KUBEINFER_HTTP_KEEPALIVE_TIMEOUT_S": "1", "KUBEINFER_HTTP_BODY_MIN_RATE_BYTES_S": "2000"}


@pytest.fixture(scope="module")
def servers(models_dir: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[dict[str, tuple[RuntimeProcess, str]]]:
    """role -> (process, inference path)."""
    with _three_roles(models_dir, tmp_path_factory.mktemp("limits"), LIMITS) as out:
        yield out


@contextlib.contextmanager
def _three_roles(models_dir: Path, tmp: Path, env: dict[str, str]
                 ) -> Iterator[dict[str, tuple[RuntimeProcess, str]]]:
    """A model server (inline and ASGI paths) and a gateway in front of it, with ``env``."""
    model = {"KUBEINFER_MODEL_URI": f"file://{models_dir / 'iris.onnx'}",
             "KUBEINFER_ENDPOINT_NAME": "iris", "KUBEINFER_VARIANT_NAME": "main", **env}
    out: dict[str, tuple[RuntimeProcess, str]] = {}
    try:
        ms = start_runtime("model-server", model, tmp / "logs")
        out["model-server"] = (ms, "/invocations")
        asgi = start_runtime("model-server", {**model, "KUBEINFER_INLINE_HTTP": "false"},
                             tmp / "logs")
        out["model-server (ASGI path)"] = (asgi, "/invocations")
        routes = tmp / "routes.json"
        RouteTable(endpoints={"iris": EndpointRoute(name="iris", variants=[
            VariantRoute(name="main", weight=1, upstreams=[ms.url])])}).write_atomic(routes)
        gw = start_runtime("gateway", {"KUBEINFER_ROUTE_TABLE_PATH": str(routes), **env},
                           tmp / "logs")
        out["gateway"] = (gw, "/endpoints/iris/invocations")
        yield out
    finally:
        for proc, _ in out.values():
            proc.stop()


ROLES = ["model-server", "model-server (ASGI path)", "gateway"]


def rss_mb(proc: RuntimeProcess) -> float:
    for line in Path(f"/proc/{proc.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def connect(proc: RuntimeProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", proc.port), timeout=15)


def read_reply(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (b"" when it closed without a word)."""
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except (ConnectionResetError, BrokenPipeError):
        pass
    return b"".join(chunks)


def send_all(sock: socket.socket, data: bytes) -> None:
    with contextlib.suppress(ConnectionResetError, BrokenPipeError):
        sock.sendall(data)  # refused midway: the reply says why


def post_head(path: str, length: int, extra: str = "") -> bytes:
    """The head of a JSON POST declaring ``length`` bytes of body."""
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n{extra}\r\n").encode()


def assert_serves(proc: RuntimeProcess, path: str) -> None:
    r = httpx.post(proc.url + path, content=BODY, headers={"Content-Type": "application/json"},
                   timeout=10)
    assert r.status_code == 200, r.text


def status_of(reply: bytes) -> int:
    assert reply.startswith(b"HTTP/1.1 "), reply[:200]
    return int(reply.split(b" ", 2)[1])


@pytest.mark.parametrize("role", ROLES)
def test_a_silent_connection_is_closed(servers: dict[str, tuple[RuntimeProcess, str]],
                                       role: str) -> None:
    proc, _ = servers[role]
    with connect(proc) as sock:
        started = time.monotonic()
        assert read_reply(sock) == b""
        assert time.monotonic() - started < 10


@pytest.mark.parametrize("role", ROLES)
def test_slow_headers_get_408(servers: dict[str, tuple[RuntimeProcess, str]],
                              role: str) -> None:
    proc, path = servers[role]
    with connect(proc) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\n".encode())
        started = time.monotonic()
        for _ in range(20):  # one header every 0.2 s: never done within the timeout
            try:
                sock.sendall(b"X-Slow: 1\r\n")
            except (ConnectionResetError, BrokenPipeError):
                break
            time.sleep(0.2)
            if time.monotonic() - started > 3:
                break
        reply = read_reply(sock)
    assert status_of(reply) == 408
    assert b"KUBEINFER_HTTP_HEADER_TIMEOUT_S" in reply and b"connection: close" in reply
    assert_serves(proc, path)


@pytest.mark.parametrize("role", ROLES)
def test_a_body_shorter_than_its_length_gets_408(
        servers: dict[str, tuple[RuntimeProcess, str]], role: str) -> None:
    proc, path = servers[role]
    with connect(proc) as sock:
        sock.sendall(post_head(path, len(BODY) + 50) + BODY)
        started = time.monotonic()
        reply = read_reply(sock)
    assert status_of(reply) == 408 and b"KUBEINFER_HTTP_BODY_TIMEOUT_S" in reply
    assert time.monotonic() - started < 10
    assert_serves(proc, path)


@pytest.mark.parametrize("role", ROLES)
def test_a_body_trickled_inside_every_silence_gets_408(
        servers: dict[str, tuple[RuntimeProcess, str]], role: str) -> None:
    # 50 bytes every 0.3 s: never a second of silence, so only the body's average rate
    # (166 bytes/s against 2,000) ends it: 2 s + its bytes / 2,000 after it began.
    proc, path = servers[role]
    with connect(proc) as sock:
        sock.sendall(post_head(path, 1_000_000))
        started = time.monotonic()
        sock.settimeout(0.3)
        reply = b""
        while time.monotonic() - started < 20:
            try:
                reply = sock.recv(65536)
                break  # the refusal (or a close)
            except TimeoutError:
                send_all(sock, b" " * 50)
        sock.settimeout(15)
        reply += read_reply(sock)
    assert status_of(reply) == 408 and b"KUBEINFER_HTTP_BODY_MIN_RATE_BYTES_S" in reply
    assert time.monotonic() - started < 20
    assert_serves(proc, path)


@pytest.mark.parametrize("role", ROLES)
def test_a_slow_body_above_the_rate_is_served(
        servers: dict[str, tuple[RuntimeProcess, str]], role: str) -> None:
    # 2.4 s of body (past the 1 s silence and 1 s rate grace), at ~8 KB/s: served.
    proc, path = servers[role]
    body = json.dumps({"instances": [[5.1, 3.5, 1.4, 0.2]] * 900}).encode()
    pieces = [body[i:i + len(body) // 12 + 1] for i in range(0, len(body), len(body) // 12 + 1)]
    with connect(proc) as sock:
        sock.sendall(post_head(path, len(body), "Connection: close\r\n"))
        for piece in pieces:
            time.sleep(0.2)  # the slow client under test, not a wait for a condition
            sock.sendall(piece)
        reply = read_reply(sock)
    assert status_of(reply) == 200, reply[:300]


@pytest.mark.parametrize("role", ROLES)
def test_one_huge_header_gets_431_without_being_buffered(
        servers: dict[str, tuple[RuntimeProcess, str]], role: str) -> None:
    proc, path = servers[role]
    before = rss_mb(proc)
    with connect(proc) as sock:
        send_all(sock, f"POST {path} HTTP/1.1\r\nHost: x\r\nX-Big: ".encode()
                 + b"a" * (8 << 20) + b"\r\n\r\n")
        reply = read_reply(sock)
    assert status_of(reply) == 431 and b"KUBEINFER_HTTP_MAX_HEADER" in reply
    assert rss_mb(proc) - before < 30
    assert_serves(proc, path)


@pytest.mark.parametrize("role", ROLES)
def test_too_many_headers_get_431(servers: dict[str, tuple[RuntimeProcess, str]],
                                  role: str) -> None:
    proc, path = servers[role]
    with connect(proc) as sock:
        send_all(sock, f"POST {path} HTTP/1.1\r\nHost: x\r\n".encode()
                 + b"X-A: 1\r\n" * 100_000 + b"\r\n")
        reply = read_reply(sock)
    assert status_of(reply) == 431
    assert b"KUBEINFER_HTTP_MAX_HEADER" in reply  # the count or the total, whichever first
    with connect(proc) as sock:
        sock.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n"
                     + b"X-A: 1\r\n" * 101 + b"\r\n")
        reply = read_reply(sock)
    assert status_of(reply) == 431 and b"KUBEINFER_HTTP_MAX_HEADERS" in reply
    assert_serves(proc, path)


@pytest.mark.parametrize("role", ROLES)
def test_unfinished_huge_headers_on_many_connections_stay_bounded(
        servers: dict[str, tuple[RuntimeProcess, str]], role: str) -> None:
    proc, path = servers[role]
    before = rss_mb(proc)
    socks = [connect(proc) for _ in range(40)]
    try:
        for sock in socks:  # 8 MB each, never finished
            send_all(sock, f"POST {path} HTTP/1.1\r\nHost: x\r\nX-Big: ".encode()
                     + b"a" * (8 << 20))
        assert rss_mb(proc) - before < 50
        replies = [read_reply(sock) for sock in socks]
        assert all(status_of(r) == 431 for r in replies if r)
    finally:
        for sock in socks:
            sock.close()
    assert_serves(proc, path)


@pytest.mark.parametrize("role", ["model-server", "gateway"])
def test_an_idle_kept_alive_connection_is_closed(
        servers: dict[str, tuple[RuntimeProcess, str]], role: str) -> None:
    proc, _ = servers[role]
    with connect(proc) as sock:
        sock.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
        started = time.monotonic()
        reply = read_reply(sock)  # the answer, then the close after the keep-alive timeout
    assert status_of(reply) == 200
    assert 0.5 < time.monotonic() - started < 10


def test_idle_connections_cannot_exhaust_the_descriptors(
        models_dir: Path, tmp_path: Path) -> None:
    """A 1,024 fd limit and 1,100 idle connections: normal requests still succeed."""
    proc = start_runtime("model-server", {
        "KUBEINFER_MODEL_URI": f"file://{models_dir / 'iris.onnx'}",
        "KUBEINFER_ENDPOINT_NAME": "iris", "KUBEINFER_VARIANT_NAME": "main",
        # Idle connections must stay open through the test: only the cap closes them.
        "KUBEINFER_HTTP_HEADER_TIMEOUT_S": "300"}, tmp_path / "logs", open_files=1024)
    socks: list[socket.socket] = []
    try:
        for _ in range(1100):
            socks.append(socket.create_connection(("127.0.0.1", proc.port), timeout=15))
        ok = 0
        with httpx.Client(timeout=10) as client:
            for _ in range(35):
                r = client.post(proc.url + "/invocations", content=BODY,
                                headers={"Content-Type": "application/json"})
                ok += r.status_code == 200
        assert ok == 35
        assert proc.proc.poll() is None
    finally:
        for sock in socks:
            sock.close()
        proc.stop()


# -- the bound on request bytes a process holds (KUBEINFER_HTTP_MAX_BODY_BYTES_HELD)

HELD_LIMIT = 1 << 20
#: A valid JSON request padded with trailing spaces to exactly this many bytes.
PADDED = 1_000_000


def padded_body() -> bytes:
    return BODY + b" " * (PADDED - len(BODY))


@pytest.fixture(scope="module")
def held_servers(models_dir: Path, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[dict[str, tuple[RuntimeProcess, str]]]:
    """The three roles holding at most 1 MiB of requests each. The body timeout is long:
    an upload must stay held until the test refuses it, however loaded the machine."""
    with _three_roles(models_dir, tmp_path_factory.mktemp("held"), {
            "KUBEINFER_HTTP_MAX_BODY_BYTES_HELD": str(HELD_LIMIT),
            "KUBEINFER_HTTP_BODY_TIMEOUT_S": "300"}) as out:
        yield out


def held_metrics(proc: RuntimeProcess) -> dict[str, float]:
    text = httpx.get(proc.url + "/metrics", timeout=10).text
    names = ("kubeinfer_http_request_bytes_held", "kubeinfer_http_request_bytes_held_limit",
             "kubeinfer_http_uploads_refused_total")
    found = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
             if line.split(" ", 1)[0] in names}
    assert set(found) == set(names), found
    return found


@pytest.mark.parametrize("role", ROLES)
def test_the_oldest_upload_is_refused_when_the_process_holds_its_bound(
        held_servers: dict[str, tuple[RuntimeProcess, str]], role: str) -> None:
    """Two uploads of 600 KB held against a 1 MiB bound: the older gets 503 naming the
    setting, the newer completes and is answered, and nothing stays counted after."""
    proc, path = held_servers[role]
    before = held_metrics(proc)
    assert before["kubeinfer_http_request_bytes_held_limit"] == HELD_LIMIT
    body = padded_body()
    with connect(proc) as old, connect(proc) as new:
        old.sendall(post_head(path, PADDED) + body[:600_000])
        # Condition, not a sleep: the server has read the older upload (the scrape's own
        # request is a few hundred bytes).
        deadline = time.monotonic() + 30
        while held_metrics(proc)["kubeinfer_http_request_bytes_held"] < 600_000:
            assert time.monotonic() < deadline, "the server never read the first upload"
            time.sleep(0.02)
        new.sendall(post_head(path, PADDED, "Connection: close\r\n") + body[:600_000])
        refused = read_reply(old)
        assert status_of(refused) == 503, refused[:300]
        assert b"KUBEINFER_HTTP_MAX_BODY_BYTES_HELD" in refused
        new.sendall(body[600_000:])
        answer = read_reply(new)
    assert status_of(answer) == 200, answer[:300]
    assert b"predictions" in answer
    after = held_metrics(proc)
    assert after["kubeinfer_http_uploads_refused_total"] == \
        before["kubeinfer_http_uploads_refused_total"] + 1
    assert after["kubeinfer_http_request_bytes_held"] < 4096  # this scrape alone
    assert_serves(proc, path)


@pytest.mark.parametrize("role", ROLES)
def test_many_large_uploads_cannot_hold_more_than_the_bound(
        held_servers: dict[str, tuple[RuntimeProcess, str]], role: str) -> None:
    """Sixty uploads of 900 KB, each a byte short of its Content-Length (54 MB, held
    for hours at the minimum rate without the bound): the process holds at most 1 MiB,
    every older upload is refused with 503, and normal requests are served meanwhile."""
    proc, path = held_servers[role]
    body = padded_body()
    refused_before = held_metrics(proc)["kubeinfer_http_uploads_refused_total"]
    rss_before = rss_mb(proc)
    socks = [connect(proc) for _ in range(60)]
    try:
        for sock in socks:
            send_all(sock, post_head(path, PADDED) + body[:900_000])
        deadline = time.monotonic() + 60
        while held_metrics(proc)["kubeinfer_http_uploads_refused_total"] < refused_before + 59:
            assert time.monotonic() < deadline, held_metrics(proc)
            time.sleep(0.05)
        metrics = held_metrics(proc)
        assert metrics["kubeinfer_http_request_bytes_held"] <= HELD_LIMIT
        assert rss_mb(proc) - rss_before < 25
        # Which upload stays is the server's order of reading them, not the test's of
        # sending: the 59 refused ones have their answer (and the close) waiting.
        answered: list[socket.socket] = []
        while len(answered) < 59:
            assert time.monotonic() < deadline, f"{len(answered)} answered"
            answered = select.select(socks, [], [], 1)[0]
        replies = [read_reply(sock) for sock in answered]
        assert all(status_of(r) == 503 for r in replies), [r[:100] for r in replies]
        assert len(answered) == 59  # the one left holds its 900 KB, under the bound
        assert_serves(proc, path)
    finally:
        for sock in socks:
            sock.close()


def test_a_request_pipelined_behind_an_answer_in_flight_is_never_answered_out_of_turn(
        tmp_path: Path) -> None:
    """A connection's first request is with a slow model and a second is pipelined behind
    it, part of its body read. That connection began uploading first, but a 503 written
    for the second would arrive as the first one's answer: it is not refused (uvicorn has
    stopped reading it, so it holds one read); the upload that crosses the bound is."""
    echo = start_fake_upstream("echo", tmp_path / "logs")
    routes = tmp_path / "routes.json"
    RouteTable(endpoints={"e": EndpointRoute(name="e", variants=[
        VariantRoute(name="main", weight=1, upstreams=[echo.url])])}).write_atomic(routes)
    gw = start_runtime("gateway", {"KUBEINFER_ROUTE_TABLE_PATH": str(routes),
                                   "KUBEINFER_HTTP_MAX_BODY_BYTES_HELD": str(HELD_LIMIT),
                                   "KUBEINFER_HTTP_BODY_TIMEOUT_S": "300"}, tmp_path / "logs")
    path = "/endpoints/e/invocations"
    try:
        with connect(gw) as piped, connect(gw) as crossing:
            slow = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: text/csv\r\n"
                    "X-Amzn-SageMaker-Custom-Attributes: sleep=2\r\n"
                    "Content-Length: 4\r\n\r\n1,2\n").encode()
            piped.sendall(slow + post_head(path, PADDED) + b" " * 50_000)
            deadline = time.monotonic() + 30
            while held_metrics(gw)["kubeinfer_http_request_bytes_held"] < 20_000:
                assert time.monotonic() < deadline, "the gateway never read the pipelined part"
                time.sleep(0.02)
            # Within the bound alone, over it with what the pipelined request holds; a
            # byte short, so it is still an upload when it crosses.
            crossing.sendall(post_head(path, HELD_LIMIT - 10_000)
                             + BODY + b" " * (HELD_LIMIT - 10_001 - len(BODY)))
            refused = read_reply(crossing)
            assert status_of(refused) == 503 and b"KUBEINFER_HTTP_MAX_BODY_BYTES_HELD" in refused
            piped.settimeout(30)
            first = piped.recv(65536)
        assert status_of(first) == 200, first[:300]  # the slow request's own answer
        assert b"echo" in first
    finally:
        gw.stop()
        echo.stop()


def test_a_slow_reader_behind_the_kernels_queue_is_never_cut() -> None:
    """``_send_stalled`` over a real TCP connection: a peer reading a few kilobytes at a
    time leaves the transport's buffer as it is (the kernel takes more from it only once
    a third of its own queue is free), but it acknowledges what it reads: that is taken.
    A peer that stops reading acknowledges nothing more and is cut."""
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect(listener.getsockname())
    server, _ = listener.accept()
    listener.close()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    server.setblocking(False)
    client.setblocking(False)

    def fill() -> None:
        """The app's next chunks: the kernel's queue and the peer's buffer full again."""
        while True:
            try:
                server.send(b"x" * 65536)
            except BlockingIOError:
                return

    async def run() -> None:
        proto, transport = answering()
        assert bytes_acked(transport) is None  # no socket: unknown
        transport.sock = server
        transport.pending = 4 << 20  # 4 MiB: the transport's own buffer never moves
        timeout = proto.limits.http_send_timeout_s
        start = asyncio.get_running_loop().time()
        for look in range(int(3 * timeout)):
            fill()
            before = bytes_acked(transport)
            assert before is not None
            deadline = time.monotonic() + 10
            while (bytes_acked(transport) or 0) <= before:  # a few kilobytes read
                assert time.monotonic() < deadline, "nothing read was acknowledged"
                try:
                    client.recv(2048)
                except BlockingIOError:
                    await asyncio.sleep(0.001)
            proto.check_deadline(start + look)
            assert not transport.aborted, f"cut at look {look}"
        fill()
        for look in range(int(3 * timeout), int(5 * timeout)):  # reading stops
            proto.check_deadline(start + look)
        assert transport.aborted
        for task in proto.tasks:
            task.cancel()

    try:
        asyncio.run(run())
    finally:
        client.close()
        server.close()
