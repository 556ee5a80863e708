"""The fleet server (``kubeinfer-runtime serve --role fleet-server``) against a real Redis.

Devices are simulated with plain httpx clients speaking the device API, so these
tests exercise the server alone: registration, heartbeats, downloads, refusals,
two replicas sharing one Redis, restarts, and rollouts in waves driven over HTTP.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError as PydanticValidationError

from kubeinfer_runtime.contract.edge import (
    DEVICE_CREDENTIAL_HEADER,
    DeviceHistory,
    FleetServerSettings,
)
from tests.support.ports import wait_until
from tests.support.procs import RuntimeProcess, start_runtime
from tests.support.redis_server import RedisServer, start_redis

BOOTSTRAP = "bootstrap-token-0123456789"
#: The operator's read-only token (``KUBEINFER_STATUS_TOKEN``).
STATUS = "status-token-abcdefghijklmnop"
KEY = base64.b64encode(bytes(range(32))).decode()


class Fleet:
    """A fleet config file with packages on disk, rewritten like the operator does."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = root / "fleet.json"
        self.blobs: dict[str, bytes] = {}

    def package(self, version: str, target: str = "arm64") -> dict[str, Any]:
        data = f"package {version} {target} ".encode() * 1000
        path = self.root / "packages" / version / f"{target}.tar"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self.blobs[version] = data
        return {"uri": f"file://{path}", "sha256": hashlib.sha256(data).hexdigest(),
                "size": len(data), "signature": "c2ln"}

    def write(self, current: str, previous: str | None = None,
              waves: list[dict[str, Any]] | None = None, **extra: Any) -> None:
        doc: dict[str, Any] = {
            "name": "fleet", "current": {"version": current,
                                         "packages": {"arm64": self.package(current)}},
            "rollout": {"waves": waves or [], "deviceDeploymentTimeoutSeconds": 30},
            "heartbeatIntervalSeconds": 1, "publicKey": KEY,
            "capture": {"destination": f"file://{self.root / 'captures'}"}, **extra}
        if previous is not None:
            doc["previous"] = {"version": previous, "packages": {"arm64": self.package(previous)}}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, self.path)  # atomically, as the operator does


def _register_headers(proof: str | None = None) -> dict[str, str]:
    """The bootstrap token, and the id's current credential when registering it again."""
    headers = {"authorization": f"Bearer {BOOTSTRAP}"}
    if proof is not None:
        headers[DEVICE_CREDENTIAL_HEADER] = proof
    return headers


class Device:
    """A device agent reduced to the protocol: heartbeat, install what it is told."""

    def __init__(self, url: str, device_id: str, labels: dict[str, str] | None = None,
                 proof: str | None = None) -> None:
        self.url = url
        self.id = device_id
        self.http = httpx.Client(base_url=url, timeout=5.0)
        r = self.http.post("/v1/register", headers=_register_headers(proof),
                           json={"deviceId": device_id, "target": "arm64",
                                 "labels": labels or {}})
        assert r.status_code == 200, r.text
        self.credential = r.json()["credential"]
        self.version = ""
        self.last: dict[str, Any] | None = None
        self.fail: set[str] = set()
        self.received: list[str] = []

    @property
    def auth(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.credential}"}

    def beat(self) -> dict[str, Any] | None:
        r = self.http.post(f"/v1/devices/{self.id}/heartbeat", headers=self.auth,
                           json={"version": self.version, "lastDeployment": self.last})
        assert r.status_code == 200, r.text
        desired: dict[str, Any] | None = r.json()["desired"]
        return desired

    def act(self) -> None:
        desired = self.beat()
        if desired is None or desired["version"] == self.version:
            return
        version = desired["version"]
        if self.last is not None and self.last["version"] == version \
                and self.last["outcome"] == "Failed":
            return  # already failed this one
        self.received.append(version)
        blob = self.http.get(desired["packageUrl"], headers=self.auth)
        assert blob.status_code == 200
        assert hashlib.sha256(blob.content).hexdigest() == desired["sha256"]
        if version in self.fail:
            self.last = {"version": version, "outcome": "Failed", "message": "warm-up failed"}
        else:
            self.version = version
            self.last = {"version": version, "outcome": "Succeeded"}
        self.beat()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = start_redis(tmp_path / "redis", persistent=True)
    yield server
    server.stop()


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    f = Fleet(tmp_path)
    f.write("v1")
    return f


def _env(fleet: Fleet, redis_server: RedisServer) -> dict[str, str]:
    return {"KUBEINFER_FLEET_CONFIG_FILE": str(fleet.path),
            "KUBEINFER_REDIS_URL": redis_server.url,
            "KUBEINFER_BOOTSTRAP_TOKEN": BOOTSTRAP,
            "KUBEINFER_STATUS_TOKEN": STATUS,
            "KUBEINFER_CONTROLLER_INTERVAL_SECONDS": "0.2",
            "KUBEINFER_CONTROLLER_LEASE_SECONDS": "1"}


@pytest.fixture
def server(tmp_path: Path, fleet: Fleet, redis_server: RedisServer
           ) -> Iterator[RuntimeProcess]:
    proc = start_runtime("fleet-server", _env(fleet, redis_server), tmp_path / "logs")
    yield proc
    proc.stop()


def _status(url: str) -> dict[str, Any]:
    r = httpx.get(url + "/v1/fleet", headers={"authorization": f"Bearer {BOOTSTRAP}"})
    assert r.status_code == 200, r.text
    result: dict[str, Any] = r.json()
    return result


def _error(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    message: str = r.json()["message"]
    return message


def test_device_api_and_refusals(server: RuntimeProcess, fleet: Fleet) -> None:
    url = server.url
    boot = {"authorization": f"Bearer {BOOTSTRAP}"}
    # Registration: the bootstrap token, a valid body.
    assert _error(httpx.post(url + "/v1/register", json={"deviceId": "a", "target": "arm64"}),
                  401).startswith("Bootstrap token")
    msg = _error(httpx.post(url + "/v1/register", headers={"authorization": "Bearer wrong"},
                            json={"deviceId": "a", "target": "arm64"}), 401)
    assert "wrong" not in msg
    msg = _error(httpx.post(url + "/v1/register", headers=boot,
                            json={"deviceId": "Bad_Id!", "target": "arm64"}), 400)
    assert "deviceId" in msg and "Bad_Id" not in msg
    assert "Invalid JSON" in _error(httpx.post(url + "/v1/register", headers=boot,
                                               content=b"{not json"), 400)
    _error(httpx.post(url + "/v1/register", headers=boot,
                      content=b'{"deviceId": "' + b"a" * 70_000 + b'"}'), 413)

    dev = Device(url, "dev-1", {"ring": "canary"})
    # The first version reaches the device once the controller has run.
    wait_until(lambda: dev.beat() is not None, 10, "a desired state for dev-1")
    desired = dev.beat()
    assert desired is not None and desired["version"] == "v1"
    assert desired["packageUrl"] == "/v1/packages/v1/arm64"
    blob = dev.http.get("/v1/packages/v1/arm64", headers=dev.auth)
    assert blob.content == fleet.blobs["v1"]
    assert blob.headers["x-kubeinfer-sha256"] == desired["sha256"]

    # Credentials: wrong, missing, another device's, unknown device: one 401 message.
    other = Device(url, "dev-2")
    wrong = _error(dev.http.post("/v1/devices/dev-1/heartbeat",
                                 headers={"authorization": "Bearer nope"}, json={}), 401)
    assert wrong == _error(dev.http.post("/v1/devices/ghost/heartbeat", headers=dev.auth,
                                         json={}), 401)
    assert wrong == _error(dev.http.post("/v1/devices/dev-1/heartbeat", headers=other.auth,
                                         json={}), 401)
    assert wrong == _error(dev.http.post("/v1/devices/dev-1/heartbeat", json={}), 401)
    assert "deviceId" in _error(dev.http.post("/v1/devices/UPPER/heartbeat", headers=dev.auth,
                                              json={}), 400)
    assert "requests" in _error(dev.http.post("/v1/devices/dev-1/heartbeat", headers=dev.auth,
                                              json={"requests": -1}), 400)
    _error(dev.http.post("/v1/devices/dev-1/heartbeat", headers=dev.auth,
                         content=b" " * 70_000), 413)

    # Packages: only the config's versions; names validated; a credential required.
    _error(dev.http.get("/v1/packages/v9/arm64", headers=dev.auth), 404)
    _error(dev.http.get("/v1/packages/v1/x86", headers=dev.auth), 404)
    assert "target" in _error(dev.http.get("/v1/packages/v1/ARM64", headers=dev.auth), 400)
    assert "version" in _error(dev.http.get("/v1/packages/-v1/arm64", headers=dev.auth), 400)
    # An encoded traversal matches no route at all.
    _error(dev.http.get("/v1/packages/v1/..%2F..%2Fetc", headers=dev.auth), 404)
    _error(dev.http.get("/v1/packages/v1/arm64"), 401)

    # Captures: JSON Lines of objects, bounded, written under the fleet's destination.
    r = dev.http.post("/v1/devices/dev-1/captures", headers=dev.auth,
                      content=b'{"a": 1}\n\n{"b": 2}\n')
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["accepted"] == 2
    written = Path(body["uri"].removeprefix("file://"))
    assert written.read_text() == '{"a": 1}\n{"b": 2}\n'
    assert written.relative_to(fleet.root / "captures").parts[:2] == ("fleet", "dev-1")
    assert "line 2" in _error(dev.http.post("/v1/devices/dev-1/captures", headers=dev.auth,
                                            content=b'{"a": 1}\n[1]\n'), 400)
    assert "line 1" in _error(dev.http.post("/v1/devices/dev-1/captures", headers=dev.auth,
                                            content=b'secret-bytes\n'), 400)
    _error(dev.http.post("/v1/devices/dev-1/captures", headers=dev.auth,
                         content=b"{}\n" * (3 * 1024 * 1024)), 413)

    # Fleet-wide reads: the bootstrap token; paging.
    _error(httpx.get(url + "/v1/fleet", headers=dev.auth), 401)
    status = _status(url)
    assert status["devices"] == 2 and status["rollout"]["version"] == "v1"
    assert status["counters"]["registrations"] == 2
    assert status["counters"]["refused_unauthorized"] >= 5
    page = httpx.get(url + "/v1/devices?limit=1", headers=boot).json()
    assert [d["deviceId"] for d in page["devices"]] == ["dev-1"] and page["next"] == "dev-1"
    page = httpx.get(url + "/v1/devices?limit=1&after=dev-1", headers=boot).json()
    assert [d["deviceId"] for d in page["devices"]] == ["dev-2"] and page["next"] is None
    assert "limit" in _error(httpx.get(url + "/v1/devices?limit=0", headers=boot), 400)

    # Re-registering an active device takes its credential (the bootstrap token alone is
    # refused: 409), and rotates it: the old one stops working.
    msg = _error(httpx.post(url + "/v1/register", headers=boot,
                            json={"deviceId": "dev-1", "target": "arm64"}), 409)
    assert "already registered" in msg
    old = dev.credential
    again = Device(url, "dev-1", proof=old)
    assert again.credential != old
    _error(dev.http.post("/v1/devices/dev-1/heartbeat",
                         headers={"authorization": f"Bearer {old}"}, json={}), 401)
    assert again.beat() is not None

    metrics = httpx.get(url + "/metrics").text
    assert 'kubeinfer_edge_heartbeats_total{fleet="fleet"}' in metrics
    assert 'kubeinfer_edge_refused_requests_total{fleet="fleet",reason="unauthorized"}' \
        in metrics
    assert "Traceback" not in server.log()


def test_one_capture_upload_per_device_at_a_time(tmp_path: Path, fleet: Fleet,
                                                 redis_server: RedisServer) -> None:
    """A device cannot hold the server's memory with parallel 8 MiB uploads: while one of
    its uploads is in flight the next gets 429 (its records stay on the device); other
    devices upload meanwhile, and the device again once its upload ended."""
    # The held upload must outlive however long a loaded machine takes to see it in
    # flight: the body's silence timeout (10 s by default) is raised for this server, so
    # the held upload ends only when the test closes it. Polling with second uploads while
    # it got there raced it (CI on fe54607 and 0b53864): a poll in flight first had the
    # held upload refused 429, and every later poll then succeeded.
    env = {**_env(fleet, redis_server), "KUBEINFER_HTTP_BODY_TIMEOUT_S": "300"}
    server = start_runtime("fleet-server", env, tmp_path / "logs")
    try:
        dev, other = Device(server.url, "dev-1"), Device(server.url, "dev-2")
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as held:
            held.sendall(b"POST /v1/devices/dev-1/captures HTTP/1.1\r\nHost: x\r\n"
                         + f"Authorization: Bearer {dev.credential}\r\n".encode()
                         + b"Content-Type: application/jsonl\r\nContent-Length: 100\r\n\r\n{")
            # Condition, not a race: until the server has the held upload in hand, a second
            # one of the same device would be taken instead (and the held one refused).
            wait_until(lambda: _gauge(server, "kubeinfer_edge_capture_uploads_in_flight") == 1,
                       60, "the held upload in flight")
            held.setblocking(False)
            try:
                answer = held.recv(4096)
            except BlockingIOError:
                answer = None
            finally:
                held.setblocking(True)
            assert answer is None, f"the held upload was answered: {answer!r}"
            r = dev.http.post("/v1/devices/dev-1/captures", headers=dev.auth,
                              content=b'{"a": 1}\n')
            assert "in flight" in _error(r, 429) and r.headers["retry-after"] == "5"
            ok = other.http.post("/v1/devices/dev-2/captures", headers=other.auth,
                                 content=b'{"b": 2}\n')
            assert ok.status_code == 200, ok.text
        wait_until(lambda: dev.http.post("/v1/devices/dev-1/captures", headers=dev.auth,
                                         content=b'{"a": 1}\n').status_code == 200,
                   30, "the device to upload again once its held upload ended")
    finally:
        server.stop()


def _gauge(server: RuntimeProcess, name: str) -> float:
    for line in httpx.get(server.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_the_status_token_reads_the_fleet_and_nothing_else(server: RuntimeProcess,
                                                           fleet: Fleet) -> None:
    url = server.url
    reader = {"authorization": f"Bearer {STATUS}"}
    dev = Device(url, "dev-1")
    wait_until(lambda: dev.beat() is not None, 10, "a desired state for dev-1")
    # The two fleet-wide reads: the status token, and still the bootstrap token.
    r = httpx.get(url + "/v1/fleet", headers=reader)
    assert r.status_code == 200, r.text
    assert r.json()["devices"] == 1 and r.json()["rollout"]["version"] == "v1"
    r = httpx.get(url + "/v1/devices", headers=reader)
    assert r.status_code == 200, r.text
    assert [d["deviceId"] for d in r.json()["devices"]] == ["dev-1"]
    assert _status(url)["devices"] == 1
    # Nothing else: no registering, no heartbeats, no packages, no captures.
    msg = _error(httpx.post(url + "/v1/register", headers=reader,
                            json={"deviceId": "intruder", "target": "arm64"}), 401)
    assert msg.startswith("Bootstrap token") and STATUS not in msg
    _error(httpx.post(url + "/v1/devices/dev-1/heartbeat", headers=reader, json={}), 401)
    _error(httpx.get(url + "/v1/packages/v1/arm64", headers=reader), 401)
    _error(httpx.post(url + "/v1/devices/dev-1/captures", headers=reader,
                      content=b'{"a": 1}\n'), 401)
    # A wrong token (one character off), none, or a device's credential: 401, unquoted.
    wrong = {"authorization": f"Bearer {STATUS[:-1]}x"}
    for path in ("/v1/fleet", "/v1/devices"):
        msg = _error(httpx.get(url + path, headers=wrong), 401)
        assert "status token" in msg and STATUS[:-1] not in msg
        _error(httpx.get(url + path), 401)
        _error(httpx.get(url + path, headers=dev.auth), 401)
    assert _status(url)["devices"] == 1  # the refused registration left nothing
    assert "Traceback" not in server.log()


def test_a_status_token_is_optional_and_bounded(fleet: Fleet) -> None:
    base = {"fleet_config_file": str(fleet.path), "redis_url": "redis://127.0.0.1:1/0",
            "bootstrap_token": BOOTSTRAP}
    assert FleetServerSettings(**base).status_token is None
    with pytest.raises(PydanticValidationError, match="status_token"):
        FleetServerSettings(**base, status_token="too-short")


def test_registration_settings_have_bounds(fleet: Fleet) -> None:
    base: dict[str, Any] = {"fleet_config_file": str(fleet.path),
                            "redis_url": "redis://127.0.0.1:1/0", "bootstrap_token": BOOTSTRAP}
    settings = FleetServerSettings(**base)
    assert settings.reregister_after_seconds == 600 and settings.max_devices == 100_000
    for field, value in (("reregister_after_seconds", 0), ("reregister_after_seconds", 1e9),
                         ("max_devices", 0), ("max_devices", 10**9)):
        with pytest.raises(PydanticValidationError, match=field):
            FleetServerSettings(**base, **{field: value})


def test_non_finite_numbers_are_refused_and_a_bad_record_costs_its_device_alone(
        server: RuntimeProcess, fleet: Fleet, redis_server: RedisServer) -> None:
    """1e400, NaN and Infinity used to be stored as null, and every read of the record then
    failed: 500s on the fleet-wide reads and the device's own requests, and a controller
    that stopped rolling out. They are refused naming the field; a record already stored
    that way (by an older server) is skipped by the fleet's views, with one warning naming
    the device, until that device's next heartbeat rewrites it."""
    url = server.url
    boot = {"authorization": f"Bearer {BOOTSTRAP}"}
    good, evil = Device(url, "dev-good"), Device(url, "dev-evil")

    def good_on(version: str) -> bool:
        good.act()
        return good.version == version

    wait_until(lambda: good_on("v1"), 10, "dev-good on v1")
    evil.act()
    for body, field in ((b'{"uptimeSeconds": 1e400}', "uptimeSeconds"),
                        (b'{"latencyP99Ms": NaN}', "latencyP99Ms"),
                        (b'{"lastInferenceAt": -Infinity}', "lastInferenceAt"),
                        (b'{"lastDeployment": {"version": "v1", "outcome": "Failed", '
                         b'"at": 1e400}}', "lastDeployment.at")):
        msg = _error(evil.http.post("/v1/devices/dev-evil/heartbeat", content=body,
                                    headers={**evil.auth, "content-type": "application/json"}),
                     400)
        assert field in msg and "finite" in msg, msg
    # What an older server stored for such a heartbeat (null where a number goes), and a
    # record that is not even JSON.
    client = redis_server.client()  # type: ignore[no-untyped-call]
    key = "edge:{default/fleet}:devices"
    stored = json.loads(client.hget(key, "dev-evil"))
    stored["heartbeat"]["uptimeSeconds"] = None
    client.hset(key, "dev-evil", json.dumps(stored))
    client.hset(key, "dev-junk", "{not json")

    status = _status(url)
    assert status["devices"] == 1 and status["byVersion"] == {"v1": 1}
    r = httpx.get(url + "/v1/devices", headers=boot)
    assert r.status_code == 200, r.text
    assert [d["deviceId"] for d in r.json()["devices"]] == ["dev-good"]
    assert _error(httpx.get(url + "/v1/devices/dev-junk/history", headers=boot), 404)
    # The controller goes on rolling out to the devices it can read.
    fleet.write("v2", "v1")
    wait_until(lambda: good_on("v2"), 20, "dev-good on v2")
    assert _status(url)["rollout"]["version"] == "v2"
    # The device's own heartbeat rewrites its record; its history still reads.
    evil.beat()
    r = httpx.get(url + "/v1/devices", headers=boot)
    assert [d["deviceId"] for d in r.json()["devices"]] == ["dev-evil", "dev-good"]
    assert httpx.get(url + "/v1/devices/dev-evil/history", headers=boot).status_code == 200
    wait_until(lambda: _status(url)["devices"] == 2, 10, "dev-evil back in the fleet's status")
    log = server.log()
    for device in ("dev-evil", "dev-junk"):
        assert log.count(f"the stored record of device {device} cannot be read") == 1, device
    assert "not json" not in log and "Traceback" not in log


def test_a_registered_id_is_taken_over_only_with_its_credential_or_once_silent(
        tmp_path: Path, fleet: Fleet, redis_server: RedisServer) -> None:
    """Whoever held the bootstrap token could register a live device's id again, which
    rotated its credential: the device locked out, and its reports forged. Now only the
    device holding the credential, or anyone once the id has been silent
    ``reregister_after_seconds`` (a reflashed device); and a new id only within
    ``max_devices``."""
    env = {**_env(fleet, redis_server), "KUBEINFER_REREGISTER_AFTER_SECONDS": "2",
           "KUBEINFER_MAX_DEVICES": "3"}
    proc = start_runtime("fleet-server", env, tmp_path / "logs")
    try:
        url = proc.url
        victim = Device(url, "dev-1", {"ring": "canary"})
        victim.beat()
        body = {"deviceId": "dev-1", "target": "x86", "labels": {"owner": "attacker"}}
        for proof in (None, "a-guessed-credential", ""):
            r = httpx.post(url + "/v1/register", headers=_register_headers(proof), json=body)
            msg = _error(r, 409)
            assert "dev-1 is already registered" in msg
            assert DEVICE_CREDENTIAL_HEADER in msg and "KUBEINFER_REREGISTER_AFTER_SECONDS" \
                in msg
            assert "a-guessed-credential" not in msg
        victim.beat()  # its credential still works: nothing was rotated
        page = httpx.get(url + "/v1/devices", headers={"authorization": f"Bearer {BOOTSTRAP}"})
        assert page.json()["devices"][0]["labels"] == {"ring": "canary"}

        # The device itself registers again with its credential: a new one, the old one dead.
        again = Device(url, "dev-1", {"ring": "canary"}, proof=victim.credential)
        _error(victim.http.post("/v1/devices/dev-1/heartbeat", headers=victim.auth, json={}),
               401)
        again.beat()

        # Silent past reregister_after_seconds: the id is free for a reflashed device.
        silent_since = time.monotonic()
        wait_until(lambda: httpx.post(url + "/v1/register", headers=_register_headers(),
                                      json=body).status_code == 200, 15, "the id freed")
        assert time.monotonic() - silent_since >= 1.5
        _error(again.http.post("/v1/devices/dev-1/heartbeat", headers=again.auth, json={}),
               401)

        # At most max_devices ids; ids already registered still register again.
        second = Device(url, "dev-2")
        Device(url, "dev-3")
        msg = _error(httpx.post(url + "/v1/register", headers=_register_headers(),
                                json={"deviceId": "dev-4", "target": "arm64"}), 403)
        assert "maximum of 3 devices" in msg and "KUBEINFER_MAX_DEVICES" in msg
        Device(url, "dev-2", proof=second.credential)
        counters = _status(url)["counters"]
        assert counters["refused_conflict"] >= 3 and counters["refused_forbidden"] == 1
        assert "Traceback" not in proc.log()
    finally:
        proc.stop()


def test_restart_loses_no_registration(tmp_path: Path, fleet: Fleet,
                                       redis_server: RedisServer) -> None:
    env = _env(fleet, redis_server)
    first = start_runtime("fleet-server", env, tmp_path / "logs")
    try:
        dev = Device(first.url, "dev-1")
        wait_until(lambda: dev.beat() is not None, 10, "a desired state")
    finally:
        first.stop()
    redis_server.down()  # Redis restarts too: its append-only file keeps everything
    redis_server.up()
    second = start_runtime("fleet-server", env, tmp_path / "logs")
    try:
        dev.http = httpx.Client(base_url=second.url, timeout=5.0)
        desired = dev.beat()
        assert desired is not None and desired["version"] == "v1"
    finally:
        second.stop()


def test_two_replicas_share_one_controller(tmp_path: Path, fleet: Fleet,
                                           redis_server: RedisServer) -> None:
    env = _env(fleet, redis_server)
    servers = [start_runtime("fleet-server", env, tmp_path / "logs") for _ in range(2)]
    try:
        def leaders() -> list[bool]:
            return [httpx.get(s.url + "/ping").json()["leader"] for s in servers]

        wait_until(lambda: sum(leaders()) == 1, 10, "one controller among two replicas")
        for _ in range(10):  # and it stays one
            assert sum(leaders()) == 1
        devices = [Device(servers[i % 2].url, f"dev-{i}") for i in range(4)]
        for d in devices:
            d.act()
        fleet.write("v2", "v1", waves=[{"percentage": 50, "bakeSeconds": 1},
                                       {"percentage": 100}])
        # Both replicas answer every device the same desired state, all along: ask A, B,
        # A again; when A's answer held still meanwhile, B's must be the same.
        clients = [httpx.Client(base_url=s.url, timeout=5.0) for s in servers]
        compared = 0
        for _ in range(15):
            for d in devices:
                answers = []
                for c in (clients[0], clients[1], clients[0]):
                    d.http = c
                    answers.append(d.beat())
                if answers[0] == answers[2]:
                    compared += 1
                    assert answers[1] == answers[0], (d.id, answers)
                d.act()
        assert compared > 30
        leader = leaders().index(True)
        servers[leader].proc.kill()  # no goodbye: the lease must expire
        servers[leader].proc.wait()
        survivor = servers[1 - leader]
        wait_until(lambda: httpx.get(survivor.url + "/ping").json()["leader"], 10,
                   "the surviving replica to take the lease")
        for d in devices:
            d.http = httpx.Client(base_url=survivor.url, timeout=5.0)

        def done() -> bool:
            for d in devices:
                d.act()
            return bool(_status(survivor.url)["rollout"]["phase"] == "Complete")

        wait_until(done, 20, "the rollout to finish on the surviving replica")
        assert {d.version for d in devices} == {"v2"}
    finally:
        for s in servers:
            s.stop()


def _drive(url: str, devices: list[Device], phase: str, timeout: float = 30
           ) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []

    def step() -> bool:
        for d in devices:
            d.act()
        status = _status(url)
        seen.append(status)
        return bool(status["rollout"]["phase"] == phase
                    and status["rollout"]["version"] == "v2")

    wait_until(step, timeout, f"the rollout to reach {phase}")
    return seen


def test_three_waves_reach_every_device(server: RuntimeProcess, fleet: Fleet) -> None:
    devices = [Device(server.url, f"dev-{i}") for i in range(6)]
    wait_until(lambda: all(d.act() is None and d.version == "v1" for d in devices), 10,
               "every device on v1")
    fleet.write("v2", "v1", waves=[{"percentage": 34, "bakeSeconds": 1},
                                   {"percentage": 67, "bakeSeconds": 1},
                                   {"percentage": 100}])
    seen = _drive(server.url, devices, "Complete")
    # A bad config file keeps the last good one in force, and the server keeps serving.
    fleet.path.write_text('{"name": "fleet", "current": ')
    wait_until(lambda: "is invalid" in server.log(), 10, "the bad config to be reported")
    assert devices[0].beat() is not None
    assert _status(server.url)["rollout"]["version"] == "v2"
    assert {d.version for d in devices} == {"v2"}
    on_v2 = [s["byVersion"].get("v2", 0) for s in seen]
    waves = {s["rollout"]["wave"] for s in seen if s["rollout"]["version"] == "v2"}
    # Progressive: some observations had part of the fleet on v2, in several waves.
    assert any(0 < n < 6 for n in on_v2), on_v2
    # The first two waves bake a second each, so the polls see them. The last one has no
    # bake: its one device reports v2 during a poll's heartbeats and a controller tick
    # before that poll's status read can complete the rollout, so no poll need see it.
    # That the three waves ran, in order, is in the controller's events.
    assert {0, 1} <= waves, waves
    log = server.log()
    done = [log.find(f"Wave {n}/3 of version v2 done") for n in (1, 2, 3)]
    assert -1 not in done and done == sorted(done), done
    assert _status(server.url)["byState"]["Online"] == 6


def test_failing_first_wave_rolls_back(server: RuntimeProcess, fleet: Fleet) -> None:
    devices = [Device(server.url, f"dev-{i}") for i in range(6)]
    wait_until(lambda: all(d.act() is None and d.version == "v1" for d in devices), 10,
               "every device on v1")
    for d in devices:
        d.fail = {"v2"}
    # minDevices 2: the wave trips once both its devices failed. With the default (1) it
    # tripped at the first failure, and when a controller tick came before the other
    # device's next heartbeat, that one was told v1 again and never tried v2.
    fleet.write("v2", "v1", waves=[{"percentage": 33, "minDevices": 2}, {"percentage": 100}])
    _drive(server.url, devices, "RolledBack")
    status = _status(server.url)
    assert status["rollout"]["wave"] == 0
    assert "rolled back to v1" in status["rollout"]["message"]
    tried = [d for d in devices if "v2" in d.received]
    assert len(tried) == 2  # wave 1 only (33 % of 6, rounded up)
    assert status["byState"]["Failed"] == 2
    for d in devices:
        desired = d.beat()
        assert desired is not None and desired["version"] == "v1"
        assert d.version == "v1"
    # Each device's history, newest first: the failed v2 attempt on a first-wave device.
    boot = {"authorization": f"Bearer {BOOTSTRAP}"}
    r = httpx.get(f"{server.url}/v1/devices/{tried[0].id}/history", headers=boot)
    assert r.status_code == 200, r.text
    history = DeviceHistory.model_validate_json(r.content)
    assert history.deviceId == tried[0].id
    failed = [e for e in history.entries if e.lastDeployment is not None
              and e.lastDeployment.version == "v2"]
    assert failed and failed[0].lastDeployment is not None
    assert failed[0].lastDeployment.outcome == "Failed"
    assert [e.at for e in history.entries] == sorted((e.at for e in history.entries),
                                                     reverse=True)
    assert history.entries[-1].version == ""  # the first heartbeat, before any install
    # The status token reads it too; a device credential, no token or an unknown device
    # do not (401 / 404, the token never quoted); the id is checked before Redis.
    r = httpx.get(f"{server.url}/v1/devices/{tried[0].id}/history",
                  headers={"authorization": f"Bearer {STATUS}"})
    assert r.status_code == 200, r.text
    _error(httpx.get(f"{server.url}/v1/devices/{tried[0].id}/history",
                     headers=tried[0].auth), 401)
    _error(httpx.get(f"{server.url}/v1/devices/{tried[0].id}/history"), 401)
    assert "ghost" in _error(httpx.get(f"{server.url}/v1/devices/ghost/history",
                                       headers=boot), 404)
    assert "deviceId" in _error(httpx.get(f"{server.url}/v1/devices/UPPER/history",
                                          headers=boot), 400)


def _stored_text(redis_server: RedisServer) -> str:
    """Every key and value Redis holds, as one text (to search for what must not be there)."""
    client = redis_server.client()
    parts: list[str] = []
    for key in client.scan_iter("*"):
        kind = client.type(key)
        parts.append(str(key))
        if kind == "string":
            parts.append(str(client.get(key)))
        elif kind == "hash":
            parts.append(str(client.hgetall(key)))
        elif kind == "list":
            parts.append(str(client.lrange(key, 0, -1)))
        elif kind == "set":
            parts.append(str(client.smembers(key)))
        elif kind == "zset":
            parts.append(str(client.zrange(key, 0, -1, withscores=True)))
    return "\n".join(parts)


def test_a_restart_mid_rollout_keeps_the_wave_desired_states_and_history(
        tmp_path: Path, fleet: Fleet, redis_server: RedisServer) -> None:
    # The fleet server and its Redis both restart while a rollout bakes its first wave:
    # the rollout resumes where it was (same wave, same bake start, the same desired
    # state for every device), and no device's history or registration is lost.
    env = _env(fleet, redis_server)
    first = start_runtime("fleet-server", env, tmp_path / "logs")
    boot = {"authorization": f"Bearer {BOOTSTRAP}"}
    try:
        devices = [Device(first.url, f"dev-{i}") for i in range(4)]
        wait_until(lambda: all(d.act() is None and d.version == "v1" for d in devices), 10,
                   "every device on v1")
        fleet.write("v2", "v1", waves=[{"percentage": 50, "bakeSeconds": 3600},
                                       {"percentage": 100}])

        def first_wave_done() -> bool:
            for d in devices:
                d.act()
            return sum(d.version == "v2" for d in devices) == 2

        wait_until(first_wave_done, 30, "the first wave on v2")
        before = _status(first.url)["rollout"]
        assert before["phase"] == "Progressing" and before["wave"] == 0, before
        desired = {d.id: d.beat() for d in devices}
        history = {d.id: httpx.get(f"{first.url}/v1/devices/{d.id}/history",
                                   headers=boot).json() for d in devices}
    finally:
        first.stop()
    # Only credential hashes are stored: no device's credential appears anywhere in Redis.
    stored = _stored_text(redis_server)
    assert "dev-0" in stored  # the scan did read the fleet's records
    for d in devices:
        assert d.credential not in stored, d.id
    redis_server.down()  # its append-only file is all that survives
    redis_server.up()
    second = start_runtime("fleet-server", env, tmp_path / "logs")
    try:
        after = _status(second.url)["rollout"]
        for key in ("version", "previousVersion", "phase", "wave", "startedAt"):
            assert after[key] == before[key], (key, before, after)
        for d in devices:
            d.http = httpx.Client(base_url=second.url, timeout=5.0)
            # History first: a heartbeat that changes nothing adds no entry anyway.
            r = httpx.get(f"{second.url}/v1/devices/{d.id}/history", headers=boot)
            assert r.status_code == 200, r.text
            assert r.json() == history[d.id]
            assert d.beat() == desired[d.id], d.id
        # The second wave still waits for the first one's bake (an hour), after a restart.
        for _ in range(3):
            for d in devices:
                d.act()
        assert sorted(d.version for d in devices) == ["v1", "v1", "v2", "v2"]
        assert _status(second.url)["rollout"]["wave"] == 0
    finally:
        second.stop()
