"""One compilation, start to end: fetch, build every candidate, check, time, choose, publish.

The order matters for honesty and for time: the baseline (onnxruntime fp32)
runs first and produces the reference outputs; each candidate is built, then
gated on accuracy, and timed only if it passed (on a target this host runs) or
verified under emulation (on a cross target); the choice (``choice``) sees
every outcome at once. Failures of one candidate are notes in the report, not
failures of the compilation: the ONNX model itself is always a valid result.
"""

from __future__ import annotations

import platform
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from kubeinfer_runtime.compile import ort, store, tuning, tvm_build
from kubeinfer_runtime.compile.artifact import ArtifactFile, ArtifactPlan, tensor_info, write_report
from kubeinfer_runtime.compile.artifact import write as write_artifact
from kubeinfer_runtime.compile.artifact_key import artifact_key
from kubeinfer_runtime.compile.bench import Bench, size_key
from kubeinfer_runtime.compile.choice import Choice, choose_timed, choose_untimed, speedup
from kubeinfer_runtime.compile.context import Context, Evaluated, NullProgress, Progress
from kubeinfer_runtime.compile.hostcheck import (
    ArtifactTarget,
    compatibility_problem,
    read_host,
    required_flags,
)
from kubeinfer_runtime.compile.importable import import_problem, unsupported_ops
from kubeinfer_runtime.compile.manifest import SourceInfo, TargetInfo
from kubeinfer_runtime.compile.signature import load_calibration, read_model
from kubeinfer_runtime.compile.targets import target_spec
from kubeinfer_runtime.compile.tvm_candidates import TvmCandidates
from kubeinfer_runtime.contract.compile import (
    ARTIFACT_DIR,
    ARTIFACT_TARBALL,
    CandidateName,
    CandidateSummary,
    CompileReport,
    CompileSettings,
)
from kubeinfer_runtime.models.base import Backend
from kubeinfer_runtime.models.onnx import OnnxBackend
from kubeinfer_runtime.models.tvm import TvmBackend, TvmLibrary

C = CandidateName

__all__ = ["NullProgress", "Progress", "compile_model"]


def compile_model(settings: CompileSettings, progress: Progress | None = None) -> CompileReport:
    """Compile ``settings.model_uri`` for ``settings.target`` and publish the artifact."""
    run_dir = Path(settings.work_dir) / f"run-{uuid.uuid4().hex[:12]}"
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        return _compile(settings, progress or NullProgress(), run_dir)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def _compile(settings: CompileSettings, progress: Progress, run_dir: Path) -> CompileReport:
    started = time.monotonic()
    progress.step("Fetching the model")
    fetched = store.fetch(settings.model_uri, "model", run_dir / "download", settings.s3())
    model, info = read_model(fetched.path)
    calibration = None
    calibration_sha256 = None
    if settings.calibration_uri:
        cal = store.fetch(settings.calibration_uri, "calibration set", run_dir / "download",
                          settings.s3())
        calibration = load_calibration(cal.path, info)
        calibration_sha256 = cal.sha256
    progress.done(f"Model {fetched.path.name}: {len(info.inputs)} input(s), sha256 "
                  f"{fetched.sha256[:12]}")

    progress.step("Loading TVM")
    tvm: Any = None
    tvm_status = ""
    try:
        tvm = tvm_build.load_tvm(settings.threads)
    except ImportError:
        tvm_status = ("TVM is not installed here (pip install 'kubeinfer[compile]'): only the "
                      "onnxruntime candidates run")
    machine = platform.machine()
    spec = target_spec(settings.target, host_machine=machine,
                       host_cpu=tvm_build.host_cpu(tvm) if tvm else "")
    flags = required_flags(spec.family, tvm_build.llvm_features(tvm, spec) if tvm else [])
    host = read_host()
    art_target = ArtifactTarget(spec.name.value, spec.triple, spec.cpu, tuple(flags))
    untimed = compatibility_problem(art_target, host) or ""
    if tvm is not None:
        bad = unsupported_ops(info.ops, tvm_build.supported_ops())
        tvm_status = import_problem(bad)
        if not tvm_status and info.static_problem():
            tvm_status = f"not compilable with TVM: {info.static_problem()}"

    key = ""
    if settings.artifact_cache_uri:
        key = artifact_key(source_sha256=fetched.sha256, calibration_sha256=calibration_sha256,
                           target=spec.llvm(), cpu_flags=flags, versions=tvm_build.versions(),
                           settings=settings.key_settings())
        cached = _cached(settings, progress, run_dir, key, fetched.sha256, started)
        if cached is not None:
            return cached

    sizes: list[int | None] = list(settings.batch_sizes) if info.batched else [None]
    progress.step("Running onnxruntime fp32 (the baseline)")
    baseline = OnnxBackend(intra_op_threads=settings.threads)
    baseline.load(fetched.path)
    bench = Bench.build(info, sizes, baseline, calibration, settings.measure_s)
    ctx = Context(settings, progress, run_dir, fetched.path, model, bench, spec, untimed,
                  fetched.sha256)

    results = [_baseline(ctx, baseline)]
    if not untimed:
        results.append(_ort_candidate(ctx, C.ORT_OPTIMIZED))
        if settings.allow_quantization:
            results.append(_ort_candidate(ctx, C.ORT_INT8))
    tuning_info = tuning.TuneResult(0, 0.0, False, Path())
    if tvm is not None and not tvm_status:
        tvm_cands = TvmCandidates(ctx, tvm)
        results.append(tvm_cands.untuned())
        if not untimed and settings.tuning_budget_s > 0:
            tuned, tuning_info = tvm_cands.tuned()
            results.append(tuned)
    elif tvm_status:
        progress.done(tvm_status.capitalize())

    outcomes = [r.outcome() for r in results]
    if untimed:
        choice = choose_untimed(outcomes, spec.name.value, untimed_reason(ctx))
    else:
        choice = choose_timed(outcomes, settings.min_speedup, settings.force_candidate)
        if choice.chosen is not C.ORT_FP32 and choice.chosen is not settings.force_candidate:
            choice = _confirm(ctx, results, choice)
    chosen = next(r for r in results if r.name is choice.chosen)
    summaries = [CandidateSummary(
        name=r.name, p50_ms={k: round(v * 1e3, 4) for k, v in r.p50_s.items()},
        p99_ms={k: round(v * 1e3, 4) for k, v in r.p99_s.items()},
        max_abs_diff=r.max_abs_diff, top1_agreement=r.top1, speedup=choice.speedups.get(r.name),
        accurate=r.accurate, chosen=r.name is choice.chosen,
        note=choice.notes.get(r.name, "")) for r in results]
    verification = _verification(ctx, host.describe(), chosen)
    portable = chosen.backend == "onnx"
    plan = ArtifactPlan(
        backend=chosen.backend, candidate=chosen.name,
        source=SourceInfo(name=fetched.path.name, sha256=fetched.sha256),
        target=TargetInfo(name=spec.name.value, triple=spec.triple, cpu=spec.cpu,
                          flags=[] if portable else flags, portable=portable),
        inputs=[tensor_info(t, info.batched) for t in info.inputs],
        outputs=[tensor_info(t, info.batched) for t in info.outputs],
        batch_sizes=[size_key(s) for s in sizes], threads=settings.threads,
        latency_s=chosen.p50_s, versions=tvm_build.versions(), candidates=summaries,
        reason=choice.reason, verification=verification)
    progress.step("Writing the artifact")
    out = run_dir / "out"
    out.mkdir()
    _manifest, tar_sha = write_artifact(out, plan, chosen.files)
    report = CompileReport(
        ok=True, sha256=tar_sha,
        source_sha256=fetched.sha256, target=spec.name.value, target_cpu=spec.cpu,
        chosen=chosen.name, backend="tvm" if chosen.backend == "tvm" else "onnx",
        speedup=choice.speedups.get(chosen.name), max_abs_diff=chosen.max_abs_diff,
        top1_agreement=chosen.top1, verification=verification, reason=choice.reason,
        tvm_status=tvm_status, batch_sizes=[size_key(s) for s in sizes],
        tuning_trials=tuning_info.trials, tuning_seconds=round(tuning_info.seconds, 2),
        tuning_cache_hit=tuning_info.cache_hit, candidates=summaries,
        seconds=round(time.monotonic() - started, 2))
    report = _publish_all(settings, progress, out, report, key)
    progress.done(f"Artifact {report.artifact_dir_uri}: {chosen.name.value}")
    return report


def _destinations(settings: CompileSettings, key: str) -> list[str]:
    """Where the artifact goes: the cache entry first (so a failed copy to
    ``output_uri`` still leaves it reusable), then ``output_uri``."""
    out = [store.join(settings.artifact_cache_uri, key)] if settings.artifact_cache_uri else []
    return out + ([settings.output_uri] if settings.output_uri else [])


def _publish_all(settings: CompileSettings, progress: Progress, out: Path,
                 report: CompileReport, key: str) -> CompileReport:
    """Publish ``out`` to every destination, each with a report naming its own copy; the
    returned report names the last (``output_uri`` when given)."""
    for uri in _destinations(settings, key):
        report = report.model_copy(update={
            "artifact_uri": store.join(uri, ARTIFACT_TARBALL),
            "artifact_dir_uri": store.join(uri, ARTIFACT_DIR), "artifact_key": key})
        write_report(out, report)
        progress.step(f"Publishing to {uri}")
        store.publish(out, uri, settings.s3())
    return report


def _cached(settings: CompileSettings, progress: Progress, run_dir: Path, key: str,
            source_sha256: str, started: float) -> CompileReport | None:
    """The artifact cache entry ``key`` as this run's result (copied under ``output_uri``
    when one is given), or None when there is no usable entry."""
    assert settings.artifact_cache_uri
    entry = store.join(settings.artifact_cache_uri, key)
    progress.step(f"Looking up the artifact cache ({entry})")
    out = run_dir / "cached"
    found = store.lookup_artifact(entry, out, settings.s3(), source_sha256,
                                  copy=settings.output_uri is not None)
    if found is None:
        progress.done(f"Artifact cache: no entry {key}, compiling")
        return None
    progress.done(f"Artifact cache: reusing {entry} ({found.chosen.value if found.chosen else '?'}"
                  "), nothing compiled")
    report = found.model_copy(update={
        "artifact_cache_hit": True, "artifact_key": key, "tuning_trials": 0,
        "tuning_seconds": 0.0, "tuning_cache_hit": False,
        "seconds": round(time.monotonic() - started, 2)})
    if settings.output_uri:
        report = report.model_copy(update={
            "artifact_uri": store.join(settings.output_uri, ARTIFACT_TARBALL),
            "artifact_dir_uri": store.join(settings.output_uri, ARTIFACT_DIR)})
        write_report(out, report)
        progress.step(f"Publishing to {settings.output_uri}")
        store.publish(out, settings.output_uri, settings.s3())
    return report


def _load(ctx: Context, r: Evaluated) -> Backend:
    """A candidate's files loaded again, the way the artifact will be served."""
    threads = ctx.settings.threads
    if r.backend == "onnx":
        onnx = OnnxBackend(intra_op_threads=threads)
        onnx.load(r.files[0].source)
        return onnx
    info = ctx.bench.info
    tvm = TvmBackend(inputs=info.inputs, outputs=info.outputs,
                     libraries=[TvmLibrary(f.name, f.batch_size) for f in r.files],
                     latency_s=r.p50_s, intra_op_threads=threads)
    tvm.load(r.files[0].source.parent)
    return tvm


def _confirm(ctx: Context, results: list[Evaluated], choice: Choice) -> Choice:
    """Re-measure the winner against the baseline side by side; keep it only if it holds."""
    ctx.progress.step(f"Confirming {choice.chosen.value} against onnxruntime fp32")
    base_r = next(r for r in results if r.name is C.ORT_FP32)
    win_r = next(r for r in results if r.name is choice.chosen)
    base, win = _load(ctx, base_r), _load(ctx, win_r)
    try:
        ratios = ctx.bench.confirm(base, win)
    finally:
        base.unload()
        win.unload()
    held = speedup({b: 1.0 for b in ratios}, {b: 1 / r for b, r in ratios.items()})
    assert held is not None
    geo, worst = held
    cells = ", ".join(f"batch {b} {r:.2f}x" for b, r in ratios.items())
    if worst >= 1.0 and geo >= ctx.settings.min_speedup:
        ctx.progress.done(f"{choice.chosen.value} confirmed side by side: {cells}")
        speedups = {**choice.speedups, choice.chosen: round(geo, 3)}
        return Choice(choice.chosen, choice.reason + f"; confirmed side by side ({cells})",
                      speedups, choice.notes)
    ctx.progress.done(f"{choice.chosen.value} did not hold up side by side: {cells}")
    notes = {**choice.notes, choice.chosen: f"not confirmed side by side ({cells})",
             C.ORT_FP32: "chosen: the winner did not hold up"}
    reason = (f"{choice.chosen.value} looked faster but did not hold up when re-measured side "
              f"by side with onnxruntime fp32 ({cells}): the artifact is the ONNX model itself, "
              "served by onnxruntime")
    return Choice(C.ORT_FP32, reason, choice.speedups, notes)


def untimed_reason(ctx: Context) -> str:
    if ctx.spec.cross:
        return f"cross-compiled for {ctx.spec.family}; this host is not one"
    return "this host lacks the target's CPU features"


def _verification(ctx: Context, host: str, chosen: Evaluated) -> str:
    threads = f"{ctx.settings.threads} thread{'s' if ctx.settings.threads > 1 else ''}"
    if not ctx.untimed:
        return (f"measured on this host ({host}), {threads}; accuracy vs onnxruntime fp32 on "
                f"{len(ctx.bench.cases)} batches")
    if chosen.backend == "tvm":
        emulated = len(ctx.bench.emulation_cases())
        return (f"verified under emulation ({ctx.spec.qemu}), not timed; accuracy vs "
                f"onnxruntime fp32 on {emulated} batches")
    return f"not timed ({untimed_reason(ctx)})"


def _baseline(ctx: Context, backend: OnnxBackend) -> Evaluated:
    r = Evaluated(C.ORT_FP32, accurate=True, max_abs_diff=0.0,
                  files=[ArtifactFile(ctx.model_path, "model.onnx")])
    if not ctx.untimed:
        ctx.progress.step("Timing onnxruntime fp32")
        r.p50_s, r.p99_s = ctx.bench.time(backend)
        ctx.progress.done(_timing_line(r))
    backend.unload()
    return r


def _ort_candidate(ctx: Context, name: CandidateName) -> Evaluated:
    r = Evaluated(name)
    dest = ctx.run_dir / f"{name.value}.onnx"
    ctx.progress.step(f"Building {name.value}")
    try:
        if name is C.ORT_INT8:
            ort.quantize(ctx.model_path, dest)
        else:
            ort.optimize(ctx.model_path, dest)
        backend = OnnxBackend(intra_op_threads=ctx.settings.threads)
        backend.load(dest)
    except Exception as e:  # onnxruntime's own errors, CompileError
        r.failure = getattr(e, "message", None) or str(e)[:300]
        ctx.progress.done(f"{name.value}: {r.failure}")
        return r
    r.files = [ArtifactFile(dest, "model.onnx")]
    gate = (ctx.bench.quantized_gate(backend, ctx.settings.min_top1_agreement)
            if name is C.ORT_INT8 else ctx.bench.fp32_gate(backend, ctx.settings.max_abs_diff))
    r.accurate, r.max_abs_diff, r.top1, r.gate_note = (gate.passed, gate.max_abs_diff,
                                                       gate.top1_agreement, gate.note)
    if gate.passed:
        ctx.progress.step(f"Timing {name.value}")
        r.p50_s, r.p99_s = ctx.bench.time(backend)
    backend.unload()
    ctx.progress.done(_timing_line(r))
    return r


def _timing_line(r: Evaluated) -> str:
    if r.failure:
        return f"{r.name.value}: {r.failure}"
    if not r.accurate:
        return f"{r.name.value}: failed the accuracy gate ({r.gate_note})"
    cells = ", ".join(f"batch {b} p50 {v * 1e3:.3f} ms" for b, v in r.p50_s.items())
    return f"{r.name.value}: {cells or 'accurate'}"
