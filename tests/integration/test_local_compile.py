"""``kubeinfer up -f`` on CompilationJobs and ``kubeinfer compile``: the real compiler.

Every test runs the CLI as a user would (a subprocess with its own
KUBEINFER_HOME) on a model built fresh, with short timings (no tuning,
``KUBEINFER_MEASURE_S`` 0.1 s) so a compile takes seconds. Covered: a job run
to completion (the artifact published under its output, the status and the
report agreeing), a model that is not ONNX (fails at once, no retry), ``-d`` +
``status`` + ``down``, and ``kubeinfer compile`` passing the compiler's exit
code and report through.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubeinfer_runtime.contract.compile import EXIT_BAD_INPUT, CompileReport
from tests.conftest import build_models
from tests.support.ports import wait_until

#: Short timings: this is about the plumbing, bench/compile.py measures for real.
FAST = {"KUBEINFER_MEASURE_S": "0.1"}


class Cli:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.env = {**os.environ, "KUBEINFER_HOME": str(home), **FAST}

    def run(self, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "kubeinfer_operator.cli", *args],
                              env=self.env, capture_output=True, text=True, timeout=timeout)

    def rows(self, name: str | None = None) -> list[dict[str, Any]]:
        result = self.run("status", "--json", *([name] if name else []))
        rows: list[dict[str, Any]] = json.loads(result.stdout)["compilation_jobs"]
        return rows

    def our_processes(self) -> list[int]:
        marker = f"KUBEINFER_HOME={self.home}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                environ = (entry / "environ").read_bytes()
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if marker in environ.split(b"\0") and stat[stat.rfind(")") + 2] != "Z":
                found.append(int(entry.name))
        return found


@pytest.fixture
def cli(tmp_path: Path) -> Iterator[Cli]:
    c = Cli(tmp_path / "home")
    yield c
    if c.our_processes():
        c.run("down", "--all", timeout=60)
    for pid in c.our_processes():
        os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def mlp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_models.build_mlp(tmp_path_factory.mktemp("compile-local") / "mlp.onnx")


def manifest(path: Path, name: str, model: str, out: str, **spec: Any) -> Path:
    doc = {"apiVersion": "kubeinfer.io/v1alpha1", "kind": "CompilationJob",
           "metadata": {"name": name},
           "spec": {"model": {"uri": model}, "target": "native", "output": {"uri": out},
                    **spec}}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_up_compiles_to_completion_and_publishes_the_artifact(cli: Cli, mlp: Path,
                                                              tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "mlp.onnx").write_bytes(mlp.read_bytes())
    # Relative URIs: resolved against the manifest's folder, as in the example.
    path = manifest(tmp_path / "compile.yaml", "mlp-native", "file://models/mlp.onnx",
                    "file://out/mlp/", quantization={"allowed": True})
    result = cli.run("up", "-f", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    out = tmp_path / "out" / "mlp"
    assert "Compiling CompilationJob mlp-native: model file://models/mlp.onnx for native" \
        in result.stdout
    assert "CompilationJob mlp-native complete:" in result.stdout
    assert f"artifact file://{out}/artifact.tar.gz" in result.stdout
    assert "onnxruntime-fp32" in result.stdout  # the candidates table
    report = CompileReport.model_validate_json((out / "report.json").read_bytes())
    assert report.ok and report.target == "native" and report.chosen is not None
    assert (out / "artifact" / "manifest.json").is_file()
    with tarfile.open(out / "artifact.tar.gz") as tar:
        assert any(n.endswith("manifest.json") for n in tar.getnames())
    (row,) = cli.rows("mlp-native")
    assert (row["phase"], row["target"], row["chosen"], row["backend"]) == (
        "Complete", "native", report.chosen.value, report.backend)
    assert row["speedup"] == report.speedup
    assert row["artifact"] == f"file://{out}/artifact.tar.gz"
    assert not cli.our_processes()
    # The state lives under KUBEINFER_HOME, apart from TransformJobs' and endpoints'.
    assert (cli.home / "compile-jobs" / "mlp-native" / "report.json").is_file()
    job = json.loads((cli.home / "compile-jobs" / "mlp-native" / "job.json").read_text())
    assert job["env"]["KUBEINFER_TUNING_CACHE_DIR"] == str(cli.home / "compile-cache" / "tuning")


def test_a_model_that_is_not_onnx_fails_at_once(cli: Cli, tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model at all")
    path = manifest(tmp_path / "bad.yaml", "bad", f"file://{bad}", f"file://{tmp_path}/out/")
    result = cli.run("up", "-f", str(path))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "CompilationJob bad failed (BadInput):" in result.stderr
    (row,) = cli.rows("bad")
    assert (row["phase"], row["reason"]) == ("Failed", "BadInput")
    log = (cli.home / "compile-jobs" / "bad" / "logs" / "compiler.log").read_text()
    assert log.count("--- ") == 1  # bad input is never retried


def test_detached_then_status_then_down(cli: Cli, mlp: Path, tmp_path: Path) -> None:
    path = manifest(tmp_path / "c.yaml", "bg", f"file://{mlp}", f"file://{tmp_path}/bg/")
    result = cli.run("up", "-f", str(path), "-d")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Compiling in the background" in result.stdout
    wait_until(lambda: bool(cli.rows("bg")) and cli.rows("bg")[0]["phase"] == "Complete", 180,
               "the detached compile to complete")
    # The runner records Complete, then exits: its process may outlive the record briefly.
    wait_until(lambda: not cli.our_processes(), 30, "the detached runner to exit")
    table = cli.run("status", "bg")
    assert table.returncode == 0 and "CompilationJobs" in table.stdout
    down = cli.run("down", "bg")
    assert down.returncode == 0 and "Removed CompilationJob bg" in down.stdout
    assert cli.rows() == []


def test_kubeinfer_compile_runs_the_compiler_and_passes_its_exit_code(
        cli: Cli, mlp: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli-out"
    result = cli.run("compile", str(mlp), "--target", "native", "--out", str(out), "--json",
                     "--measure", "0.1")
    assert result.returncode == 0, result.stdout + result.stderr
    report = CompileReport.model_validate_json(result.stdout)
    assert report.ok and report.artifact_uri == f"file://{out}/artifact.tar.gz"
    assert (out / "artifact.tar.gz").is_file()
    table = cli.run("compile", str(mlp), "--out", str(tmp_path / "again"), "--measure", "0.1")
    assert table.returncode == 0, table.stderr
    assert "onnxruntime-fp32" in table.stdout and "Chosen:" in table.stdout
    missing = cli.run("compile", str(tmp_path / "nope.onnx"), "--out", str(out))
    assert missing.returncode == EXIT_BAD_INPUT
    assert "nope.onnx" in missing.stderr


# -- a variant that compiles before it serves --------------------------------------------------


def _endpoint_doc(mlp: Path) -> dict[str, Any]:
    return {"apiVersion": "kubeinfer.io/v1alpha1", "kind": "Endpoint",
            "metadata": {"name": "mlp"},
            "spec": {"variants": [
                {"name": "compiled", "weight": 1,
                 "model": {"uri": f"file://{mlp}", "compile": {"target": "native"}}},
                {"name": "plain", "weight": 0, "model": {"uri": f"file://{mlp}"}}]}}


def _invoke(url: str, variant: str, rows: list[list[float]]) -> Any:
    import httpx

    response = httpx.post(f"{url}/endpoints/mlp/invocations", timeout=30,
                          json={"instances": rows},
                          headers={"X-Amzn-SageMaker-Target-Variant": variant})
    assert response.status_code == 200, response.text
    return response.json()


def test_up_compiles_a_variant_then_serves_the_artifact(cli: Cli, mlp: Path,
                                                        tmp_path: Path) -> None:
    import numpy as np
    import onnxruntime as ort

    path = tmp_path / "endpoint.yaml"
    path.write_text(yaml.safe_dump(_endpoint_doc(mlp), sort_keys=False))
    first = cli.run("up", "-d", "-f", str(path), "--timeout", "120")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "Endpoint mlp variant compiled: " in first.stdout
    artifacts = cli.home / "compile-cache" / "artifacts"
    assert f"serving file://{artifacts}/" in first.stdout
    assert "from the artifact cache" not in first.stdout
    state = json.loads(cli.run("status", "--json", "mlp").stdout)["endpoints"][0]
    models = {v["name"]: v["model_uri"] for v in state["variants"]}
    assert models["compiled"].startswith(f"file://{artifacts}/")
    assert models["plain"] == f"file://{mlp}"

    rows = np.random.default_rng(0).standard_normal((3, 256)).astype(np.float32)
    session = ort.InferenceSession(str(mlp), providers=["CPUExecutionProvider"])
    expected = session.run(None, {session.get_inputs()[0].name: rows})[0]
    for variant in ("compiled", "plain"):
        answer = _invoke(state["url"], variant, rows.tolist())
        got = np.asarray(answer["predictions"], dtype=np.float32)
        # The artifact's candidates passed the accuracy gate (1e-5, or INT8's top-1: not
        # allowed here); the plain variant is onnxruntime itself.
        np.testing.assert_allclose(got, expected, atol=1e-4)

    # The same spec again: the artifact comes from the cache, the servers keep running.
    pids = {p["name"]: p["pid"] for p in state["processes"]}
    again = cli.run("up", "-d", "-f", str(path), "--timeout", "120")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "(from the artifact cache)" in again.stdout
    later = json.loads(cli.run("status", "--json", "mlp").stdout)["endpoints"][0]
    assert {p["name"]: p["pid"] for p in later["processes"]} == pids
    assert cli.run("down", "mlp").returncode == 0


def test_a_variant_that_cannot_compile_starts_nothing(cli: Cli, tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    doc = {"apiVersion": "kubeinfer.io/v1alpha1", "kind": "Endpoint",
           "metadata": {"name": "bad"},
           "spec": {"variants": [{"name": "v", "model": {"uri": f"file://{bad}",
                                                         "compile": {}}}]}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc))
    result = cli.run("up", "-d", "-f", str(path))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Endpoint bad variant v: compiling failed:" in result.stderr
    assert "exit code 42" in result.stderr
    assert not cli.our_processes()
