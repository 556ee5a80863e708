"""The edge agent as a real process against a small fake fleet server speaking the device API.

The fake server implements ``contract.edge``'s routes with the contract's models (the real
fleet server is tested against the agent separately); the models are real ONNX graphs served
by real model-server children of the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI, Request, Response

from kubeinfer_runtime.contract.edge import (
    DEVICE_CREDENTIAL_HEADER,
    CaptureUploadResponse,
    DesiredState,
    EdgeCapture,
    Heartbeat,
    HeartbeatResponse,
    OnFull,
    RegisterRequest,
    RegisterResponse,
)
from kubeinfer_runtime.edge import package as pkg
from kubeinfer_runtime.edge import signing
from kubeinfer_runtime.edge.capture_buffer import capture_record
from tests.support.onnx_models import fails_every_inference_model, scale_sum_model
from tests.support.orphans import die_with_parent
from tests.support.ports import free_port, http_ok, stop_process, wait_until

FLEET = "fleet-a"
TARGET = "rpi4"
DEVICE = "dev-1"
BOOTSTRAP = "bootstrap-token-0123456789"


@dataclass
class FakeFleet:
    """The device API of ``contract.edge`` over in-memory state the test drives."""

    public_key: str
    desired: DesiredState | None = None
    packages: dict[tuple[str, str], bytes] = field(default_factory=dict)
    heartbeats: list[Heartbeat] = field(default_factory=list)
    captures: list[dict[str, Any]] = field(default_factory=list)
    registrations: int = 0
    #: What each registration sent in DEVICE_CREDENTIAL_HEADER (None: nothing).
    proofs: list[str | None] = field(default_factory=list)
    credentials: set[str] = field(default_factory=set)
    capture: EdgeCapture = field(default_factory=EdgeCapture)
    fail_captures: bool = False
    #: Package downloads wait while this is set (a device killed mid-install).
    stall: threading.Event = field(default_factory=threading.Event)
    downloads: list[str] = field(default_factory=list)
    #: The next this many package downloads answer 503 (a fleet server busy or restarting).
    fail_downloads: int = 0

    def app(self) -> FastAPI:
        app = FastAPI()

        def authorized(request: Request) -> bool:
            token = request.headers.get("authorization", "").removeprefix("Bearer ")
            return token in self.credentials

        @app.post("/v1/register")
        async def register(request: Request) -> Response:
            if request.headers.get("authorization") != f"Bearer {BOOTSTRAP}":
                return Response(status_code=401)
            body = RegisterRequest.model_validate_json(await request.body())
            self.registrations += 1
            self.proofs.append(request.headers.get(DEVICE_CREDENTIAL_HEADER))
            cred = f"cred-{self.registrations}"
            self.credentials.add(cred)
            reply = RegisterResponse(deviceId=body.deviceId, credential=cred,
                                     heartbeatIntervalSeconds=1, publicKey=self.public_key,
                                     fleet=FLEET)
            return Response(reply.model_dump_json(), media_type="application/json")

        @app.post("/v1/devices/{device_id}/heartbeat")
        async def heartbeat(device_id: str, request: Request) -> Response:
            if not authorized(request):
                return Response(status_code=401)
            self.heartbeats.append(Heartbeat.model_validate_json(await request.body()))
            reply = HeartbeatResponse(desired=self.desired, heartbeatIntervalSeconds=1,
                                      capture=self.capture)
            return Response(reply.model_dump_json(), media_type="application/json")

        @app.get("/v1/packages/{version}/{target}")
        async def package(version: str, target: str, request: Request) -> Response:
            if not authorized(request):
                return Response(status_code=401)
            self.downloads.append(version)
            if self.fail_downloads > 0:
                self.fail_downloads -= 1
                return Response(status_code=503)
            while self.stall.is_set():  # noqa: ASYNC110 (set and cleared by the test thread)
                await asyncio.sleep(0.05)
            data = self.packages.get((version, target))
            return Response(data, media_type="application/gzip") if data is not None \
                else Response(status_code=404)

        @app.post("/v1/devices/{device_id}/captures")
        async def captures(device_id: str, request: Request) -> Response:
            if not authorized(request):
                return Response(status_code=401)
            if self.fail_captures:
                return Response(status_code=503)
            lines = [json.loads(x) for x in (await request.body()).splitlines() if x]
            self.captures.extend(lines)
            reply = CaptureUploadResponse(accepted=len(lines), uri="file:///dev/null")
            return Response(reply.model_dump_json(), media_type="application/json")

        return app

    def last(self) -> Heartbeat | None:
        return self.heartbeats[-1] if self.heartbeats else None

    def deployed(self, version: str, outcome: str) -> bool:
        hb = self.last()
        return bool(hb and hb.lastDeployment and hb.lastDeployment.version == version
                    and hb.lastDeployment.outcome == outcome)


class Serving:
    """The fake fleet's uvicorn server in a thread: ``stop`` and ``start`` again on one port
    (the fleet unreachable for a while, then back at the same address)."""

    def __init__(self, fake: FakeFleet, port: int) -> None:
        self.fake = fake
        self.port = port
        self.server: uvicorn.Server | None = None
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        server = uvicorn.Server(uvicorn.Config(self.fake.app(), host="127.0.0.1",
                                               port=self.port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        self.server, self.thread = server, thread

        def started() -> bool:
            if not thread.is_alive():
                raise RuntimeError(f"fake fleet server did not start on port {self.port}")
            return server.started

        wait_until(started, 10, "fake fleet server")

    def stop(self) -> None:
        if self.server is not None and self.thread is not None:
            self.server.should_exit = True
            self.thread.join(10)
            assert not self.thread.is_alive(), "fake fleet server did not stop"
        self.server = self.thread = None


@dataclass
class Built:
    fleet: FakeFleet
    url: str
    keys: signing.KeyPair
    tmp: Path
    serving: Serving

    def publish(self, version: str, model: Path, *, tamper: bool = False,
                key: signing.KeyPair | None = None) -> None:
        dest = self.tmp / "pkgs" / f"{version}.tar.gz"
        report = pkg.build(model, fleet=FLEET, version=version, target=TARGET, dest=dest,
                           signing_key=(key or self.keys).private_key)
        data = bytearray(dest.read_bytes())
        if tamper:
            data[len(data) // 2] ^= 0x01
        self.fleet.packages[(version, TARGET)] = bytes(data)
        self.fleet.desired = DesiredState(
            version=version, target=TARGET, packageUrl=f"/v1/packages/{version}/{TARGET}",
            sha256=report.sha256, size=report.size, signature=report.signature)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Built]:
    keys = signing.generate()
    fake = FakeFleet(public_key=keys.public_key)
    serving = Serving(fake, free_port())
    serving.start()
    try:
        yield Built(fake, f"http://127.0.0.1:{serving.port}", keys, tmp_path, serving)
    finally:
        fake.stall.clear()
        serving.stop()


@dataclass
class AgentProc:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def text(self) -> str:
        return self.log.read_text(errors="replace")


def start_agent(built: Built, state: Path, *, port: int | None = None,
                extra: tuple[str, ...] = (), env: dict[str, str] | None = None) -> AgentProc:
    port = port or free_port()
    log = built.tmp / f"agent-{time.monotonic_ns()}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kubeinfer_runtime", "edge", "agent", "--server", built.url,
             "--bootstrap-token", BOOTSTRAP, "--device-id", DEVICE, "--target", TARGET,
             "--state-dir", str(state), "--labels", "site=lab,ring=0",
             "--listen", f"127.0.0.1:{port}", "--log-level", "debug", *extra],
            stdout=out, stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
            env={**os.environ, "KUBEINFER_LOG_LEVEL": "warning", **(env or {})})
    agent = AgentProc(proc, port, log)
    wait_until(lambda: _alive(agent) and (http_ok(agent.url + "/ping", 503)
                                          or http_ok(agent.url + "/ping")), 60, "agent listener")
    return agent


def _alive(agent: AgentProc) -> bool:
    if agent.proc.poll() is not None:
        raise RuntimeError(f"agent exited with {agent.proc.returncode}:\n{agent.text()}")
    return True


def invoke(agent: AgentProc, rows: list[list[float]]) -> list[float]:
    r = httpx.post(agent.url + "/invocations", json=rows, timeout=10)
    assert r.status_code == 200, r.text
    return [float(v) for v in np.asarray(r.json()["predictions"]).ravel()]


def wait_deployed(built: Built, agent: AgentProc, version: str, outcome: str,
                  timeout: float = 90) -> None:
    wait_until(lambda: _alive(agent) and built.fleet.deployed(version, outcome), timeout,
               f"{version} {outcome}")


def children_of(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def test_install_switch_refuse_and_capture(fleet: Built, tmp_path: Path) -> None:
    state = tmp_path / "state"
    agent = start_agent(fleet, state)
    try:
        # Registered; nothing installed yet: /ping says so.
        wait_until(lambda: _alive(agent) and fleet.fleet.last() is not None, 30, "heartbeat")
        assert fleet.fleet.registrations == 1
        assert httpx.get(agent.url + "/ping").status_code == 503
        cred = state / "credential.json"
        assert cred.stat().st_mode & 0o777 == 0o600
        assert json.loads(cred.read_text())["publicKey"] == fleet.keys.public_key

        # v1 installs and serves through the agent's own listener.
        fleet.publish("v1", scale_sum_model(tmp_path / "m1.onnx", 1.0))
        wait_deployed(fleet, agent, "v1", "Succeeded")
        assert invoke(agent, [[1, 2]]) == [3.0]
        assert fleet.fleet.last() is not None
        wait_until(lambda: fleet.fleet.last().version == "v1", 10, "v1 reported")  # type: ignore[union-attr]
        assert httpx.get(agent.url + "/v2/models/model").status_code == 200

        # v2 replaces it: answers change, the old child is gone.
        fleet.publish("v2", scale_sum_model(tmp_path / "m2.onnx", 2.0))
        wait_deployed(fleet, agent, "v2", "Succeeded")
        assert invoke(agent, [[1, 2]]) == [6.0]
        wait_until(lambda: len(children_of(agent.proc.pid)) == 1, 30, "one model server")
        st = json.loads((state / "state.json").read_text())
        assert st["current"]["version"] == "v2" and st["pending"] is None

        # v3 loads but fails every inference: its warm-up fails, v2 keeps serving.
        fleet.publish("v3", fails_every_inference_model(tmp_path / "m3.onnx"))
        wait_deployed(fleet, agent, "v3", "Failed")
        message = fleet.fleet.last().lastDeployment.message  # type: ignore[union-attr]
        assert "failed to load" in message and "warm-up" in message
        assert invoke(agent, [[1, 2]]) == [6.0]

        # v4's bytes were altered after signing: refused before extraction.
        fleet.publish("v4", scale_sum_model(tmp_path / "m4.onnx", 4.0), tamper=True)
        wait_deployed(fleet, agent, "v4", "Failed")
        assert "sha256" in fleet.fleet.last().lastDeployment.message  # type: ignore[union-attr]
        assert invoke(agent, [[1, 2]]) == [6.0]

        # v5 was signed with another key: refused too.
        fleet.publish("v5", scale_sum_model(tmp_path / "m5.onnx", 5.0),
                      key=signing.generate())
        wait_deployed(fleet, agent, "v5", "Failed")
        assert "Signature" in fleet.fleet.last().lastDeployment.message  # type: ignore[union-attr]
        assert invoke(agent, [[1, 2]]) == [6.0]
        assert sorted(p.name for p in (state / "slots").iterdir()) == \
            [json.loads((state / "state.json").read_text())["current"]["slot"]]

        # Captures: sampled at 100 %, kept while uploads fail, uploaded when they pass.
        fleet.fleet.capture = EdgeCapture(samplingPercentage=100)
        fleet.fleet.fail_captures = True
        wait_until(lambda: _alive(agent) and len(fleet.fleet.heartbeats) > 0, 5, "heartbeat")
        seen = len(fleet.fleet.heartbeats)
        wait_until(lambda: len(fleet.fleet.heartbeats) > seen + 1, 10, "capture config")
        for i in range(5):
            invoke(agent, [[float(i), 1.0]])
        wait_until(lambda: (fleet.fleet.last().capturesBuffered or 0) >= 5,  # type: ignore[union-attr]
                   10, "captures buffered")
        assert fleet.fleet.captures == []
        fleet.fleet.fail_captures = False
        wait_until(lambda: len(fleet.fleet.captures) >= 5, 15, "captures uploaded")
        record = fleet.fleet.captures[0]
        assert record["eventVersion"] == "0"
        assert record["eventMetadata"]["deviceId"] == DEVICE
        assert record["captureData"]["endpointInput"]["encoding"] == "JSON"
        hb = fleet.fleet.last()
        assert hb is not None and hb.requests >= 8 and hb.latencyP99Ms > 0
        assert hb.lastInferenceAt > 0 and hb.capturesDropped == 0

        # SIGTERM stops the agent and its model server.
        child = children_of(agent.proc.pid)
        agent.proc.send_signal(signal.SIGTERM)
        assert agent.proc.wait(30) == 0
        wait_until(lambda: all(not Path(f"/proc/{p}").exists() for p in child), 15,
                   "model server stopped")
    finally:
        stop_process(agent.proc)


def test_the_device_listener_has_the_runtimes_connection_bounds(fleet: Built,
                                                                 tmp_path: Path) -> None:
    """Slow headers on the agent's own port get 408, as on every runtime listener, and
    the agent serves on."""
    agent = start_agent(fleet, tmp_path / "state", env={"KUBEINFER_HTTP_HEADER_TIMEOUT_S": "1"})
    try:
        with socket.create_connection(("127.0.0.1", agent.port), timeout=15) as sock:
            sock.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\n")
            started = time.monotonic()
            reply = b""
            sock.settimeout(0.2)
            while time.monotonic() - started < 10 and not reply:
                try:
                    reply = sock.recv(65536)
                except TimeoutError:
                    with contextlib.suppress(OSError):
                        sock.sendall(b"X-Slow: 1\r\n")  # never the end of the head
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert b"KUBEINFER_HTTP_HEADER_TIMEOUT_S" in reply
        assert httpx.get(agent.url + "/ping").status_code in (200, 503)  # serves on
    finally:
        stop_process(agent.proc)


def test_a_download_that_fails_transiently_is_tried_again(fleet: Built, tmp_path: Path) -> None:
    """A 503 (or a broken connection) says "later": the version is tried again after a
    delay, not failed for good, which left the device on nothing until a new version."""
    agent = start_agent(fleet, tmp_path / "state")
    try:
        wait_until(lambda: _alive(agent) and fleet.fleet.last() is not None, 30, "heartbeat")
        fleet.fleet.fail_downloads = 2
        fleet.publish("v1", scale_sum_model(tmp_path / "m1.onnx", 1.0))
        wait_deployed(fleet, agent, "v1", "Succeeded")
        assert fleet.fleet.downloads.count("v1") == 3
        assert not [hb for hb in fleet.fleet.heartbeats
                    if hb.lastDeployment and hb.lastDeployment.outcome == "Failed"]
        assert invoke(agent, [[1, 2]]) == [3.0]
        assert "Install of v1 failed (Package download answered HTTP 503), try 2 of 5" \
            in agent.text()
    finally:
        stop_process(agent.proc)


def test_killed_mid_install_restarts_consistent(fleet: Built, tmp_path: Path) -> None:
    state = tmp_path / "state"
    port = free_port()
    agent = start_agent(fleet, state, port=port)
    try:
        fleet.publish("v1", scale_sum_model(tmp_path / "m1.onnx", 1.0))
        wait_deployed(fleet, agent, "v1", "Succeeded")
        assert invoke(agent, [[1, 2]]) == [3.0]

        # Killed while downloading v2: the journal names the pending install.
        fleet.fleet.stall.set()
        fleet.publish("v2", scale_sum_model(tmp_path / "m2.onnx", 2.0))
        wait_until(lambda: _alive(agent) and "v2" in fleet.fleet.downloads, 30, "v2 download")
        assert json.loads((state / "state.json").read_text())["pending"]["version"] == "v2"
        agent.proc.kill()
        agent.proc.wait()

        # Restarted: the interrupted install is rolled back, v1 serves, then v2 installs.
        agent = start_agent(fleet, state, port=port)
        wait_until(lambda: _alive(agent) and http_ok(agent.url + "/ping"), 60, "v1 again")
        assert invoke(agent, [[1, 2]]) == [3.0]
        st = json.loads((state / "state.json").read_text())
        assert st["current"]["version"] == "v1"
        fleet.fleet.stall.clear()
        wait_deployed(fleet, agent, "v2", "Succeeded")
        assert invoke(agent, [[1, 2]]) == [6.0]

        # Killed right after v3's switch is journaled (before the old child stops):
        # the restart serves v3 from its verified slot.
        fleet.publish("v3", scale_sum_model(tmp_path / "m3.onnx", 3.0))
        wait_until(lambda: _alive(agent) and json.loads(
            (state / "state.json").read_text())["current"]["version"] == "v3", 90, "v3 journal")
        agent.proc.kill()
        agent.proc.wait()
        agent = start_agent(fleet, state, port=port)
        wait_until(lambda: _alive(agent) and http_ok(agent.url + "/ping"), 60, "v3 again")
        assert invoke(agent, [[1, 2]]) == [9.0]

        # A slot altered on disk is never served: the restart refuses it and the fleet's
        # desired version is installed again into the other slot.
        st = json.loads((state / "state.json").read_text())
        slot = state / "slots" / st["current"]["slot"]
        agent.proc.kill()
        agent.proc.wait()
        with open(slot / pkg.ONNX_NAME, "ab") as f:
            f.write(b"\0")
        agent = start_agent(fleet, state, port=port)
        wait_until(lambda: _alive(agent) and http_ok(agent.url + "/ping"), 90, "v3 reinstalled")
        assert invoke(agent, [[1, 2]]) == [9.0]
    finally:
        fleet.fleet.stall.clear()
        stop_process(agent.proc)


def test_pinned_key_survives_a_server_with_another_key(fleet: Built, tmp_path: Path) -> None:
    state = tmp_path / "state"
    agent = start_agent(fleet, state)
    try:
        wait_until(lambda: _alive(agent) and fleet.fleet.last() is not None, 30, "heartbeat")
        pinned = json.loads((state / "credential.json").read_text())["publicKey"]
        assert pinned == fleet.keys.public_key
        # The server forgets the device and now hands out another key: the agent registers
        # again (its credential was refused) but keeps the pinned key and refuses the new one.
        other = signing.generate()
        fleet.fleet.public_key = other.public_key
        fleet.fleet.credentials.clear()
        wait_until(lambda: _alive(agent) and fleet.fleet.registrations >= 3, 30,
                   "registrations refused")
        assert json.loads((state / "credential.json").read_text())["publicKey"] == pinned
        assert "public key other than the pinned one" in agent.text()
        # Each registration after the first sent the credential the device held, which a
        # real fleet server requires to register an active device's id again.
        assert fleet.fleet.proofs[0] is None
        assert set(fleet.fleet.proofs[1:]) == {"cred-1"}
        seen = len(fleet.fleet.heartbeats)
        stop_process(agent.proc)

        # --public-key always wins: the operator said to trust the new key.
        agent = start_agent(fleet, state, extra=("--public-key", other.public_key))
        wait_until(lambda: _alive(agent) and len(fleet.fleet.heartbeats) > seen, 30,
                   "heartbeat with --public-key")
        fleet.publish("v1", scale_sum_model(tmp_path / "m1.onnx", 1.0), key=other)
        wait_deployed(fleet, agent, "v1", "Succeeded")
        assert invoke(agent, [[1, 2]]) == [3.0]
    finally:
        stop_process(agent.proc)


# -- offline: the capture buffer's bounds ---------------------------------------------------------


def _payload(i: int) -> bytes:
    """A request whose answer is ``i`` (factor 1): two-digit ``i`` keeps every record one size."""
    assert 10 <= i <= 99
    return f"[[{i}.0,0.0]]".encode()


def _invoke_capture(agent: AgentProc, i: int) -> int:
    """Invoke with ``_payload(i)``; returns the size of the buffer line the agent writes for it
    (``capture_record`` as compact JSON plus its newline: eventId and inferenceTime have a
    fixed width, so the size only depends on the request and response bytes)."""
    r = httpx.post(agent.url + "/invocations", content=_payload(i),
                   headers={"content-type": "application/json"}, timeout=10)
    assert r.status_code == 200, r.text
    assert [float(v) for v in np.asarray(r.json()["predictions"]).ravel()] == [float(i)]
    record = capture_record(device_id=DEVICE, request=_payload(i),
                            request_type="application/json", response=r.content,
                            response_type=r.headers["content-type"])
    return len(json.dumps(record, separators=(",", ":")).encode()) + 1


def _uploaded(built: Built) -> list[str]:
    return [c["captureData"]["endpointInput"]["data"] for c in built.fleet.captures]


def _set_capture(built: Built, agent: AgentProc, capture: EdgeCapture) -> None:
    """New capture settings, waited for until the agent has applied them: the heartbeat after
    the one answered with them was sent after ``apply``."""
    built.fleet.capture = capture
    seen = len(built.fleet.heartbeats)
    wait_until(lambda: _alive(agent) and len(built.fleet.heartbeats) > seen + 1, 20,
               "capture settings applied")


def _wait_reported(built: Built, agent: AgentProc, buffered: int, dropped: int,
                   since: int = 0) -> None:
    """Until a heartbeat (the ``since``-th or later) reports these capture counts."""
    def reported() -> bool:
        hbs = built.fleet.heartbeats
        hb = hbs[-1] if len(hbs) > since else None
        return _alive(agent) and hb is not None and hb.capturesBuffered == buffered \
            and hb.capturesDropped == dropped

    try:
        wait_until(reported, 30, f"heartbeat with {buffered} buffered and {dropped} dropped")
    except TimeoutError:
        hb = built.fleet.heartbeats[-1]
        raise AssertionError((hb.capturesBuffered, hb.capturesDropped, buffered, dropped)) from None


def test_offline_capture_buffer_bounds(fleet: Built, tmp_path: Path) -> None:
    """An agent offline for a while keeps serving and uploads its buffered captures when back:
    none lost when the buffer was large enough, exactly the declared ones when it was not."""
    state = tmp_path / "state"
    agent = start_agent(fleet, state)
    requests = 0
    try:
        fleet.publish("v1", scale_sum_model(tmp_path / "m1.onnx", 1.0))
        wait_deployed(fleet, agent, "v1", "Succeeded")

        # A1: uploads refused (HTTP 503), buffer large (the 64 MiB default): all 12 kept,
        # then all 12 uploaded, in order, once each.
        fleet.fleet.fail_captures = True
        _set_capture(fleet, agent, EdgeCapture(samplingPercentage=100))
        a1 = list(range(10, 22))
        for i in a1:
            _invoke_capture(agent, i)
        requests += len(a1)
        _wait_reported(fleet, agent, buffered=12, dropped=0)
        assert fleet.fleet.captures == []
        fleet.fleet.fail_captures = False
        _wait_reported(fleet, agent, buffered=0, dropped=0)
        assert _uploaded(fleet) == [_payload(i).decode() for i in a1]

        # A2: the whole fleet server unreachable (stopped): the agent keeps serving, buffers
        # 12 more, and uploads exactly them once the server is back at the same address.
        failures = agent.text().count("Fleet server unreachable")
        fleet.serving.stop()
        with pytest.raises(httpx.ConnectError):
            httpx.get(fleet.url + "/v1/register", timeout=2)
        wait_until(lambda: _alive(agent) and agent.text().count("Fleet server unreachable")
                   > failures, 15, "the agent sees the fleet unreachable")
        assert httpx.get(agent.url + "/ping", timeout=5).status_code == 200
        a2 = list(range(30, 42))
        for i in a2:
            _invoke_capture(agent, i)
        requests += len(a2)
        # Still offline one more heartbeat later (backoff): then the server comes back.
        wait_until(lambda: _alive(agent) and agent.text().count("Fleet server unreachable")
                   > failures + 1, 15, "a second failed heartbeat")
        assert len(fleet.fleet.captures) == len(a1)
        back = len(fleet.fleet.heartbeats)
        fleet.serving.start()
        # The first heartbeat once back reports the 12 kept offline (uploads follow it).
        wait_until(lambda: _alive(agent) and len(fleet.fleet.heartbeats) > back, 30,
                   "a heartbeat once back")
        assert fleet.fleet.heartbeats[back].capturesBuffered == len(a2)
        assert fleet.fleet.heartbeats[back].capturesDropped == 0
        _wait_reported(fleet, agent, buffered=0, dropped=0, since=back + 1)
        assert _uploaded(fleet) == [_payload(i).decode() for i in a1 + a2]

        # B: uploads refused, a 4096-byte buffer with DropOldest: every record is `size`
        # bytes, so `fit` = 4096 // size are kept (the newest), each further one drops
        # exactly one old record.
        fleet.fleet.fail_captures = True
        _set_capture(fleet, agent, EdgeCapture(samplingPercentage=100, bufferBytes=4096,
                                               onFull=OnFull.DROP_OLDEST))
        b = list(range(50, 70))
        sizes = {_invoke_capture(agent, i) for i in b}
        requests += len(b)
        assert len(sizes) == 1, sizes
        size = sizes.pop()
        fit = 4096 // size
        assert 0 < fit < len(b), (size, fit)
        _wait_reported(fleet, agent, buffered=fit, dropped=len(b) - fit)
        assert len(fleet.fleet.captures) == len(a1) + len(a2)
        fleet.fleet.fail_captures = False
        _wait_reported(fleet, agent, buffered=0, dropped=len(b) - fit)
        assert _uploaded(fleet)[len(a1) + len(a2):] == [_payload(i).decode() for i in b[-fit:]]
        # The uploaded lines are the size computed above (the agent's records, unchanged).
        assert {len(json.dumps(c, separators=(",", ":")).encode()) + 1
                for c in fleet.fleet.captures} == {size}

        # C: the same bound with RejectNew: the oldest `fit` are kept, the rest are dropped
        # (the drop count goes on from B's).
        fleet.fleet.fail_captures = True
        _set_capture(fleet, agent, EdgeCapture(samplingPercentage=100, bufferBytes=4096,
                                               onFull=OnFull.REJECT_NEW))
        c = list(range(70, 90))
        assert {_invoke_capture(agent, i) for i in c} == {size}
        requests += len(c)
        dropped = (len(b) - fit) + (len(c) - fit)
        _wait_reported(fleet, agent, buffered=fit, dropped=dropped)
        assert len(fleet.fleet.captures) == len(a1) + len(a2) + fit
        fleet.fleet.fail_captures = False
        _wait_reported(fleet, agent, buffered=0, dropped=dropped)
        assert _uploaded(fleet) == [_payload(i).decode()
                                    for i in a1 + a2 + b[-fit:] + c[:fit]]

        hb = fleet.fleet.last()
        assert hb is not None and hb.requests == requests == 64 and hb.errors == 0
    finally:
        stop_process(agent.proc)
