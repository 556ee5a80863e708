"""Local mode's CompilationJob pieces that compile nothing: the exit policy, loading, the
CLI's argv, status rows, refusals."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from kubeinfer_operator.cli import _kinds, app
from kubeinfer_operator.cli_compile import compile_argv, job_rows
from kubeinfer_operator.errors import SpecError
from kubeinfer_operator.local.compile_control import local_compile_job
from kubeinfer_operator.local.compile_manifest import (
    load_compile_file,
    parse_compilation_jobs,
)
from kubeinfer_operator.local.compile_policy import on_exit
from kubeinfer_operator.local.compile_state import (
    CompilePaths,
    CompilePhase,
    CompileState,
    write_compile_state,
)
from kubeinfer_operator.local.transform_policy import Next

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KUBEINFER_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def doc(name: str = "mlp", **spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"model": {"uri": "file://models/mlp.onnx"}, "target": "native",
                            "output": {"uri": "file://out/mlp/"}}
    base.update(spec)
    return {"apiVersion": "kubeinfer.io/v1alpha1", "kind": "CompilationJob",
            "metadata": {"name": name}, "spec": base}


def test_exits_follow_the_pod_failure_policy() -> None:
    assert on_exit(0, restarts=0, retries=2).next is Next.DONE
    bad = on_exit(42, restarts=0, retries=2)
    assert (bad.next, bad.reason) == (Next.STOP_JOB, "BadInput")
    crash = [on_exit(1, restarts=n, retries=2) for n in range(3)]
    assert [c.next for c in crash] == [Next.RESTART, Next.RESTART, Next.STOP_JOB]
    assert crash[0].delay_s < crash[1].delay_s
    assert crash[2].reason == "BackoffLimitExceeded"
    assert on_exit(-9, restarts=0, retries=0).next is Next.STOP_JOB


def test_loading_resolves_relative_uris_against_the_file(tmp_path: Path) -> None:
    path = tmp_path / "compile.yaml"
    path.write_text(yaml.safe_dump(doc(quantization={"allowed": True})))
    assert _kinds(path) == {"CompilationJob"}  # what `up` dispatches on
    (item,) = load_compile_file(path)
    assert item.plan.env["KUBEINFER_MODEL_URI"] == f"file://{tmp_path}/models/mlp.onnx"
    assert item.plan.output_uri == f"file://{tmp_path}/out/mlp"
    job = local_compile_job(item, str(path))
    assert job.env["KUBEINFER_TUNING_CACHE_DIR"].endswith("home/compile-cache/tuning")
    assert (job.retries, job.target, job.active_deadline_s) == (2, "native", 3600)


def test_every_problem_of_every_document_is_named(tmp_path: Path) -> None:
    text = yaml.safe_dump_all([
        doc("a", target="pentium"),
        doc("b", batchSizes=[0]),
        {"apiVersion": "kubeinfer.io/v1alpha1", "kind": "Endpoint", "metadata": {"name": "x"}},
        doc("c"), doc("c"),
    ])
    with pytest.raises(SpecError) as exc:
        parse_compilation_jobs(text, source="f.yaml", base_dir=str(tmp_path))
    lines = str(exc.value).splitlines()
    assert lines[0].startswith("f.yaml document 1 (CompilationJob 'a'): spec.target: Input "
                               "should be 'native'")
    assert lines[1].startswith("f.yaml document 2 (CompilationJob 'b'): spec.batchSizes[0]")
    assert lines[2] == ("f.yaml document 3 (Endpoint 'x'): kind: 'Endpoint' cannot run beside "
                        "a CompilationJob; put it in a file of its own")
    assert lines[3] == ("f.yaml: metadata.name: CompilationJob 'c' appears twice; give each "
                        "job a unique name")
    with pytest.raises(SpecError, match="holds no CompilationJob"):
        parse_compilation_jobs("", source="f.yaml", base_dir=str(tmp_path))


def test_up_refuses_an_invalid_file_with_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "compile.yaml"
    path.write_text(yaml.safe_dump(doc(tuning={"budgetSeconds": -1})))
    result = runner.invoke(app, ["up", "-f", str(path)])
    assert result.exit_code == 2
    assert "spec.tuning.budgetSeconds: Input should be greater than or equal to 0" in \
        result.output
    result = runner.invoke(app, ["up", "-f", str(path), "--port", "9000"])
    assert result.exit_code == 2 and "holds CompilationJobs, which serve nothing" in \
        result.output


def test_compile_argv_passes_only_what_was_given() -> None:
    assert compile_argv("m.onnx", target="native", out_dir="out") == [
        sys.executable, "-m", "kubeinfer_runtime", "compile", "m.onnx", "--target", "native",
        "--out", "out"]
    argv = compile_argv("s3://b/m.onnx", target="aarch64", out_dir="s3://b/out", tune=30.0,
                        allow_quantization=True, calibration="c.npz", batch=64, as_json=True)
    assert argv[4:] == ["s3://b/m.onnx", "--target", "aarch64", "--out", "s3://b/out",
                        "--tune", "30.0", "--calibration", "c.npz", "--batch", "64",
                        "--allow-quantization", "--json"]


def test_compile_help_lists_the_options() -> None:
    result = runner.invoke(app, ["compile", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for option in ("--target", "--out", "--tune", "--allow-quantization", "--calibration",
                   "--batch", "--json"):
        assert option in result.output


def test_status_and_down_of_a_finished_job(home: Path) -> None:
    paths = CompilePaths.for_job("mlp", home)
    write_compile_state(paths, CompileState(
        name="mlp", runner_pid=1, phase=CompilePhase.COMPLETE, reason="Compiled",
        message="onnxruntime-int8 (onnx) for native: 2.40x onnxruntime fp32", target="native",
        backend="onnx", chosen="onnxruntime-int8", speedup=2.4,
        artifact_uri="file:///tmp/out/artifact.tar.gz", finished_at=1.0))
    (row,) = job_rows()
    assert (row["job"], row["phase"], row["backend"], row["speedup"], row["artifact"]) == (
        "mlp", "Complete", "onnx", 2.4, "file:///tmp/out/artifact.tar.gz")
    result = runner.invoke(app, ["status"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "CompilationJobs" in result.output
    assert "2.40x" in result.output
    result = runner.invoke(app, ["status", "--json"])
    assert '"compilation_jobs"' in result.output
    result = runner.invoke(app, ["down", "mlp"])
    assert result.exit_code == 0
    assert "Removed CompilationJob mlp from local state" in result.output
    assert not paths.root.exists()
