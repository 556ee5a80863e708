"""Compile's targets, host checks, importability, settings, manifests and tarballs (no TVM)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from pydantic import ValidationError

from kubeinfer_runtime.compile import bundle, store
from kubeinfer_runtime.compile.artifact_key import artifact_key
from kubeinfer_runtime.compile.hostcheck import (
    ArtifactTarget,
    HostInfo,
    compatibility_problem,
    parse_cpuinfo,
    required_flags,
)
from kubeinfer_runtime.compile.importable import import_problem, unsupported_ops
from kubeinfer_runtime.compile.manifest import (
    ArtifactError,
    FileEntry,
    Manifest,
    file_problems,
    read_manifest,
    sha256_file,
    verify_files,
)
from kubeinfer_runtime.compile.targets import target_spec
from kubeinfer_runtime.contract import S3Settings
from kubeinfer_runtime.contract.compile import (
    CandidateName,
    CandidateSummary,
    CompileReport,
    CompileSettings,
    CompileTarget,
    parse_target,
)

INTEL = HostInfo("x86_64", "x86_64", frozenset([
    "fpu", "sse", "sse2", "pni", "ssse3", "sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c",
    "bmi1", "bmi2", "abm", "popcnt", "movbe", "avx512f", "avx512cd", "avx512bw", "avx512dq",
    "avx512vl"]), "Intel(R) Xeon(R)")
OLD_X86 = HostInfo("x86_64", "x86_64", frozenset(["fpu", "sse", "sse2", "pni"]), "Old CPU")
ARM = HostInfo("aarch64", "aarch64", frozenset(["fp", "asimd"]), "Neoverse-N1")


# ------------------------------------------------------------------ targets and hosts


def test_native_uses_the_cpu_name_llvm_reports_never_mcpu_native() -> None:
    spec = target_spec(CompileTarget.NATIVE, host_machine="x86_64", host_cpu="emeraldrapids")
    assert spec.llvm() == {"kind": "llvm", "mtriple": "x86_64-linux-gnu",
                           "mcpu": "emeraldrapids"}
    assert not spec.cross


def test_aarch64_is_cross_compiled_and_emulated_on_x86() -> None:
    spec = target_spec(CompileTarget.AARCH64, host_machine="x86_64", host_cpu="znver3")
    assert spec.cross and spec.cc == "aarch64-linux-gnu-gcc" and spec.qemu == "qemu-aarch64"
    assert spec.llvm()["mtriple"] == "aarch64-linux-gnu"
    native_arm = target_spec(CompileTarget.AARCH64, host_machine="aarch64", host_cpu="x")
    assert not native_arm.cross


def test_armv7_is_hard_float() -> None:
    spec = target_spec(CompileTarget.ARMV7, host_machine="x86_64", host_cpu="x")
    assert spec.llvm()["mfloat-abi"] == "hard" and spec.cc == "arm-linux-gnueabihf-gcc"


def test_target_names_and_aliases() -> None:
    assert parse_target("ARM64") is CompileTarget.AARCH64
    assert parse_target("x86_64") is CompileTarget.X86_64
    with pytest.raises(ValueError, match="unknown target 'sparc': use one of native"):
        parse_target("sparc")


def test_llvm_features_map_to_cpuinfo_flags_and_system_ones_are_dropped() -> None:
    flags = required_flags("x86_64", ["avx2", "sse4.1", "bmi", "lzcnt", "avx512vnni",
                                      "waitpkg", "xsaves", "fast-gather"])
    assert flags == ["abm", "avx2", "avx512_vnni", "bmi1", "sse4_1"]
    assert required_flags("aarch64", ["neon", "fp-armv8", "ete"]) == ["asimd", "fp"]


def test_cpuinfo_parsing_x86_and_arm() -> None:
    x86 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse sse2 avx2\n"
    assert parse_cpuinfo(x86) == (frozenset({"fpu", "sse", "sse2", "avx2"}), "AMD EPYC")
    arm = "processor\t: 0\nFeatures\t: fp asimd evtstrm\nCPU part\t: 0xd0c\n"
    assert parse_cpuinfo(arm)[0] == frozenset({"fp", "asimd", "evtstrm"})


def test_a_matching_host_runs_the_artifact() -> None:
    target = ArtifactTarget("x86-64-v3", "x86_64-linux-gnu", "x86-64-v3",
                            ("avx2", "fma", "bmi1"))
    assert compatibility_problem(target, INTEL) is None


def test_another_architecture_is_refused_naming_both() -> None:
    target = ArtifactTarget("aarch64", "aarch64-linux-gnu", "generic", ("asimd", "fp"))
    problem = compatibility_problem(target, INTEL) or ""
    assert problem.startswith("Artifact is compiled for target aarch64 (aarch64-linux-gnu, "
                              "CPU generic) but this host is x86_64 (Intel(R) Xeon(R))")
    assert "run the artifact on an aarch64 machine" in problem
    assert compatibility_problem(target, ARM) is None


def test_missing_cpu_features_are_refused_naming_them() -> None:
    target = ArtifactTarget("skylake-avx512", "x86_64-linux-gnu", "skylake-avx512",
                            ("avx2", "avx512f", "avx512bw"))
    problem = compatibility_problem(target, OLD_X86) or ""
    assert "needs CPU features this host (x86_64 (Old CPU)) lacks: avx2, avx512bw, avx512f" \
        in problem
    assert "x86-64-v3 or x86-64" in problem


def test_portable_onnx_artifacts_run_anywhere() -> None:
    onnx = ArtifactTarget("aarch64", "aarch64-linux-gnu", "", (), portable=True)
    assert compatibility_problem(onnx, INTEL) is None


# ------------------------------------------------------------------ importability


def test_sklearn_and_recurrent_ops_are_named() -> None:
    nodes = [("", "MatMul"), ("ai.onnx.ml", "LinearClassifier"), ("", "LSTM"),
             ("ai.onnx.ml", "Normalizer"), ("", "QLinearConv"), ("", "LSTM")]
    bad = unsupported_ops(nodes)
    assert bad == ["LSTM", "QLinearConv", "ai.onnx.ml:LinearClassifier",
                   "ai.onnx.ml:Normalizer"]
    assert import_problem(bad) == ("not compilable with TVM: ops LSTM, QLinearConv, "
                                   "ai.onnx.ml:LinearClassifier, ai.onnx.ml:Normalizer")
    assert import_problem([]) == ""


def test_ops_outside_the_frontends_set_are_named_when_it_is_known() -> None:
    nodes = [("", "MatMul"), ("", "Relu"), ("", "NewOp")]
    assert unsupported_ops(nodes, frozenset({"MatMul", "Relu"})) == ["NewOp"]
    assert unsupported_ops(nodes) == []


# ------------------------------------------------------------------ settings and report


def _settings(**kw: object) -> CompileSettings:
    base: dict[str, object] = {"model_uri": "file:///m.onnx", "output_uri": "file:///out"}
    return CompileSettings(**{**base, **kw})  # type: ignore[arg-type]


def test_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBEINFER_MODEL_URI", "s3://b/m.onnx")
    monkeypatch.setenv("KUBEINFER_OUTPUT_URI", "s3://b/out")
    monkeypatch.setenv("KUBEINFER_TARGET", "arm64")
    monkeypatch.setenv("KUBEINFER_BATCH_SIZES", "1,64,64")
    monkeypatch.setenv("KUBEINFER_ALLOW_QUANTIZATION", "true")
    s = CompileSettings()  # type: ignore[call-arg]
    assert s.target is CompileTarget.AARCH64 and s.batch_sizes == [1, 64]
    assert s.allow_quantization and s.min_top1_agreement == 0.99 and s.max_abs_diff == 1e-5
    # What the operator renders reads back the same.
    env = s.to_env()
    assert env["KUBEINFER_BATCH_SIZES"] == "[1, 64]" and env["KUBEINFER_TARGET"] == "aarch64"
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert CompileSettings() == s  # type: ignore[call-arg]


def test_bad_settings_are_refused_with_the_field() -> None:
    with pytest.raises(ValidationError, match="must be a file:// or s3:// URI"):
        _settings(model_uri="/m.onnx")
    with pytest.raises(ValidationError, match="batch sizes must be between 1 and 65536"):
        _settings(batch_sizes="0,8")
    with pytest.raises(ValidationError, match="unknown target"):
        _settings(target="sparc")


def test_report_fits_a_termination_message() -> None:
    notes = "x" * 900
    report = CompileReport(ok=True, reason="r" * 2000, candidates=[
        CandidateSummary(name=n, p50_ms={1: 0.1, 64: 1.0}, p99_ms={1: 0.2, 64: 2.0}, note=notes)
        for n in CandidateName])
    data = report.termination_message()
    assert len(data) <= 4096
    back = CompileReport.model_validate_json(data)
    assert back.ok and len(back.candidates) == 5 and back.candidates[0].p50_ms[64] == 1.0


# ------------------------------------------------------------------ manifests and tarballs


def _artifact(tmp_path: Path) -> Path:
    root = tmp_path / "artifact"
    root.mkdir()
    (root / "model.onnx").write_bytes(b"model bytes")
    manifest = Manifest(
        backend="onnx", candidate=CandidateName.ORT_FP32,
        source={"name": "m.onnx", "sha256": "0" * 64},  # type: ignore[arg-type]
        target={"name": "native", "triple": "x86_64-linux-gnu", "portable": True},  # type: ignore[arg-type]
        inputs=[{"name": "x", "dtype": "float32", "shape": [None, 4]}],  # type: ignore[list-item]
        outputs=[{"name": "y", "dtype": "float32", "shape": [None, 1]}],  # type: ignore[list-item]
        files=[FileEntry(path="model.onnx", sha256=sha256_file(root / "model.onnx"), size=11)])
    (root / "manifest.json").write_text(manifest.to_json())
    return root


def test_a_valid_artifact_reads_back_and_verifies(tmp_path: Path) -> None:
    root = _artifact(tmp_path)
    m = read_manifest(root)
    verify_files(root, m)
    assert m.files[0].path == "model.onnx" and m.target.artifact_target().portable


def test_tampered_and_missing_files_are_named(tmp_path: Path) -> None:
    root = _artifact(tmp_path)
    m = read_manifest(root)
    assert file_problems(m, {"model.onnx": "f" * 64})[0].startswith(
        "model.onnx has sha256 ffffffffffff…, the manifest says")
    assert file_problems(m, {}) == ["model.onnx is missing"]
    (root / "model.onnx").write_bytes(b"model bytes!")
    with pytest.raises(ArtifactError, match=r"do not match their manifest .*recompile it"):
        verify_files(root, m)


def test_manifest_paths_cannot_leave_the_artifact() -> None:
    for bad in ("../etc/passwd", "/abs", "a/b.so", ".hidden", "manifest.json"):
        with pytest.raises(ValidationError, match="plain file name"):
            FileEntry(path=bad, sha256="0" * 64, size=0)


def test_not_an_artifact_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match=r"holds no manifest\.json: point the model URI"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ArtifactError, match=r"manifest\.json is invalid"):
        read_manifest(tmp_path)


def test_tarballs_round_trip(tmp_path: Path) -> None:
    root = _artifact(tmp_path)
    bundle.pack(root, tmp_path / "a.tar.gz")
    out = tmp_path / "unpacked"
    bundle.unpack(tmp_path / "a.tar.gz", out)
    verify_files(out, read_manifest(out))


def _tar(path: Path, *members: tarfile.TarInfo) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info in members:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
    return path


@pytest.mark.parametrize("member", ["../evil", "/etc/evil", "dir/nested"])
def test_tarballs_with_paths_outside_the_top_level_are_refused(tmp_path: Path,
                                                               member: str) -> None:
    info = tarfile.TarInfo(member)
    info.size = 1
    with pytest.raises(ArtifactError, match="not a plain top-level file"):
        bundle.unpack(_tar(tmp_path / "evil.tar.gz", info), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_tarballs_with_links_or_too_many_files_are_refused(tmp_path: Path) -> None:
    link = tarfile.TarInfo("model.so")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    with pytest.raises(ArtifactError, match="not a plain top-level file"):
        bundle.unpack(_tar(tmp_path / "link.tar.gz", link), tmp_path / "out")
    many = []
    for i in range(bundle.MAX_MEMBERS + 1):
        info = tarfile.TarInfo(f"f{i}")
        info.size = 0
        many.append(info)
    with pytest.raises(ArtifactError, match="more than 65 files"):
        bundle.unpack(_tar(tmp_path / "many.tar.gz", *many), tmp_path / "out2")


def test_garbage_is_not_a_tarball(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"not a tarball")
    assert not bundle.is_tarball(junk)
    with pytest.raises(ArtifactError, match="cannot be unpacked"):
        bundle.unpack(junk, tmp_path / "out")


# ------------------------------------------------------------------ the artifact cache


def _key(**kw: object) -> str:
    facts: dict[str, object] = {
        "source_sha256": "a" * 64, "calibration_sha256": None,
        "target": {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver3"},
        "cpu_flags": ["avx2", "fma"], "versions": {"tvm": "0.27.0.post1", "tvm_ffi": "0.1.14"},
        "settings": _settings().key_settings()}
    return artifact_key(**{**facts, **kw})  # type: ignore[arg-type]


def test_the_artifact_key_changes_with_everything_that_decides_the_artifact() -> None:
    base = _key()
    assert base == _key() and len(base) == 32
    changed = [
        _key(source_sha256="b" * 64), _key(calibration_sha256="c" * 64),
        _key(target={"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "skylake"}),
        _key(cpu_flags=["avx2"]), _key(versions={"tvm": "0.28", "tvm_ffi": "0.1.14"}),
        _key(settings=_settings(batch_sizes="1,64").key_settings()),
        _key(settings=_settings(allow_quantization=True).key_settings()),
        _key(settings=_settings(tuning_budget_s=30).key_settings()),
    ]
    assert base not in changed and len(set(changed)) == len(changed)
    # How long timing runs, where files go and where caches live change nothing built.
    assert base == _key(settings=_settings(measure_s=5, output_uri="s3://b/o",
                                           work_dir="/elsewhere").key_settings())
    assert base == _key(cpu_flags=["fma", "avx2"])


def test_an_artifact_cache_makes_the_output_folder_optional() -> None:
    s = CompileSettings(model_uri="file:///m.onnx",  # type: ignore[call-arg]
                        artifact_cache_uri="s3://b/cache")
    assert s.output_uri is None
    with pytest.raises(ValidationError, match=r"give an output folder \(KUBEINFER_OUTPUT_URI, "
                                              r"--out\) or an artifact cache"):
        CompileSettings(model_uri="file:///m.onnx")  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="must be a file:// or s3:// URI"):
        _settings(artifact_cache_uri="/tmp/cache")


def _cache_entry(tmp_path: Path, source: str = "0" * 64) -> tuple[str, CompileReport]:
    """A published artifact under a file:// cache entry, as the compiler leaves it."""
    src = _artifact(tmp_path)
    out = tmp_path / "out"
    (out / "artifact").mkdir(parents=True)
    for f in src.iterdir():
        (out / "artifact" / f.name).write_bytes(f.read_bytes())
    bundle.pack(out / "artifact", out / "artifact.tar.gz")
    entry = f"file://{tmp_path / 'cache' / 'k1'}"
    report = CompileReport(ok=True, sha256=sha256_file(out / "artifact.tar.gz"),
                           source_sha256=source, chosen=CandidateName.ORT_FP32, backend="onnx",
                           artifact_uri=entry + "/artifact.tar.gz")
    (out / "report.json").write_text(report.model_dump_json())
    store.publish(out, entry, S3Settings())
    return entry, report


def test_a_complete_cache_entry_is_found_and_copied_for_publishing(tmp_path: Path) -> None:
    entry, report = _cache_entry(tmp_path)
    local = tmp_path / "local"
    found = store.lookup_artifact(entry, local, S3Settings(), "0" * 64)
    assert found == report
    verify_files(local / "artifact", read_manifest(local / "artifact"))
    assert sha256_file(local / "artifact.tar.gz") == report.sha256
    # Serving from the cache itself: checked, not copied.
    assert store.lookup_artifact(entry, tmp_path / "l2", S3Settings(), "0" * 64,
                                 copy=False) == report
    assert not (tmp_path / "l2" / "artifact").exists()


def test_missing_foreign_or_damaged_cache_entries_are_misses(tmp_path: Path) -> None:
    entry, _ = _cache_entry(tmp_path)
    s3 = S3Settings()
    assert store.lookup_artifact(entry + "-other", tmp_path / "l1", s3, "0" * 64) is None
    # Another model's entry (cannot happen with a key, unless the cache was edited).
    assert store.lookup_artifact(entry, tmp_path / "l2", s3, "f" * 64) is None
    tarball = tmp_path / "cache" / "k1" / "artifact.tar.gz"
    tarball.write_bytes(tarball.read_bytes() + b"x")
    assert store.lookup_artifact(entry, tmp_path / "l3", s3, "0" * 64) is None
    (tmp_path / "cache" / "k1" / "report.json").write_text("{not json")
    assert store.lookup_artifact(entry, tmp_path / "l4", s3, "0" * 64) is None
