"""The `kubeinfer` CLI paths that need no running endpoint (no network, real files)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kubeinfer_operator.cli import LAZY_MODULES, app
from kubeinfer_operator.local.paths import EndpointPaths
from kubeinfer_operator.local.state import (
    EndpointState,
    ProcessState,
    ProcState,
    process_alive,
    process_start_time,
    write_state,
)

runner = CliRunner()

MANIFEST = """\
apiVersion: kubeinfer.io/v1alpha1
kind: Endpoint
metadata: {name: %s}
spec:
  variants:
    - name: primary
      weight: %s
      model: {uri: file://models/iris.onnx}
"""


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KUBEINFER_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_help_lists_the_commands_but_not_internals() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("up", "status", "invoke", "down", "crds", "operator"):
        assert command in result.output
    assert "supervise" not in result.output


def test_crds_writes_then_check_passes_and_detects_drift(tmp_path: Path) -> None:
    out = tmp_path / "crds"
    result = runner.invoke(app, ["crds", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["compilationjobs.kubeinfer.io.yaml",
                                                     "edgefleets.kubeinfer.io.yaml",
                                                     "endpoints.kubeinfer.io.yaml",
                                                     "recommendationjobs.kubeinfer.io.yaml",
                                                     "transformjobs.kubeinfer.io.yaml"]
    crd = out / "endpoints.kubeinfer.io.yaml"
    assert "kind: CustomResourceDefinition" in crd.read_text()
    assert runner.invoke(app, ["crds", "--out", str(out), "--check"]).exit_code == 0
    crd.write_text(crd.read_text() + "# edited\n")
    result = runner.invoke(app, ["crds", "--out", str(out), "--check"])
    assert result.exit_code == 1
    assert "endpoints.kubeinfer.io.yaml" in result.output
    result = runner.invoke(app, ["crds", "--out", str(tmp_path / "none"), "--check"])
    assert result.exit_code == 1


def test_up_with_invalid_manifest_exits_2_naming_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(MANIFEST % ("iris", "-1"))
    result = runner.invoke(app, ["up", "-f", str(bad)])
    assert result.exit_code == 2
    assert "spec.variants[0].weight" in result.output
    assert "greater than or equal to 0" in result.output


def test_up_refuses_a_prometheus_url_at_the_api_server(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBEINFER_OUTBOUND_ALLOW", raising=False)
    bad = tmp_path / "bad.yaml"
    bad.write_text((MANIFEST % ("iris", "1")).replace(
        "model: {uri: file://models/iris.onnx}",
        "model: {uri: file://models/iris.onnx}\n      autoscaling: {maxReplicas: 2, "
        "prometheusUrl: 'https://kubernetes.default.svc/api/v1/x'}"))
    result = runner.invoke(app, ["up", "-f", str(bad)])
    assert result.exit_code == 2
    output = " ".join(result.output.split())  # the console wraps long lines
    assert ("spec.variants[0].autoscaling.prometheusUrl: 'https://kubernetes.default.svc/api/v1/x'"
            " points at the Kubernetes API server (kubernetes.default.svc)") in output
    assert "security.outboundAllowList (KUBEINFER_OUTBOUND_ALLOW)" in output


def test_up_port_with_several_endpoints_is_refused(tmp_path: Path) -> None:
    two = tmp_path / "two.yaml"
    two.write_text(MANIFEST % ("a", "1") + "---\n" + MANIFEST % ("b", "1"))
    result = runner.invoke(app, ["up", "-f", str(two), "--port", "8123"])
    assert result.exit_code == 2
    assert "--port" in result.output


def test_status_and_down_with_nothing_running() -> None:
    result = runner.invoke(app, ["status"])
    assert result.exit_code == 0
    assert "No local endpoint is running" in result.output
    result = runner.invoke(app, ["status", "--json"])
    assert json.loads(result.stdout) == {"endpoints": [], "stale": [], "jobs": [],
                                         "compilation_jobs": [], "edge_fleets": []}
    result = runner.invoke(app, ["status", "iris"])
    assert result.exit_code == 1
    assert "Endpoint iris is not running" in result.output
    result = runner.invoke(app, ["down"])
    assert result.exit_code == 0 and "No local endpoint is running" in result.output
    result = runner.invoke(app, ["down", "iris"])
    assert result.exit_code == 0 and "Endpoint iris is not running" in result.output
    assert runner.invoke(app, ["down", "iris", "--all"]).exit_code == 2


def test_invoke_needs_one_body_and_a_running_endpoint(tmp_path: Path) -> None:
    assert runner.invoke(app, ["invoke", "iris"]).exit_code == 2
    body = tmp_path / "b.json"
    body.write_text("[]")
    assert runner.invoke(app, ["invoke", "iris", "--body", "[]", "--body-file",
                               str(body)]).exit_code == 2
    result = runner.invoke(app, ["invoke", "iris", "--body-file", str(tmp_path / "none")])
    assert result.exit_code == 2 and "Cannot read --body-file" in result.output
    result = runner.invoke(app, ["invoke", "iris", "--body", "[]"])
    assert result.exit_code == 1
    assert "Endpoint iris is not running" in result.output


def test_stale_state_is_cleaned_and_leftover_children_stopped(home: Path) -> None:
    # A supervisor died without cleaning up (nobody holds its lock) and left a child.
    leftover = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        paths = EndpointPaths.for_endpoint("iris", home)
        write_state(paths, EndpointState(
            endpoint="iris", supervisor_pid=999_999_999 % 4_000_000, url="http://127.0.0.1:1",
            processes=[ProcessState(name="primary-0", role="model-server", variant="primary",
                                    pid=leftover.pid,
                                    start_time=process_start_time(leftover.pid), port=1,
                                    url="http://127.0.0.1:1", state=ProcState.READY,
                                    log="/dev/null")]))
        result = runner.invoke(app, ["status", "--json"])
        assert result.exit_code == 0
        doc = json.loads(result.stdout)
        assert doc["endpoints"] == []
        assert "Cleaned stale state of endpoint iris" in doc["stale"][0]
        assert "primary-0" in doc["stale"][0]
        deadline = time.monotonic() + 5
        while leftover.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert leftover.poll() is not None
        assert not process_alive(leftover.pid, None)
        assert not paths.state.exists()
    finally:
        if leftover.poll() is None:
            leftover.kill()
        leftover.wait()


def test_up_refuses_a_busy_port(tmp_path: Path) -> None:
    import socket

    spec = tmp_path / "ep.yaml"
    spec.write_text(MANIFEST % ("iris", "1"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = runner.invoke(app, ["up", "-f", str(spec), "--port", str(port)])
    assert result.exit_code == 2
    assert f"Port {port} on 127.0.0.1 is in use" in result.output


def test_up_refuses_moving_a_running_gateway(tmp_path: Path) -> None:
    """A running gateway keeps its port: ``--port`` with another one is refused, not
    silently ignored (the supervisor only uses it when it starts the gateway)."""
    from kubeinfer_operator.local.state import take_lock_file

    spec = tmp_path / "ep.yaml"
    spec.write_text(MANIFEST % ("iris", "1"))
    paths = EndpointPaths.for_endpoint("iris")
    paths.root.mkdir(parents=True)
    write_state(paths, EndpointState(endpoint="iris", supervisor_pid=os.getpid(),
                                     url="http://127.0.0.1:8123"))
    lock = take_lock_file(paths.lock)  # this process plays the running supervisor
    assert lock is not None
    try:
        result = runner.invoke(app, ["up", "-f", str(spec), "--port", "8124"])
    finally:
        os.close(lock)
    assert result.exit_code == 2, result.output
    assert "running with its gateway on port 8123" in result.output
    assert "kubeinfer down iris" in result.output
    assert not paths.desired.exists()  # nothing was handed over


LAZY_KINDS = (*sorted(LAZY_MODULES), "kubeinfer_operator.api.endpoint",
              "kubeinfer_operator.api.transform_job", "kubeinfer_runtime.contract")


def test_status_and_down_import_no_kind_they_do_not_show(tmp_path: Path) -> None:
    """Each kind's CLI module (its API models, validators, renderers) is imported only when
    a command needs it: `status` and `down` with nothing local import none of them."""
    code = ("import sys\n"
            "from typer.testing import CliRunner\n"
            "from kubeinfer_operator.cli import app\n"
            "for args in (['status'], ['down'], ['status', '--json']):\n"
            "    assert CliRunner().invoke(app, args).exit_code == 0, args\n"
            f"print(sorted(m for m in {LAZY_KINDS!r} if m in sys.modules))\n")
    env = {**os.environ, "KUBEINFER_HOME": str(tmp_path / "empty")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_every_lazily_imported_command_is_listed_and_runs() -> None:
    from kubeinfer_operator.cli import _LAZY_COMMANDS, _LAZY_GROUPS

    listed = runner.invoke(app, ["--help"])
    assert listed.exit_code == 0
    for name in (*_LAZY_COMMANDS, *_LAZY_GROUPS):
        assert f" {name} " in listed.output, name
        shown = runner.invoke(app, [name, "--help"])
        assert shown.exit_code == 0, (name, shown.output)
        assert f"Usage: kubeinfer {name}" in " ".join(shown.output.split()), name


def test_the_top_level_help_says_what_the_lazy_commands_themselves_say(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`kubeinfer --help` lists the lazily imported commands from `_LAZY_HELP`: it must
    read exactly as it does with each command loaded (a changed docstring changes both)."""
    from kubeinfer_operator import cli

    with_stubs = runner.invoke(app, ["--help"], terminal_width=100)
    monkeypatch.setattr(cli, "_LAZY_HELP", {})
    loaded = runner.invoke(app, ["--help"], terminal_width=100)
    assert with_stubs.exit_code == loaded.exit_code == 0
    assert with_stubs.output == loaded.output
    assert "Compile an ONNX model" in with_stubs.output


def test_the_top_level_help_imports_no_kind() -> None:
    code = ("import sys\n"
            "from typer.testing import CliRunner\n"
            "from kubeinfer_operator.cli import app\n"
            "assert CliRunner().invoke(app, ['--help']).exit_code == 0\n"
            f"print(sorted(m for m in {LAZY_KINDS!r} if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_local_state_is_this_users_alone(home: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Logs and events below $KUBEINFER_HOME are written with the default umask: the home
    itself is what keeps other users of a shared machine out of them."""
    import stat

    from kubeinfer_operator.local.paths import private_home

    old_umask = os.umask(0o022)
    try:
        assert not home.exists()
        result = runner.invoke(app, ["secret", "create", "s", "--from-literal", "A=b"])
        assert result.exit_code == 0, result.output
        assert stat.S_IMODE(home.stat().st_mode) == 0o700
        # A home the user named and made is theirs: left as it is.
        named = tmp_path / "named"
        named.mkdir(mode=0o755)
        monkeypatch.setenv("KUBEINFER_HOME", str(named))
        private_home()
        assert stat.S_IMODE(named.stat().st_mode) == 0o755
        # The default home, left open by an older version, is tightened.
        monkeypatch.delenv("KUBEINFER_HOME")
        monkeypatch.setenv("HOME", str(tmp_path / "user"))
        (tmp_path / "user" / ".kubeinfer").mkdir(parents=True, mode=0o755)
        private_home()
        assert stat.S_IMODE((tmp_path / "user" / ".kubeinfer").stat().st_mode) == 0o700
    finally:
        os.umask(old_umask)
