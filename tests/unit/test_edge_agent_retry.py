"""How the edge agent and the fleet controller ride out trouble that passes by itself: a
package download that fails on the network or a busy fleet server is tried again
(``retry_delay``); a heartbeat loop that ends on an error it does not expect stops the
agent (exit 1, so the service manager restarts it) instead of leaving a device that serves
but never reports; one slow controller tick does not stall the next ones.

And how the agent holds against a fleet server (or whatever answers in its place) that
misbehaves, through ``httpx.MockTransport``: encoded or oversized replies, a desired state
it could not report back, a move to another fleet, a capture record refused as too large,
an install that fails in a way nobody expected, and paths its local proxy cannot forward
as it checked them."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import signal
import socket
from collections.abc import AsyncIterator, Callable, MutableMapping
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from kubeinfer_runtime.contract.edge import (
    DEVICE_CREDENTIAL_HEADER,
    DesiredState,
    EdgeCapture,
    HeartbeatResponse,
)
from kubeinfer_runtime.edge import agent as agent_mod
from kubeinfer_runtime.edge import agent_install as inst
from kubeinfer_runtime.edge import signing
from kubeinfer_runtime.edge.agent_install import INSTALL_ATTEMPTS, retry_delay
from kubeinfer_runtime.edge.agent_proxy import Proxy
from kubeinfer_runtime.edge.capture_buffer import CaptureBuffer
from kubeinfer_runtime.edge.errors import EdgeError


def test_transient_failures_are_retried_with_growing_delays_then_fail() -> None:
    delays = [retry_delay(n) for n in range(1, INSTALL_ATTEMPTS + 1)]
    assert delays[-1] is None  # the last try fails the version for good
    waits = [d for d in delays[:-1] if d is not None]
    assert len(waits) == INSTALL_ATTEMPTS - 1
    assert waits == sorted(waits) and waits[0] >= 1.0 and waits[-1] <= 60.0
    assert retry_delay(INSTALL_ATTEMPTS + 3) is None


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_heartbeat_loop_that_dies_stops_the_agent_with_exit_1(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    async def broken_loop(self: agent_mod.Agent) -> None:
        raise RuntimeError("a bug the loop does not expect")

    monkeypatch.setattr(agent_mod.Agent, "loop", broken_loop)
    config = agent_mod.AgentConfig(server="http://127.0.0.1:9", device_id="d1",
                                   target="native", state_dir=tmp_path / "state",
                                   listen_port=_port())
    code = await asyncio.wait_for(agent_mod._main(config), 60)
    assert code == 1
    assert "heartbeat loop stopped (RuntimeError: a bug the loop does not expect)" in \
        caplog.text


async def test_a_stop_signal_still_exits_0(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    started = asyncio.Event()

    async def idle_loop(self: agent_mod.Agent) -> None:
        started.set()
        await asyncio.Event().wait()

    monkeypatch.setattr(agent_mod.Agent, "loop", idle_loop)
    config = agent_mod.AgentConfig(server="http://127.0.0.1:9", device_id="d1",
                                   target="native", state_dir=tmp_path / "state",
                                   listen_port=_port())
    main = asyncio.create_task(agent_mod._main(config))
    await asyncio.wait_for(started.wait(), 60)
    os.kill(os.getpid(), signal.SIGTERM)  # the agent's handler (on this loop) takes it
    assert await asyncio.wait_for(main, 60) == 0


def test_one_slow_tick_does_not_stretch_the_controllers_next_pause() -> None:
    from kubeinfer_runtime.edge.controller import TICK_WINDOW, tick_pause

    assert tick_pause([], 1.0) == 1.0
    quick = [0.01] * (TICK_WINDOW - 1)
    # A hiccup (a busy CPU, a slow Redis answer): the fleet's typical tick decides.
    assert tick_pause([*quick, 3.0], 1.0) == 1.0
    # A big fleet whose ticks are all long: they stay a tenth of the server's time.
    assert tick_pause([0.5] * TICK_WINDOW, 1.0) == pytest.approx(4.5)


# -- a fleet server (or what answers in its place) that misbehaves --------------------------------


class _Chunks(httpx.AsyncByteStream):
    """A reply body as a transport streams it (not read up front, as ``content=`` is)."""

    def __init__(self, data: bytes, chunk: int = 64 * 1024) -> None:
        self.data = data
        self.chunk = chunk

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for i in range(0, len(self.data), self.chunk):
            yield self.data[i:i + self.chunk]


def _agent(tmp_path: Path, handler: Callable[[httpx.Request], httpx.Response]
           ) -> agent_mod.Agent:
    agent = agent_mod.Agent(agent_mod.AgentConfig(
        server="http://fleet", device_id="dev-1", target="arm64",
        state_dir=tmp_path / "state", bootstrap_token="bootstrap-token-0123456789"))
    agent.client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return agent


def _heartbeat_reply(desired: dict[str, Any] | None = None) -> bytes:
    return json.dumps({"desired": desired, "heartbeatIntervalSeconds": 5,
                       "capture": EdgeCapture().model_dump()}).encode()


def _desired(**change: Any) -> dict[str, Any]:
    return {"version": "v2", "target": "arm64", "packageUrl": "/v1/packages/v2/arm64",
            "sha256": "0" * 64, "size": 1000, "signature": "c2ln", **change}


async def test_a_package_with_a_content_encoding_is_refused_and_the_version_fails(
        tmp_path: Path) -> None:
    """httpx decodes a Content-Encoding (even ``gzip, gzip``) before any size check sees a
    byte: a few MiB on the wire could be gigabytes in memory. The agent asks for identity,
    reads raw bytes and refuses an encoded package; the version fails for good."""
    seen: list[httpx.Request] = []
    body = gzip.compress(b"x" * 500)

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, headers={"content-encoding": "gzip, gzip"},
                              stream=_Chunks(body))

    agent = _agent(tmp_path, handler)
    agent.credential = {"credential": "c", "publicKey": signing.generate().public_key,
                        "fleet": "f"}
    try:
        with pytest.raises(EdgeError, match="Content-Encoding 'gzip, gzip'"):
            await inst.download(agent.client, "http://fleet/p", tmp_path / "p.bin", 1000, {})
        desired = DesiredState.model_validate(_desired())
        agent.updating_to = desired.version
        await agent._install(desired)
    finally:
        await agent.close()
    assert {r.headers["accept-encoding"] for r in seen} == {"identity"}
    state = inst.load_state(tmp_path / "state")
    assert state.failedVersion == "v2" and state.pending is None
    assert state.lastDeployment is not None and state.lastDeployment.outcome == "Failed"
    assert "Content-Encoding" in state.lastDeployment.message


@pytest.mark.parametrize("headers,body,match", [
    ({"content-encoding": "gzip"}, gzip.compress(_heartbeat_reply()), "Content-Encoding"),
    ({}, _heartbeat_reply() + b" " * (agent_mod.MAX_REPLY_BYTES + 1), "over 1048576 bytes"),
])
async def test_a_heartbeat_reply_is_bounded_and_never_decoded(
        tmp_path: Path, headers: dict[str, str], body: bytes, match: str) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, headers={"content-type": "application/json", **headers},
                              stream=_Chunks(body))

    agent = _agent(tmp_path, handler)
    agent.credential = {"credential": "c", "publicKey": "k", "fleet": "f"}
    try:
        with pytest.raises(EdgeError, match=match):
            await agent.heartbeat()
    finally:
        await agent.close()
    assert seen and seen[0].headers["accept-encoding"] == "identity"


async def test_an_unexpected_install_failure_fails_the_version(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A MemoryError (or a bug) in an install used to kill the install task with the
    journal still pending: the version was tried again at every heartbeat, never reported."""
    agent = _agent(tmp_path, lambda request: httpx.Response(404))

    async def out_of_memory(desired: DesiredState) -> None:
        agent.state.pending = inst.Pending(slot="a", version=desired.version,
                                           sha256=desired.sha256, startedAt=0.0)
        inst.save_state(agent.dir, agent.state)
        raise MemoryError

    monkeypatch.setattr(agent, "install", out_of_memory)
    desired = DesiredState.model_validate(_desired())
    try:
        agent.updating_to = desired.version
        await agent._install(desired)
        state = inst.load_state(tmp_path / "state")
        assert state.pending is None and state.failedVersion == "v2"
        assert state.lastDeployment is not None and state.lastDeployment.outcome == "Failed"
        assert "MemoryError" in state.lastDeployment.message
        # Not tried again until the fleet names another package.
        reply = HeartbeatResponse(desired=desired, heartbeatIntervalSeconds=5,
                                  capture=EdgeCapture())
        assert agent.apply(reply) is False and agent.install_task is None
    finally:
        await agent.close()


@pytest.mark.parametrize("change,field", [
    ({"version": "Not A Valid Version!"}, "version"),
    ({"target": "ARM/64"}, "target"),
    ({"packageUrl": "/" + "p" * 5000}, "packageUrl"),
    ({"signature": "s" * 5000}, "signature"),
    ({"sha256": "zz"}, "sha256"),
])
async def test_a_desired_state_the_device_could_not_report_is_refused(
        tmp_path: Path, change: dict[str, Any], field: str) -> None:
    """DesiredState is checked as strictly as the DeploymentResult the device sends back: a
    bad version used to crash the install task (pending forever)."""
    body = _heartbeat_reply(_desired(**change))
    agent = _agent(tmp_path, lambda request: httpx.Response(200, content=body))
    agent.credential = {"credential": "c", "publicKey": "k", "fleet": "f"}
    try:
        with pytest.raises(ValidationError) as refused:
            await agent.heartbeat()
    finally:
        await agent.close()
    assert [e["loc"] for e in refused.value.errors()] == [("desired", field)]
    assert agent.install_task is None


async def test_the_fleet_name_is_pinned_like_the_key(tmp_path: Path) -> None:
    """Signatures cover the fleet's name: a server that re-registers the device into another
    fleet could make it accept that fleet's packages. The first fleet is kept."""
    keys = signing.generate()
    fleet = {"name": "fleet-a"}

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={
            "deviceId": "dev-1", "credential": f"cred-{fleet['name']}",
            "heartbeatIntervalSeconds": 5, "publicKey": keys.public_key,
            "fleet": fleet["name"]})

    agent = _agent(tmp_path, handler)
    try:
        await agent.register()
        fleet["name"] = "fleet-b"
        with pytest.raises(EdgeError, match="in fleet 'fleet-b', but it belongs to fleet "
                                            "'fleet-a': refused"):
            await agent.register()
    finally:
        await agent.close()
    assert agent.credential is not None and agent.credential["fleet"] == "fleet-a"
    stored = json.loads((tmp_path / "state" / agent_mod.CREDENTIAL_FILE).read_text())
    assert stored["fleet"] == "fleet-a" and stored["credential"] == "cred-fleet-a"


async def test_registering_again_proves_the_credential_held(tmp_path: Path) -> None:
    """The fleet server lets only the holder of an id's credential register it again while
    its device is active: the agent sends the credential it holds, also the one a heartbeat
    was just refused with (a route answering 401 or 404 must not lock it out of its id)."""
    keys = signing.generate()
    proofs: list[str | None] = []
    agent: agent_mod.Agent | None = None

    def handler(request: httpx.Request) -> httpx.Response:
        assert agent is not None
        if request.url.path == "/v1/register":
            proofs.append(request.headers.get(DEVICE_CREDENTIAL_HEADER))
            return httpx.Response(200, json={
                "deviceId": "dev-1", "credential": f"cred-{len(proofs)}",
                "heartbeatIntervalSeconds": 5, "publicKey": keys.public_key, "fleet": "f"})
        if request.headers["authorization"] == "Bearer cred-1":
            return httpx.Response(401)
        agent.stopping.set()
        return httpx.Response(200, content=_heartbeat_reply())

    agent = _agent(tmp_path, handler)
    try:
        await asyncio.wait_for(agent.loop(), 30)
    finally:
        await agent.close()
    assert proofs == [None, "cred-1"]
    assert agent.credential is not None and agent.credential["credential"] == "cred-2"


async def test_a_capture_record_the_fleet_refuses_as_too_large_is_dropped(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A 413 used to stop the uploads at that record for ever: a batch refused so is sent
    again in halves, and a single record refused so is dropped (counted, never quoted)."""
    uploaded: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if len(request.content) > 10_000:
            return httpx.Response(413)
        uploaded.extend(json.loads(line)["i"] for line in request.content.splitlines())
        return httpx.Response(200, json={"accepted": 1, "uri": "file:///x"})

    agent = _agent(tmp_path, handler)
    agent.credential = {"credential": "c", "publicKey": "k", "fleet": "f"}
    for i, pad in ((1, 10), (2, 20_000), (3, 10)):
        assert agent.buffer.append({"i": i, "pad": "secret-payload" * (pad // 14 + 1)})
    try:
        await agent.upload_captures()
    finally:
        await agent.close()
    assert uploaded == [1, 3]
    assert agent.buffer.buffered == 0 and agent.buffer.dropped == 1
    assert "answered HTTP 413: the record is dropped" in caplog.text
    assert "secret-payload" not in caplog.text


async def test_the_proxy_refuses_paths_it_cannot_forward_as_checked(tmp_path: Path) -> None:
    """Control characters made httpx raise InvalidURL (a 500), and ``..`` segments were
    resolved by the URL before sending (``/v2/../ping`` reached the model server's /ping)."""
    forwarded: list[str] = []

    def upstream(request: httpx.Request) -> httpx.Response:
        forwarded.append(request.url.raw_path.decode())
        return httpx.Response(200, json={"ok": True})

    proxy = Proxy("dev-1", CaptureBuffer(tmp_path / "captures", 1 << 20))
    proxy._client = httpx.AsyncClient(transport=httpx.MockTransport(upstream))
    proxy.upstream = "http://model"

    async def call(path: str, query: bytes = b"") -> tuple[int, str]:
        sent: list[dict[str, Any]] = []
        messages = [{"type": "http.request", "body": b"{}", "more_body": False}]

        async def receive() -> dict[str, Any]:
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def send(message: MutableMapping[str, Any]) -> None:
            sent.append(dict(message))

        await proxy({"type": "http", "path": path, "method": "POST", "headers": [],
                     "query_string": query}, receive, send)
        return sent[0]["status"], sent[1]["body"].decode()

    try:
        for path in ("/v2/\x00", "/v2/a\x7fb", "/v2/models/m\r\n/infer"):
            status, body = await call(path)
            assert status == 400 and "control character" in body, path
        for path in ("/v2/../ping", "/v2/models/../../invocations", "/v2/./models",
                     "/v2/.."):
            status, body = await call(path)
            assert status == 400 and "'..' segment" in body, path
        assert (await call("/v2/models/m/infer", b"x=\x01"))[0] == 400  # httpx's InvalidURL
        assert forwarded == []
        # What passes is forwarded as checked: a decoded '?' or '#' stays in the path.
        assert (await call("/v2/models/m/infer"))[0] == 200
        assert (await call("/v2/models/a?b#c/infer"))[0] == 200
        assert forwarded == ["/v2/models/m/infer", "/v2/models/a%3Fb%23c/infer"]
    finally:
        await proxy.aclose()


# -- where a package comes from, and what goes with it ------------------------------------------


@pytest.mark.parametrize(("announced", "url", "credential"), [
    ("/v1/packages/v1/x86", "https://fleet.example:8443/v1/packages/v1/x86", True),
    ("https://fleet.example:8443/v1/packages/v1/x86",
     "https://fleet.example:8443/v1/packages/v1/x86", True),
    # Anywhere else (a CDN, a presigned link) the package comes without the credential:
    ("https://cdn.example/p.tgz", "https://cdn.example/p.tgz", False),
    ("http://fleet.example:8443/v1/p", "http://fleet.example:8443/v1/p", False),
    ("https://fleet.example/v1/p", "https://fleet.example/v1/p", False),
    ("https://x@fleet.example:8443/v1/p", "https://x@fleet.example:8443/v1/p", False),
])
def test_the_credential_goes_only_to_the_fleets_own_origin(announced: str, url: str,
                                                           credential: bool) -> None:
    assert inst.package_url("https://fleet.example:8443/", announced) == (url, credential)


@pytest.mark.parametrize("announced", ["@evil.example/p.tgz", "evil/p", ".evil.example/p"])
def test_a_package_path_that_would_name_another_host_is_refused(announced: str) -> None:
    # Appended to "https://fleet.example:8443", "@evil.example/p.tgz" names evil.example.
    with pytest.raises(inst.InstallError, match="does not start with '/'"):
        inst.package_url("https://fleet.example:8443", announced)


def test_the_model_server_does_not_inherit_the_bootstrap_token(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, str] = {}

    class Started:
        pid = 1

        def __init__(self, argv: list[str], env: dict[str, str], **_: Any) -> None:
            seen.update(env)

    monkeypatch.setenv("KUBEINFER_EDGE_BOOTSTRAP_TOKEN", "s3cret-bootstrap")
    monkeypatch.setattr(inst.subprocess, "Popen", Started)
    (tmp_path / "slots" / "a").mkdir(parents=True)
    child = inst.ModelChild.start(tmp_path, "a", inst.Installed(
        slot="a", version="v1", sha256="0" * 64, format="onnx", model="model.onnx"))
    child.release_port()
    assert seen["KUBEINFER_PORT"] == str(child.port)
    assert "KUBEINFER_EDGE_BOOTSTRAP_TOKEN" not in seen
    assert "s3cret-bootstrap" not in seen.values()
