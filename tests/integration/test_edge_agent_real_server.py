"""One real device agent against the real fleet server: the device protocol end to end.

``test_edge_agent.py`` drives the agent with a fake fleet server and
``test_edge_server.py`` drives the fleet server with simulated devices, so neither
notices when the two real programs disagree (a field one writes and the other reads
differently, a package URL, a capture upload the server refuses). Here everything is a
real process on 127.0.0.1: a redis-server (append-only, as in production), the fleet
server (``kubeinfer-runtime serve --role fleet-server``) reading a ``FleetConfig`` file
rewritten atomically as the operator does, and one ``kubeinfer-runtime edge agent``
with its model-server child. Versions answer ``factor * (x0 + x1)`` with different
factors, so the agent's local ``/invocations`` says which one it serves.

Captures are sampled at 100 %: every request the tests send to the agent must reach
the fleet's ``file://`` destination exactly once, through an outage of the fleet server
too (stopped, then started again on the same port with the same Redis).

One module-scoped fleet, driven in file order (each test starts where the previous one
ended):

1. v1, the fleet's first version, installs and serves;
2. the captured requests arrive as records, each once;
3. the fleet server goes away and comes back: the agent serves all along, and the
   records buffered meanwhile arrive, none lost, none twice;
4. v2, whose package was altered after signing, is refused (sha256); v1 serves on;
5. v3, signed with another key, is refused (signature); v1 serves on, and every
   request of the whole run has exactly one record.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from kubeinfer_runtime.contract.edge import (
    DeploymentOutcome,
    DeviceHistory,
    DeviceList,
    DeviceSummary,
    FleetStatus,
    RolloutPhase,
)
from kubeinfer_runtime.edge import package as pkg
from kubeinfer_runtime.edge import signing
from tests.support.onnx_models import scale_sum_model
from tests.support.orphans import die_with_parent
from tests.support.ports import free_port, http_ok, stop_process, wait_until
from tests.support.procs import RuntimeProcess, start_runtime
from tests.support.redis_server import RedisServer, start_redis

FLEET = "fleet-real"
TARGET = "rpi4"
DEVICE = "dev-1"
BOOTSTRAP = "bootstrap-token-0123456789"
#: v1's factor: the value every request must answer while v1 serves.
V1_FACTOR = 3.0
#: Generous: a loaded 2-core runner starts the agent's model server in seconds, not ms.
TIMEOUT_S = 90


@dataclass
class Edge:
    """The fleet (config file, packages, captures) and its three processes."""

    root: Path
    keys: signing.KeyPair
    redis: RedisServer
    server: RuntimeProcess | None = None
    agent: subprocess.Popen[bytes] | None = None
    agent_port: int = 0
    #: FleetConfig ``FleetVersion`` documents by version, as published.
    versions: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Every request body sent to the agent's /invocations (each must be captured once).
    sent: list[str] = field(default_factory=list)

    @property
    def config_path(self) -> Path:
        return self.root / "fleet.json"

    @property
    def captures(self) -> Path:
        return self.root / "captures"

    @property
    def agent_log(self) -> Path:
        return self.root / "agent.log"

    @property
    def agent_url(self) -> str:
        return f"http://127.0.0.1:{self.agent_port}"

    @property
    def url(self) -> str:
        assert self.server is not None
        return self.server.url

    # -- the operator's side ------------------------------------------------------------------

    def publish(self, version: str, factor: float, *, tamper: bool = False,
                key: signing.KeyPair | None = None) -> None:
        """Build and sign ``version``'s package; the config's ref is the signed build's even
        when ``tamper`` flips a byte of the file afterwards (an altered copy at rest)."""
        model = scale_sum_model(self.root / "models" / f"{version}.onnx", factor)
        dest = self.root / "packages" / version / f"{TARGET}.tar.gz"
        report = pkg.build(model, fleet=FLEET, version=version, target=TARGET, dest=dest,
                           signing_key=(key or self.keys).private_key)
        if tamper:
            data = bytearray(dest.read_bytes())
            data[len(data) // 2] ^= 0x01
            dest.write_bytes(bytes(data))
        self.versions[version] = {"version": version,
                                  "packages": {TARGET: report.ref().model_dump()}}

    def write(self, current: str, previous: str | None = None) -> None:
        doc: dict[str, Any] = {
            "name": FLEET, "current": self.versions[current],
            "rollout": {"waves": [], "deviceDeploymentTimeoutSeconds": 30},
            "heartbeatIntervalSeconds": 1, "publicKey": self.keys.public_key,
            "capture": {"samplingPercentage": 100,
                        "destination": f"file://{self.captures}"}}
        if previous is not None:
            doc["previous"] = self.versions[previous]
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, self.config_path)  # atomically: the server never reads half a file

    # -- processes ----------------------------------------------------------------------------

    def start_server(self, port: int | None = None) -> None:
        env = {"KUBEINFER_FLEET_CONFIG_FILE": str(self.config_path),
               "KUBEINFER_REDIS_URL": self.redis.url,
               "KUBEINFER_BOOTSTRAP_TOKEN": BOOTSTRAP,
               "KUBEINFER_CONTROLLER_INTERVAL_SECONDS": "0.2",
               "KUBEINFER_CONTROLLER_LEASE_SECONDS": "1"}
        self.server = start_runtime("fleet-server", env, self.root / "logs", port=port)

    def start_agent(self) -> None:
        self.agent_port = free_port()
        with open(self.agent_log, "ab") as out:
            self.agent = subprocess.Popen(
                [sys.executable, "-m", "kubeinfer_runtime", "edge", "agent",
                 "--server", self.url, "--bootstrap-token", BOOTSTRAP, "--device-id", DEVICE,
                 "--target", TARGET, "--state-dir", str(self.root / "state"),
                 "--listen", f"127.0.0.1:{self.agent_port}"],
                stdout=out, stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
                env={**os.environ, "KUBEINFER_LOG_LEVEL": "warning"})
        # 503 until a version is installed: the listener is up either way.
        wait_until(lambda: self.alive() and (http_ok(self.agent_url + "/ping", 503)
                                             or http_ok(self.agent_url + "/ping")),
                   TIMEOUT_S, "the agent's listener")

    def alive(self) -> bool:
        assert self.agent is not None
        if self.agent.poll() is not None:
            raise RuntimeError(f"agent exited with {self.agent.returncode}:\n"
                               + self.agent_log.read_text(errors="replace"))
        return True

    # -- what the tests look at ---------------------------------------------------------------

    def invoke(self) -> float:
        """One request to the agent, recorded in ``sent``; the value it answers. Each body is
        unique, so its capture record can be told from every other one."""
        body = f"[[{len(self.sent)}.0,0.5]]"
        self.sent.append(body)
        r = httpx.post(self.agent_url + "/invocations", content=body,
                       headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code == 200, r.text
        [value] = np.asarray(r.json()["predictions"]).ravel()
        return float(value) / (len(self.sent) - 1 + 0.5)  # the factor of what served it

    def read(self, path: str) -> bytes:
        r = httpx.get(self.url + path, headers={"authorization": f"Bearer {BOOTSTRAP}"},
                      timeout=10)
        assert r.status_code == 200, r.text
        return r.content

    def devices(self) -> list[DeviceSummary]:
        return DeviceList.model_validate_json(self.read("/v1/devices")).devices

    def device(self) -> DeviceSummary:
        [summary] = self.devices()
        return summary

    def status(self) -> FleetStatus:
        return FleetStatus.model_validate_json(self.read("/v1/fleet"))

    def records(self) -> list[dict[str, Any]]:
        """Every capture record in the destination (the server writes each batch atomically:
        a ``.write-*`` temp file renamed to ``<uuid>.jsonl``)."""
        out: list[dict[str, Any]] = []
        for path in sorted(self.captures.rglob("*.jsonl")):
            assert path.relative_to(self.captures).parts[:2] == (FLEET, DEVICE), path
            out.extend(json.loads(line) for line in path.read_text().splitlines() if line)
        return out

    def heartbeats_pass(self, count: int) -> None:
        """Until the server has seen ``count`` more heartbeats (the agent uploads captures
        right after each one, so a record still to come would have come by then)."""
        seen = [self.device().lastSeen]

        def more() -> bool:
            last = self.device().lastSeen
            if last != seen[-1]:
                seen.append(last)
            return self.alive() and len(seen) > count

        wait_until(more, 30, f"{count} more heartbeats", interval=0.2)

    def assert_captured_once(self) -> None:
        """Every request sent has exactly one record (by its unique body), with distinct
        event ids, and there is no other record."""
        records = self.records()
        bodies = [r["captureData"]["endpointInput"]["data"] for r in records]
        event_ids = [r["eventMetadata"]["eventId"] for r in records]
        assert sorted(bodies) == sorted(self.sent), (len(bodies), len(self.sent))
        assert len(set(event_ids)) == len(event_ids) == len(self.sent)
        assert {r["eventMetadata"]["deviceId"] for r in records} == {DEVICE}

    def wait_captured(self) -> None:
        wait_until(lambda: self.alive() and len(self.records()) >= len(self.sent), TIMEOUT_S,
                   f"{len(self.sent)} capture records", interval=0.2)
        # Then a couple of upload rounds more: a duplicate would show up by then.
        self.heartbeats_pass(2)
        self.assert_captured_once()


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    root = tmp_path_factory.mktemp("edge-real")
    redis = start_redis(root / "redis", persistent=True)
    e = Edge(root=root, keys=signing.generate(), redis=redis)
    try:
        e.publish("v1", V1_FACTOR)
        e.write("v1")
        e.start_server()
        e.start_agent()
        yield e
    finally:
        if e.agent is not None:
            stop_process(e.agent)
        if e.server is not None:
            e.server.stop()
        redis.stop()


def _serves_v1(edge: Edge) -> None:
    assert edge.invoke() == V1_FACTOR
    r = httpx.get(edge.agent_url + "/ping", timeout=10)
    assert r.status_code == 200 and r.json()["version"] == "v1", r.text


def _wait_refused(edge: Edge, version: str) -> str:
    """Until the server has the agent's report of a failed ``version``, checking at every
    poll that v1 still answers; the failure's message."""
    def refused() -> bool:
        _serves_v1(edge)
        last = edge.device().lastDeployment
        return edge.alive() and last is not None and last.version == version \
            and last.outcome is DeploymentOutcome.FAILED

    # 0.5 s polls: each one is a captured request, and the install takes seconds.
    wait_until(refused, TIMEOUT_S, f"{version} refused", interval=0.5)
    summary = edge.device()
    assert summary.lastDeployment is not None
    assert summary.version == "v1"
    return summary.lastDeployment.message


def test_first_version_installs_and_serves(edge: Edge) -> None:
    def installed() -> bool:
        devices = edge.devices()  # none until the agent has registered
        last = devices[0].lastDeployment if devices else None
        return edge.alive() and last is not None and last.version == "v1"

    wait_until(installed, TIMEOUT_S, "v1 reported", interval=0.2)
    summary = edge.device()
    assert summary.lastDeployment is not None
    assert summary.lastDeployment.outcome is DeploymentOutcome.SUCCEEDED, summary
    assert (summary.version, summary.target, summary.desiredVersion) == ("v1", TARGET, "v1")
    # The fleet's capture settings came with a heartbeat; the agent keeps them on disk
    # before it samples by them, so every request from here on is captured.
    capture = json.loads((edge.root / "state" / "capture.json").read_text())
    assert capture["samplingPercentage"] == 100
    _serves_v1(edge)

    def complete() -> bool:
        rollout = edge.status().rollout
        return rollout is not None and rollout.version == "v1" \
            and rollout.phase is RolloutPhase.COMPLETE

    wait_until(complete, 30, "v1's rollout complete", interval=0.2)
    assert edge.status().counters["registrations"] == 1


def test_captures_arrive_once(edge: Edge) -> None:
    for _ in range(5):
        assert edge.invoke() == V1_FACTOR
    edge.wait_captured()
    for record in edge.records():
        assert record["eventVersion"] == "0"
        assert record["captureData"]["endpointInput"]["encoding"] == "JSON"
        assert "predictions" in record["captureData"]["endpointOutput"]["data"]


def test_captures_survive_a_fleet_server_outage(edge: Edge) -> None:
    assert edge.server is not None
    port, before = edge.server.port, len(edge.sent)

    def failed_heartbeats() -> int:
        return edge.agent_log.read_text(errors="replace").count("Fleet server unreachable")

    failures = failed_heartbeats()
    edge.server.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(edge.url + "/ping", timeout=2)
    # The agent has noticed (a heartbeat failed), so what follows is buffered offline.
    wait_until(lambda: edge.alive() and failed_heartbeats() > failures, 30,
               "the agent to see the server gone")
    for _ in range(6):
        _serves_v1(edge)
    # Offline across one more heartbeat (its backoff) with the records buffered.
    wait_until(lambda: edge.alive() and failed_heartbeats() > failures + 1, 30,
               "a second failed heartbeat")
    assert len(edge.records()) == before  # nothing can have arrived while it was down

    # Back at the address the agent knows, with the same Redis and config: the device's
    # credential still holds and its buffer drains into the destination.
    edge.start_server(port=port)
    edge.wait_captured()
    assert len(edge.sent) == before + 6
    summary = edge.device()
    assert summary.version == "v1" and summary.state == "Online"
    assert edge.status().counters["registrations"] == 1  # no re-registration was needed
    assert edge.invoke() == V1_FACTOR


def test_a_tampered_package_is_refused(edge: Edge) -> None:
    edge.publish("v2", 5.0, tamper=True)
    edge.write("v2", previous="v1")
    message = _wait_refused(edge, "v2")
    assert "sha256" in message and "altered" in message, message
    # The refusal is in the device's history on the server too (newest first).
    history = DeviceHistory.model_validate_json(edge.read(f"/v1/devices/{DEVICE}/history"))
    failed = [e.lastDeployment for e in history.entries
              if e.lastDeployment is not None and e.lastDeployment.version == "v2"]
    assert failed and failed[0].outcome is DeploymentOutcome.FAILED
    # With no waves the rollout does not trip (waves.py): it completes with the device
    # counted Failed, and the agent does not try the same package again.
    assert edge.status().byState["Failed"] == 1
    state = json.loads((edge.root / "state" / "state.json").read_text())
    assert state["current"]["version"] == "v1" and state["pending"] is None
    # Refused once and for all: a few heartbeats later it still serves v1, not retrying.
    edge.heartbeats_pass(2)
    _serves_v1(edge)
    last = edge.device().lastDeployment
    assert last is not None and last.version == "v2"


def test_a_wrong_signature_is_refused(edge: Edge) -> None:
    # Signed with a key pair that is not the fleet's; the config's publicKey stays the
    # fleet's (and the agent pinned that one at registration).
    edge.publish("v3", 7.0, key=signing.generate())
    edge.write("v3", previous="v1")
    message = _wait_refused(edge, "v3")
    assert "Signature" in message and "does not verify" in message, message
    history = DeviceHistory.model_validate_json(edge.read(f"/v1/devices/{DEVICE}/history"))
    results = [(e.lastDeployment.version, e.lastDeployment.outcome) for e in history.entries
               if e.lastDeployment is not None]
    assert results[0] == ("v3", DeploymentOutcome.FAILED)
    assert ("v2", DeploymentOutcome.FAILED) in results
    assert ("v1", DeploymentOutcome.SUCCEEDED) in results
    # Nothing of the refused packages is left on the device: only v1's slot.
    state = json.loads((edge.root / "state" / "state.json").read_text())
    assert os.listdir(edge.root / "state" / "slots") == [state["current"]["slot"]]
    _serves_v1(edge)
    # Every request of the whole run, refusals included, has exactly one record.
    edge.wait_captured()
    assert edge.server is not None and "Traceback" not in edge.server.log()
    assert "Traceback" not in edge.agent_log.read_text(errors="replace")
