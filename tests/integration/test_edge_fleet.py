"""An edge fleet end to end: ``kubeinfer up -f`` of an EdgeFleet and 20 real device agents.

Everything is a real process on 127.0.0.1: the local fleet runner, its packaging
steps (signed packages), its private redis-server and fleet server, and 20
``kubeinfer edge agent`` processes (separate state dirs), each with its own
model-server child. Versions differ in what they answer (``factor * (x0 + x1)``),
so each agent's local ``/invocations`` says which version it serves.

One module-scoped fleet, driven through a sequence of versions (the tests run in
file order and each starts from the previous one's end):

1. v1 (factor 1) reaches all 20 devices at once (a fleet's first version);
2. v2 (factor 2) rolls out in 3 waves; one agent SIGKILLed mid-install comes back
   on a consistent version and finishes on v2;
3. v3, whose warm-up fails, trips the first wave: every device stays on or returns
   to v2 and no device outside the first wave ever downloads v3;
4. v4 (factor 4) with one first-wave agent frozen (SIGSTOP): it is Stalled after
   ``deviceDeploymentTimeoutSeconds`` and the wave goes on without it;
5. v5 (factor 5) with two first-wave agents frozen: the wave trips after the
   timeout and the first-wave devices that took v5 report v4 (by the server's own
   history) within 2 heartbeat intervals of the trip, and serve it again;
6. the aarch64 target: a package built by the compile step (TVM, verified under
   qemu-aarch64), served by the fleet server, verifies with the fleet's key.
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from kubeinfer_operator.local.edge_control import parse_fleets
from kubeinfer_operator.local.edge_state import FleetPaths, read_fleet_state
from kubeinfer_runtime.contract.edge import RegisterResponse, Wave
from kubeinfer_runtime.edge import package as pkg
from kubeinfer_runtime.edge.agent_install import reserve_port
from kubeinfer_runtime.edge.waves import DeviceView, assign_waves
from tests.conftest import REPO
from tests.support.onnx_models import fails_every_inference_model, scale_sum_model
from tests.support.orphans import die_with_parent
from tests.support.ports import stop_process, wait_until

DEVICES = 20
HEARTBEAT_S = 1
#: deviceDeploymentTimeoutSeconds: an install (download, unpack, a model server's start and
#: warm-up) must fit in it on a loaded 2-core runner, or a live device counts as Stalled.
TIMEOUT_S = 20
TOKEN = "edge-fleet-test-bootstrap-token-0123"
#: Unpacked by scripts/setup test from the aarch64 wheels (as the compile tests use it).
AARCH64_RUNTIME = REPO / ".cache" / "aarch64-tvm"
WAVES = [{"percentage": 20, "maxFailurePercent": 25, "bakeSeconds": 1},
         {"percentage": 60, "maxFailurePercent": 25},
         {"percentage": 100, "maxFailurePercent": 25}]
#: Lines of an agent's log (and of the fleet's logs) a timed-out wait shows.
LOG_LINES = 20
#: What an agent logs at every heartbeat (httpx logs each request at INFO) and at every
#: request the test sends through it: left out of the tails, or they would be nothing else.
ROUTINE = re.compile(r' httpx HTTP Request: \S+ \S+/(heartbeat|invocations) "HTTP/[\d.]+ 2\d\d ')


@functools.cache
def _http() -> httpx.Client:
    """The client of every request the test makes. ``httpx.post`` builds a client, and its
    TLS context, per call (~50 ms of CPU): polling 20 agents every 0.05 s could keep one
    core of a 2-core runner busy while the agents installed. No keep-alive: each request
    opens a connection of its own, as ``httpx.post`` did."""
    return httpx.Client(timeout=10, limits=httpx.Limits(max_keepalive_connections=0))


def _tail(path: Path, lines: int = LOG_LINES) -> str:
    """The last ``lines`` lines of a log but the ``ROUTINE`` ones, indented (what it says
    when it is missing)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 256 * 1024))
            text = f.read().decode(errors="replace")
    except OSError as e:
        return f"    ({e.strerror})"
    kept = [line for line in text.splitlines() if not ROUTINE.search(line)]
    return "\n".join("    " + line for line in kept[-lines:]) or "    (empty)"


def _process(proc: subprocess.Popen[bytes] | None) -> str:
    """``running``, ``frozen`` (SIGSTOP) or how it exited."""
    if proc is None:
        return "not started"
    if proc.poll() is not None:
        return f"pid {proc.pid} EXITED {proc.returncode}"
    try:  # the state letter follows the command name, which may hold spaces
        state = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        state = "?"
    return f"pid {proc.pid} " + ("frozen (SIGSTOP)" if state == "T" else f"running ({state})")


def _device_line(d: dict[str, Any], now: float) -> str:
    """One device as the fleet server sees it (``GET /v1/devices``)."""
    last = d.get("lastDeployment") or {}
    result = (f"{last.get('version')} {last.get('outcome')}"
              + (f": {str(last['message'])[:300]}" if last.get("message") else "")
              if last else "-")
    seen = now - float(d.get("lastSeen") or 0)
    return (f"state {d.get('state')}, version {d.get('version') or '-'}, desired "
            f"{d.get('desiredVersion') or '-'}, last seen {seen:.1f} s ago, last deployment "
            f"{result}")


def manifest(model: Path, *, arm: bool = False) -> str:
    targets = "    - name: x86-64\n"
    if arm:
        targets += "    - name: arm64\n      compile: {target: aarch64}\n"
    waves = "".join(
        "      - " + ", ".join(f"{k}: {v}" for k, v in w.items()).join("{}") + "\n"
        for w in WAVES)
    return (f"apiVersion: kubeinfer.io/v1alpha1\nkind: EdgeFleet\nmetadata:\n  name: fleet\n"
            f"spec:\n  model:\n    uri: file://{model}\n  targets:\n{targets}"
            f"  rollout:\n    waves:\n{waves}    onFailure: Rollback\n"
            f"    deviceDeploymentTimeoutSeconds: {TIMEOUT_S}\n"
            f"  heartbeatIntervalSeconds: {HEARTBEAT_S}\n"
            "  registration: {bootstrapTokenSecret: {name: boot, key: token}}\n"
            "  signing: {keySecret: {name: sign, key: key}}\n"
            "  packages: {uri: s3://unused-locally/}\n"
            "  redis: {url: redis://unused-locally:6379/0}\n")


@dataclass
class Agent:
    device: str
    state: Path
    port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    #: Holds ``port`` for the agent from the start of the module to its end (the agent's
    #: own bind succeeds beside it): no server started meanwhile is given it.
    reservation: socket.socket | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def answer(self, timeout: float = 5) -> float | None:
        """What the served model answers for [[1, 2]] (None: nothing served now)."""
        try:
            r = _http().post(self.url + "/invocations", json=[[1, 2]], timeout=timeout)
        except httpx.HTTPError:
            return None
        if r.status_code != 200:
            return None
        return float(np.asarray(r.json()["predictions"]).ravel()[0])

    def ping(self) -> str:
        """The agent's ``GET /ping`` (what it serves, or why nothing), as text."""
        try:
            r = _http().get(self.url + "/ping", timeout=2)
        except httpx.HTTPError as e:
            return type(e).__name__
        return f"{r.status_code} {r.text[:300]}"

    def journal(self) -> str:
        """The agent's own state.json: current, pending install, last deployment, failure."""
        try:
            doc = json.loads((self.state / "state.json").read_text())
        except FileNotFoundError:
            return "(none yet)"
        except (OSError, ValueError) as e:
            return f"(unreadable: {e})"
        current = doc.get("current") or {}
        return json.dumps({"current": f"{current.get('version')} in slot {current.get('slot')}"
                           if current else None, "pending": doc.get("pending"),
                           "lastDeployment": doc.get("lastDeployment"),
                           "failedVersion": doc.get("failedVersion") or None})

    def describe(self, answer: float | None, seen_by_server: str) -> str:
        """What a timed-out wait shows of the agent: its process, what it answers, its own
        state, the fleet server's view of it and the tails of its logs."""
        lines = [f"- {self.device} on {self.url}: process {_process(self.proc)}; answers "
                 f"{answer}; /ping {self.ping()}",
                 f"  fleet server: {seen_by_server}",
                 f"  state.json: {self.journal()}",
                 f"  {self.log} (last {LOG_LINES} lines):", _tail(self.log)]
        for child in sorted((self.state / "logs").glob("model-server-*.log")):
            lines += [f"  {child.name} (last 8 lines):", _tail(child, 8)]
        return "\n".join(lines)


@dataclass
class Fleet:
    home: Path
    work: Path
    url: str = ""
    agents: list[Agent] = field(default_factory=list)
    models: dict[str, Path] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "KUBEINFER_HOME": str(self.home),
                "KUBEINFER_CROSS_RUNTIME_DIR": str(AARCH64_RUNTIME)}

    def cli(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "kubeinfer_operator", *args],
                              env=self.env, capture_output=True, text=True, timeout=timeout)

    def up(self, model: Path, *, arm: bool = False) -> str:
        """Apply the manifest for ``model``; the version the fleet now rolls out."""
        path = self.work / "fleet.yaml"
        path.write_text(manifest(model, arm=arm))
        done = self.cli("up", "-f", str(path), "-d")
        assert done.returncode == 0, done.stdout + done.stderr
        rows = json.loads(self.cli("status", "--json").stdout)["edge_fleets"]
        [row] = [r for r in rows if r["name"] == "fleet"]
        self.url = str(row["url"])
        return str(row["version"])

    def version_of(self, model: Path, *, arm: bool = False) -> str:
        """The version ``up`` of this model will roll out (known before applying it)."""
        [loaded] = parse_fleets(manifest(model, arm=arm), source="t", base_dir="/")
        return loaded.fleet.version

    def get(self, path: str) -> dict[str, Any]:
        r = _http().get(self.url + path, headers={"Authorization": f"Bearer {TOKEN}"},
                        params={"limit": "1000"}, timeout=10)
        assert r.status_code == 200, r.text
        doc: dict[str, Any] = r.json()
        return doc

    def devices(self) -> dict[str, dict[str, Any]]:
        return {d["deviceId"]: d for d in self.get("/v1/devices")["devices"]}

    def rollout(self) -> dict[str, Any]:
        return dict(self.get("/v1/fleet")["rollout"] or {})

    def start(self, agent: Agent) -> None:
        with open(agent.log, "ab") as out:
            agent.proc = subprocess.Popen(
                [sys.executable, "-m", "kubeinfer_operator", "edge", "agent",
                 "--server", self.url, "--device-id", agent.device, "--target", "x86-64",
                 "--state-dir", str(agent.state), "--listen", f"127.0.0.1:{agent.port}"],
                env={**self.env, "KUBEINFER_EDGE_BOOTSTRAP_TOKEN": TOKEN},
                stdout=out, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)

    def serving(self, factor: float, agents: list[Agent] | None = None) -> bool:
        return all(a.answer() == 3.0 * factor for a in (agents or self.agents))

    def first_wave(self, version: str) -> list[Agent]:
        views = [DeviceView(device_id=a.device, target="x86-64", labels={}, version="",
                            updating=False, updating_to="", last_deployment=None,
                            last_seen=0.0, registered_at=0.0) for a in self.agents]
        members = assign_waves(version, [Wave.model_validate(w) for w in WAVES], views)
        return [a for a in self.agents if members[a.device] == 0]

    def alive(self) -> bool:
        for a in self.agents:
            if a.proc is not None and a.proc.poll() is not None:
                raise AssertionError(f"agent {a.device} exited {a.proc.returncode}:\n"
                                     + a.log.read_text(errors="replace")[-3000:])
        return True

    def wait(self, predicate: Callable[[], bool], timeout: float, what: str, *,
             expect: float | None = None, agents: Sequence[Agent] | None = None,
             interval: float = 0.05) -> None:
        """``wait_until``; on a timeout the error also shows the fleet and each agent (of
        ``agents``, default all) that does not serve version factor ``expect`` (None: that
        serves nothing), so that a run that timed out can be diagnosed from its output."""
        try:
            wait_until(predicate, timeout, what, interval=interval)
        except TimeoutError as e:
            try:
                report = self.report(expect, agents)
            except Exception as failed:  # the report must never hide the timeout
                report = f"(the fleet's report failed: {failed!r})"
            raise TimeoutError(f"{e}\n{report}") from None

    def report(self, expect: float | None, agents: Sequence[Agent] | None = None) -> str:
        """The runner's state, the server's rollout and devices, the agents that do not serve
        ``expect`` (described in full) and the tails of the runner's and server's logs."""
        paths = FleetPaths.for_fleet("fleet", self.home)
        out = [f"---- fleet {paths.root} ----"]
        state = read_fleet_state(paths)
        if state is None:
            out.append("runner state.json: missing or unreadable")
        else:
            out.append(
                f"runner: phase {state.phase.value}, url {state.url}, server pid "
                f"{state.server_pid} ({state.server_restarts} restarts), current "
                f"{state.current.version if state.current else '-'}, previous "
                f"{state.previous.version if state.previous else '-'}, failed "
                f"{state.failed_version or '-'}, rollout {state.rollout_version} "
                f"{state.rollout_phase}, {state.devices} devices; message {state.message!r}")
            out += [f"  event: {event}" for event in state.events[-8:]]
        try:
            status = self.get("/v1/fleet")
            out.append(f"server: byState {status.get('byState')}, byVersion "
                       f"{status.get('byVersion')}, rollout {json.dumps(status.get('rollout'))}")
            devices = self.devices()
        except (AssertionError, httpx.HTTPError, ValueError) as e:
            out.append(f"server: unreadable ({type(e).__name__}: {str(e)[:300]})")
            devices = {}
        now = time.time()
        if expect is None:
            out.append("agents that serve nothing:")
        else:
            out.append(f"agents that do not serve {3.0 * expect} (version factor {expect}):")
        fine = []
        for a in agents or self.agents:
            got = a.answer(timeout=2)
            if got is not None if expect is None else got == 3.0 * expect:
                fine.append(a.device)
                continue
            d = devices.get(a.device)
            out.append(a.describe(got, _device_line(d, now) if d else "not registered"))
        out.append(f"the others ({len(fine)}) serve as expected: {', '.join(fine) or '-'}")
        out += [f"{paths.runner_log} (last {LOG_LINES} lines):", _tail(paths.runner_log),
                f"{paths.log_file('fleet-server')} (last {LOG_LINES} lines):",
                _tail(paths.log_file("fleet-server"))]
        return "\n".join(out)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    work = tmp_path_factory.mktemp("edge-fleet")
    f = Fleet(home=work / "home", work=work)
    for name, factor in (("v1", 1.0), ("v2", 2.0), ("v4", 4.0), ("v5", 5.0)):
        f.models[name] = scale_sum_model(work / f"{name}.onnx", factor)
    f.models["v3"] = fails_every_inference_model(work / "v3.onnx")
    # Local Secrets the manifest names (kubeinfer secret create), so the token is known.
    assert f.cli("secret", "create", "boot", "--from-literal", f"token={TOKEN}").returncode == 0
    for i in range(DEVICES):
        held = reserve_port()
        f.agents.append(Agent(f"dev-{i:02d}", work / f"agent-{i:02d}", held.getsockname()[1],
                              work / f"agent-{i:02d}.log", reservation=held))
    try:
        yield f
    finally:
        for a in f.agents:
            if a.proc is not None:
                if a.proc.poll() is None:
                    os.kill(a.proc.pid, signal.SIGCONT)  # a frozen agent cannot stop
                stop_process(a.proc, timeout=15)
            if a.reservation is not None:
                a.reservation.close()
        f.cli("down", "--all", timeout=120)


def test_first_version_reaches_every_device(fleet: Fleet) -> None:
    fleet.up(fleet.models["v1"])
    for agent in fleet.agents:
        fleet.start(agent)
    fleet.wait(lambda: fleet.alive() and fleet.serving(1.0), 180, "20 agents serving v1",
               expect=1.0)
    # An agent serves the new version before its next heartbeat reports the install, so
    # the server may still count it Updating for up to one interval.
    fleet.wait(lambda: {d["state"] for d in fleet.devices().values()} == {"Online"}, 60,
               "every device reported Online", expect=1.0)
    assert len(fleet.devices()) == DEVICES
    # Each agent keeps its own credential, readable by its user only.
    for agent in fleet.agents:
        cred = agent.state / "credential.json"
        assert cred.stat().st_mode & 0o777 == 0o600
        assert json.loads(cred.read_text())["deviceId"] == agent.device


def test_three_waves_and_an_agent_killed_mid_install(fleet: Fleet) -> None:
    version = fleet.up(fleet.models["v2"])
    first = fleet.first_wave(version)
    assert len(first) == 4  # 20 % of 20
    victim = first[0]
    # Wave 1 first: its devices turn Updating (or already v2) while the others wait.
    fleet.wait(lambda: fleet.devices()[victim.device]["desiredVersion"] == version, 60,
               "the first wave's desired version")
    assert victim.proc is not None
    victim.proc.kill()  # mid-install (or just after): a restart must resume or roll back
    victim.proc.wait()
    seen_waves: set[int] = set()
    mixed = False

    def progress() -> bool:
        nonlocal mixed
        rollout = fleet.rollout()
        seen_waves.add(int(rollout.get("wave", -1)))
        versions = {d["version"] for d in fleet.devices().values()}
        mixed = mixed or len(versions) > 1
        return rollout.get("phase") != "Progressing" or int(rollout.get("wave", 0)) >= 1

    fleet.wait(progress, 120, "the first wave to pass")
    # The killed agent comes back on a consistent version (v1 or v2, never half of one).
    fleet.start(victim)
    fleet.wait(lambda: victim.answer() in (3.0, 6.0), 60, "the restarted agent serving",
               agents=[victim])

    def done() -> bool:
        fleet.alive()
        progress()
        return fleet.rollout().get("phase") == "Complete" and fleet.serving(2.0)

    fleet.wait(done, 240, "v2 on every device", expect=2.0)
    assert {0, 1, 2} <= seen_waves | {3}, seen_waves
    assert mixed, "the rollout never had v1 and v2 side by side (not in waves)"
    assert victim.answer() == 6.0


def test_failing_warm_up_trips_the_first_wave(fleet: Fleet) -> None:
    version = fleet.up(fleet.models["v3"])
    first = {a.device for a in fleet.first_wave(version)}
    fleet.wait(lambda: fleet.alive() and fleet.rollout().get("phase") == "RolledBack", 120,
               "the v3 rollout to roll back")
    devices = fleet.devices()
    failed = {d for d, v in devices.items() if (v.get("lastDeployment") or {}).get(
        "version") == version and v["lastDeployment"]["outcome"] == "Failed"}
    assert failed and failed <= first, (failed, first)
    # Nobody outside the first wave was ever told v3; everyone is told v2 again.
    fleet.wait(lambda: all(d["desiredVersion"] != version for d in fleet.devices().values()),
               10, "every device's desired version back to v2")
    assert fleet.serving(2.0)
    # `kubeinfer edge history` shows a failed device's attempt; `edge devices` lists all.
    device = sorted(failed)[0]
    shown = fleet.cli("edge", "history", "fleet", device, "--json")
    assert shown.returncode == 0, shown.stdout + shown.stderr
    entries = json.loads(shown.stdout)["entries"]
    assert any((e.get("lastDeployment") or {}).get("version") == version
               and e["lastDeployment"]["outcome"] == "Failed" for e in entries), entries
    table = fleet.cli("edge", "history", "fleet", device)
    assert table.returncode == 0 and f"{version} Failed" in table.stdout, table.stdout
    missing = fleet.cli("edge", "history", "fleet", "no-such-device")
    assert missing.returncode == 1 and "404" in missing.stderr, missing.stderr
    listed = fleet.cli("edge", "devices", "fleet", "--json")
    assert listed.returncode == 0, listed.stderr
    assert len(json.loads(listed.stdout)["devices"]) == DEVICES


def test_a_stalled_agent_does_not_block_the_wave(fleet: Fleet) -> None:
    # Frozen before the version is applied: after, it could take it before the SIGSTOP.
    version = fleet.version_of(fleet.models["v4"])
    [frozen, *_] = fleet.first_wave(version)
    assert frozen.proc is not None
    os.kill(frozen.proc.pid, signal.SIGSTOP)
    assert fleet.up(fleet.models["v4"]) == version
    try:
        fleet.wait(lambda: fleet.alive() and fleet.rollout().get("phase") == "Complete", 240,
                   "the v4 rollout to complete without the frozen agent")
        assert fleet.devices()[frozen.device]["state"] in ("Stalled", "Offline")
        others = [a for a in fleet.agents if a is not frozen]
        fleet.wait(lambda: fleet.serving(4.0, others), 60, "v4 on the 19 other devices",
                   expect=4.0, agents=others)
    finally:
        os.kill(frozen.proc.pid, signal.SIGCONT)
    # Thawed, it takes the fleet's version as any late device does.
    fleet.wait(lambda: frozen.answer() == 12.0, 120, "the thawed agent on v4", expect=4.0,
               agents=[frozen])


def test_a_tripped_wave_rolls_updated_devices_back(fleet: Fleet) -> None:
    # Frozen before the version is applied: after, one could take it before the SIGSTOP.
    version = fleet.version_of(fleet.models["v5"])
    first = fleet.first_wave(version)
    frozen, took = first[:2], first[2:]
    for a in frozen:
        assert a.proc is not None
        os.kill(a.proc.pid, signal.SIGSTOP)
    assert fleet.up(fleet.models["v5"]) == version
    try:
        # The others of the wave install v5 before the frozen two time out.
        fleet.wait(lambda: fleet.alive() and fleet.serving(5.0, took), 120,
                   "v5 on the first wave's live devices", expect=5.0, agents=took)
        fleet.wait(lambda: fleet.rollout().get("phase") == "RolledBack", TIMEOUT_S * 6,
                   "the trip (two of four stalled: 50 % > 25 %)")
        tripped = time.monotonic()
        rollout = fleet.rollout()
        trip_at, previous = float(rollout["finishedAt"]), str(rollout["previousVersion"])
        assert all(d["version"] != version for d in fleet.devices().values()
                   if d["deviceId"] not in {a.device for a in first})
        fleet.wait(lambda: fleet.serving(4.0, took), 60, "the updated devices back on v4",
                   expect=4.0, agents=took)
        assert time.monotonic() - tripped < 60
        # Reached within 2 heartbeat intervals, by the server's own clock: a device learns
        # the rollback at its first heartbeat after the trip and reports at once that it
        # is updating to it (or, done, runs it); its history records when that arrived.
        # Agents jitter their interval by up to 20 %; the 1.5 s is a loaded runner's
        # scheduling, far below a delivery that waited on a timeout or a config refresh.
        reached: dict[str, float] = {}

        def reported() -> bool:
            for a in took:
                entries = fleet.get(f"/v1/devices/{a.device}/history")["entries"]
                times = [e["at"] for e in entries if e["at"] >= trip_at
                         and previous in (e["version"], e.get("updatingTo"))]
                if times:
                    reached[a.device] = min(times)
            return len(reached) == len(took)

        fleet.wait(reported, 30, "the updated devices to report the rollback", agents=took)
        late = {d: round(at - trip_at, 2) for d, at in reached.items()
                if at - trip_at > 2 * HEARTBEAT_S * 1.2 + 1.5}
        assert not late, (trip_at, late)
    finally:
        for a in frozen:
            assert a.proc is not None
            os.kill(a.proc.pid, signal.SIGCONT)
    others = [a for a in fleet.agents if a not in took]
    fleet.wait(lambda: fleet.serving(4.0, others), 120, "every device on v4", expect=4.0,
               agents=others)


@pytest.mark.skipif(not (AARCH64_RUNTIME / "lib" / "libtvm_runtime.so").is_file(),
                    reason="the aarch64 TVM runtime is missing: run scripts/setup test")
def test_an_aarch64_package_from_the_compile_step(fleet: Fleet) -> None:
    # A registered arm64 board (an HTTP client here: its package cannot run on this x86
    # host) downloads and verifies its package through the fleet server, as an agent does.
    r = _http().post(fleet.url + "/v1/register", json={"deviceId": "board-1",
                                                       "target": "arm64"},
                     headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert r.status_code == 200, r.text
    reg = RegisterResponse.model_validate_json(r.content)
    headers = {"Authorization": f"Bearer {reg.credential}"}
    version = fleet.up(fleet.models["v4"], arm=True)  # a new target: a new version
    report: dict[str, Any] = {"version": ""}
    got: dict[str, Any] = {}

    def beat() -> bool:
        answer = _http().post(f"{fleet.url}/v1/devices/board-1/heartbeat", json=report,
                              headers=headers, timeout=10)
        assert answer.status_code == 200, answer.text
        desired = answer.json()["desired"]
        if desired and desired["version"] == version:
            got.update(desired)
            return True
        return False

    fleet.wait(lambda: fleet.alive() and beat(), 240, "the arm64 board's desired version",
               interval=HEARTBEAT_S / 2)
    data = _http().get(fleet.url + got["packageUrl"], headers=headers, timeout=60).content
    blob = fleet.work / "arm64.tar.gz"
    blob.write_bytes(data)
    pkg.verify_download(blob, sha256=got["sha256"], size=got["size"],
                        signature=got["signature"], public_key=reg.publicKey, fleet="fleet",
                        version=version, target="arm64")
    out = fleet.work / "arm64-extracted"
    package = pkg.extract(blob, out)
    assert package.format == "compiled" and package.target == "arm64"
    compiled = json.loads((out / package.model / "manifest.json").read_text())
    assert compiled["backend"] == "tvm", compiled["reason"]
    assert compiled["target"]["triple"] == "aarch64-linux-gnu"
    assert compiled["verification"].startswith("verified under emulation (qemu-aarch64)")
    with tarfile.open(blob) as tar:
        assert any(m.name.endswith(".so") for m in tar.getmembers()), "no TVM library"
    report.update(version=version, lastDeployment={"version": version,
                                                   "outcome": "Succeeded", "at": time.time()})

    def complete() -> bool:
        beat()
        return fleet.alive() and fleet.rollout().get("phase") == "Complete"

    fleet.wait(complete, 240, "the rollout of the two-target version", interval=HEARTBEAT_S / 2)
    assert fleet.serving(4.0)
    assert fleet.devices()["board-1"]["version"] == version
