"""Local mode end to end: the real `kubeinfer` CLI, supervisors, gateway and model servers.

Every test gets its own KUBEINFER_HOME. Children inherit it in their
environment, which is how the tests find every process local mode started and
prove none is left behind (``our_processes``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config

from tests.support.ports import wait_until

VARIANT = """\
    - name: {name}
      weight: {weight}
      replicas: {replicas}
      model:
        uri: file://{model}
"""


def manifest(name: str, *variants: dict[str, Any]) -> str:
    body = "".join(VARIANT.format(**v) for v in variants)
    return (f"apiVersion: kubeinfer.io/v1alpha1\nkind: Endpoint\nmetadata:\n  name: {name}\n"
            f"spec:\n  variants:\n{body}")


class Local:
    """Runs the CLI against one KUBEINFER_HOME and finds the processes it started."""

    def __init__(self, home: Path, workdir: Path) -> None:
        self.home = home
        self.workdir = workdir
        self.env = {**os.environ, "KUBEINFER_HOME": str(home)}

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "kubeinfer_operator.cli", *args]

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(*args), env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def write(self, name: str, text: str) -> Path:
        path = self.workdir / name
        path.write_text(text)
        return path

    def status(self, name: str | None = None) -> dict[str, Any]:
        result = self.run("status", "--json", *([name] if name else []))
        doc: dict[str, Any] = json.loads(result.stdout)
        return doc

    def endpoint(self, name: str) -> dict[str, Any]:
        [state] = [e for e in self.status()["endpoints"] if e["endpoint"] == name]
        return state

    def pids(self, name: str) -> dict[str, int]:
        return {p["name"]: p["pid"] for p in self.endpoint(name)["processes"]}

    def our_processes(self) -> list[int]:
        """Pids of live processes (not zombies) whose environment holds our KUBEINFER_HOME."""
        marker = f"KUBEINFER_HOME={self.home}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                environ = (entry / "environ").read_bytes()
            except OSError:
                continue
            if marker in environ.split(b"\0") and not gone(int(entry.name)):
                found.append(int(entry.name))
        return found

    def wait_no_processes(self, timeout: float = 20) -> None:
        wait_until(lambda: not self.our_processes(), timeout, "every local process to exit")


@pytest.fixture
def local(tmp_path: Path) -> Iterator[Local]:
    lm = Local(tmp_path / "home", tmp_path)
    yield lm
    # Whatever a test did, leave nothing running.
    if lm.our_processes():
        lm.run("down", "--all", timeout=60)
    for pid in lm.our_processes():
        os.kill(pid, signal.SIGKILL)


def gone(pid: int) -> bool:
    """True when ``pid`` has exited (a zombie waiting to be reaped counts as exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rfind(")") + 2] == "Z"


def runtime_client(url: str) -> Any:
    return boto3.client("sagemaker-runtime", endpoint_url=url, region_name="us-east-1",
                        aws_access_key_id="local", aws_secret_access_key="local",
                        config=Config(retries={"max_attempts": 1}))


BODY = json.dumps({"instances": [[5.1, 3.5, 1.4, 0.2]]})


def invoke(client: Any, endpoint: str = "ep", variant: str | None = None) -> tuple[str, Any]:
    kwargs = {"TargetVariant": variant} if variant else {}
    r = client.invoke_endpoint(EndpointName=endpoint, ContentType="application/json",
                               Body=BODY, **kwargs)
    return r["InvokedProductionVariant"], json.loads(r["Body"].read())


def wait_for(local: Local, name: str, check: Callable[[dict[str, Any]], bool],
             what: str, timeout: float = 30) -> dict[str, Any]:
    found: dict[str, Any] = {}

    def ok() -> bool:
        states = [e for e in local.status()["endpoints"] if e["endpoint"] == name]
        if states and check(states[0]):
            found.update(states[0])
            return True
        return False

    wait_until(ok, timeout, what, interval=0.3)
    return found


def test_two_variants_lifecycle(local: Local, models_dir: Path) -> None:
    iris, iris2 = models_dir / "iris.onnx", models_dir / "iris-v2.onnx"
    spec = local.write("ep.yaml", manifest(
        "ep", {"name": "primary", "weight": 1, "replicas": 2, "model": iris},
        {"name": "canary", "weight": 1, "replicas": 1, "model": iris2}))
    result = local.run("up", "-d", "-f", str(spec), "--timeout", "60")
    assert result.returncode == 0, result.stdout + result.stderr
    state = local.endpoint("ep")
    url = state["url"]
    assert f"Endpoint ep is ready at {url}" in result.stdout
    assert "kubeinfer invoke ep --body" in result.stdout  # copy-paste examples
    assert state["phase"] == "Ready"

    # status: the gateway and one process per replica, all ready, pids alive.
    procs = {p["name"]: p for p in state["processes"]}
    assert set(procs) == {"gateway", "primary-0", "primary-1", "canary-0"}
    for p in procs.values():
        assert p["state"] == "ready" and p["restarts"] == 0
        os.kill(p["pid"], 0)
    assert [(v["name"], v["ready"], v["replicas"]) for v in state["variants"]] == [
        ("primary", 2, 2), ("canary", 1, 1)]

    # Invoke through the gateway with boto3 (SageMaker Runtime API) and the CLI.
    client = runtime_client(url)
    variant, answer = invoke(client, variant="canary")
    assert variant == "canary" and answer["predictions"]["label"] == [0]
    result = local.run("invoke", "ep", "--body", BODY, "--variant", "primary")
    assert result.returncode == 0, result.stderr
    assert "variant: primary" in result.stderr
    assert json.loads(result.stdout)["predictions"]["label"] == [0]
    result = local.run("invoke", "ep", "--body", '{"instances": [[1, 2]]}')
    assert result.returncode == 1
    assert 'Input "X"' in result.stderr and "ValidationError" in result.stderr

    # Weight change: route table only; model servers keep their pids; traffic follows.
    servers_before = {n: pid for n, pid in local.pids("ep").items() if n != "gateway"}
    spec.write_text(manifest(
        "ep", {"name": "primary", "weight": 0, "replicas": 2, "model": iris},
        {"name": "canary", "weight": 1, "replicas": 1, "model": iris2}))
    result = local.run("up", "-d", "-f", str(spec), "--timeout", "60")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "variant primary: weight 1 → 0 (route table only, no restart)" in result.stdout
    assert {n: p for n, p in local.pids("ep").items() if n != "gateway"} == servers_before
    assert {invoke(client)[0] for _ in range(20)} == {"canary"}

    # Model change of canary: only canary restarts (new pid), primary untouched.
    spec.write_text(manifest(
        "ep", {"name": "primary", "weight": 0, "replicas": 2, "model": iris},
        {"name": "canary", "weight": 1, "replicas": 1, "model": iris}))
    result = local.run("up", "-d", "-f", str(spec), "--timeout", "60")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "variant canary: model.uri" in result.stdout
    after = local.pids("ep")
    assert after["canary-0"] != servers_before["canary-0"]
    assert (after["primary-0"], after["primary-1"]) == (servers_before["primary-0"],
                                                       servers_before["primary-1"])
    assert gone(servers_before["canary-0"])
    assert invoke(client, variant="canary")[0] == "canary"

    # kill -9 one primary replica: restarted and reported; the other replica serves.
    victim = after["primary-0"]
    victim_url = next(p["url"] for p in local.endpoint("ep")["processes"]
                      if p["name"] == "primary-0")
    routes = local.home / "local" / "ep" / "routes.json"
    assert victim_url in routes.read_text()
    os.kill(victim, signal.SIGKILL)
    for _ in range(10):
        assert invoke(client, variant="primary")[0] == "primary"
    # The dead server leaves the route table until it is ready again.
    wait_until(lambda: victim_url not in routes.read_text(), 10, "crashed server unrouted")
    state = wait_for(local, "ep", lambda e: any(
        p["name"] == "primary-0" and p["restarts"] == 1 and p["state"] == "ready"
        for p in e["processes"]), "primary-0 restarted and ready")
    restarted = next(p for p in state["processes"] if p["name"] == "primary-0")
    assert restarted["last_exit"] == -signal.SIGKILL and restarted["pid"] != victim
    wait_until(lambda: restarted["url"] in routes.read_text(), 10, "restarted server routed")
    events = (local.home / "local" / "ep" / "events.jsonl").read_text()
    assert "Process primary-0" in events and "killed by SIGKILL" in events
    assert invoke(client, variant="primary")[0] == "primary"

    # Scale primary down, remove canary, add v3: only those processes start or stop.
    before = local.pids("ep")
    spec.write_text(manifest(
        "ep", {"name": "primary", "weight": 1, "replicas": 1, "model": iris},
        {"name": "v3", "weight": 1, "replicas": 1, "model": iris2}))
    result = local.run("up", "-d", "-f", str(spec), "--timeout", "60")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "variant v3: added" in result.stdout and "variant canary: removed" in result.stdout
    assert "variant primary: replicas 2 → 1" in result.stdout
    state = local.endpoint("ep")
    now = {p["name"]: p["pid"] for p in state["processes"]}
    assert set(now) == {"gateway", "primary-0", "v3-0"}
    assert now["primary-0"] == before["primary-0"] and now["gateway"] == before["gateway"]
    assert gone(before["primary-1"]) and gone(before["canary-0"])
    assert invoke(client, variant="v3")[0] == "v3"
    with pytest.raises(client.exceptions.ValidationError, match="canary"):
        invoke(client, variant="canary")

    # down: every process gone, state removed; a second down is fine.
    all_pids = [state["supervisor_pid"], *(p["pid"] for p in state["processes"])]
    result = local.run("down", "ep")
    assert result.returncode == 0 and "Stopped endpoint ep" in result.stdout
    assert [pid for pid in all_pids if not gone(pid)] == []
    assert local.our_processes() == []
    assert local.status()["endpoints"] == []
    result = local.run("down", "ep")
    assert result.returncode == 0 and "Endpoint ep is not running" in result.stdout


def test_invalid_manifest_exits_2_naming_the_field(local: Local, models_dir: Path) -> None:
    spec = local.write("bad.yaml", manifest(
        "ep", {"name": "primary", "weight": -1, "replicas": 1, "model": models_dir / "iris.onnx"}))
    result = local.run("up", "-d", "-f", str(spec))
    assert result.returncode == 2
    assert "spec.variants[0].weight" in result.stderr
    assert local.our_processes() == []


def test_missing_model_fails_clearly_and_leaves_nothing(local: Local, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "model.onnx"
    spec = local.write("ep.yaml", manifest(
        "ep", {"name": "primary", "weight": 1, "replicas": 1, "model": missing}))
    started = time.monotonic()
    result = local.run("up", "-d", "-f", str(spec), "--timeout", "30", timeout=90)
    assert result.returncode == 1
    assert time.monotonic() - started < 60
    assert "Endpoint ep failed" in result.stderr
    assert "failed to load" in result.stderr and str(missing) in result.stderr
    local.wait_no_processes()
    assert local.status()["endpoints"] == []


def test_foreground_up_stops_everything_on_sigint(local: Local, models_dir: Path) -> None:
    # Two documents: two endpoints under one foreground command.
    spec = local.write("two.yaml", manifest(
        "one", {"name": "a", "weight": 1, "replicas": 1, "model": models_dir / "iris.onnx"})
        + "---\n" + manifest(
        "two", {"name": "b", "weight": 1, "replicas": 1, "model": models_dir / "iris-v2.onnx"}))
    log = local.workdir / "fg.log"
    with open(log, "w") as fh:
        fg = subprocess.Popen(local.argv("up", "-f", str(spec), "--timeout", "60"),
                              env=local.env, stdout=fh, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: "in the foreground" in log.read_text(), 90, "both endpoints ready")
        assert fg.poll() is None
        for name, variant in (("one", "a"), ("two", "b")):
            url = local.endpoint(name)["url"]
            assert invoke(runtime_client(url), endpoint=name)[0] == variant
        assert len(local.our_processes()) >= 6  # 2 supervisors, 2 gateways, 2 model servers
        fg.send_signal(signal.SIGINT)
        assert fg.wait(timeout=60) == 0, log.read_text()
    finally:
        if fg.poll() is None:
            fg.kill()
            fg.wait()
    assert "Stopped endpoint one" in log.read_text()
    assert local.our_processes() == []


def test_sigkilled_supervisor_takes_its_children_and_state_is_cleaned(
        local: Local, models_dir: Path) -> None:
    spec = local.write("ep.yaml", manifest(
        "ep", {"name": "a", "weight": 1, "replicas": 1, "model": models_dir / "iris.onnx"}))
    result = local.run("up", "-d", "-f", str(spec), "--timeout", "60")
    assert result.returncode == 0, result.stdout + result.stderr
    state = local.endpoint("ep")
    os.kill(state["supervisor_pid"], signal.SIGKILL)
    # The kernel signals every child of the dead supervisor (parent-death signal).
    local.wait_no_processes()
    doc = local.status()
    assert doc["endpoints"] == []
    assert "Cleaned stale state of endpoint ep" in doc["stale"][0]
    # And the endpoint can be started again afterwards.
    result = local.run("up", "-d", "-f", str(spec), "--timeout", "60")
    assert result.returncode == 0, result.stdout + result.stderr
