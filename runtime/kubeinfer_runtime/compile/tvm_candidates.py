"""The TVM candidates: untuned and MetaSchedule-tuned libraries, one per batch size.

Each is a folder of libraries (``model-b<N>.so``). On a target this host runs,
the folder is loaded by the same ``TvmBackend`` the model server uses, gated on
every test batch (the uncompiled size included, which exercises split and pad)
and timed. On a cross target the libraries are verified under qemu-user
(``emulate``) on the batches of their own size, and not timed. Tuning happens
only where the kernels can be measured: this host.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from kubeinfer_runtime.compile import emulate, store, tuning, tvm_build
from kubeinfer_runtime.compile.artifact import ArtifactFile
from kubeinfer_runtime.compile.bench import size_key
from kubeinfer_runtime.compile.context import Context, Evaluated
from kubeinfer_runtime.contract.compile import CandidateName
from kubeinfer_runtime.models.tvm import TvmBackend, TvmLibrary


def library_name(size: int | None) -> str:
    return "model.so" if size is None else f"model-b{size}.so"


class TvmCandidates:
    def __init__(self, ctx: Context, tvm: Any) -> None:
        self.ctx = ctx
        self.tvm = tvm
        self.threads = ctx.settings.threads
        self.target = tvm_build.tvm_target(tvm, ctx.spec, self.threads)
        self._mods: dict[int | None, Any] = {}

    def _module(self, size: int | None) -> Any:
        if size not in self._mods:
            info = self.ctx.bench.info
            self._mods[size] = tvm_build.prepare(self.tvm, self.ctx.model, info, size,
                                                 self.target)
        return self._mods[size]

    def _build_all(self, name: CandidateName, database: Path | None) -> Path:
        folder = self.ctx.run_dir / name.value
        for size in self.ctx.bench.sizes:
            self.ctx.progress.step(f"Building {name.value} for batch {size_key(size)} "
                                   f"({self.ctx.spec.name.value})")
            tvm_build.build(self.tvm, self._module(size), self.target, self.ctx.spec,
                            folder / library_name(size), database)
        return folder

    def untuned(self) -> Evaluated:
        r = Evaluated(CandidateName.TVM_UNTUNED, backend="tvm")
        try:
            folder = self._build_all(r.name, None)
        except Exception as e:  # TVM's frontend and compiler raise their own errors
            r.failure = f"TVM could not compile the model: {_first_line(e)}"
            self.ctx.progress.done(f"{r.name.value}: {r.failure}")
            return r
        return self._evaluate(r, folder)

    def tuned(self) -> tuple[Evaluated, tuning.TuneResult]:
        r = Evaluated(CandidateName.TVM_TUNED, backend="tvm")
        s = self.ctx.settings
        key = tuning.cache_key(self.ctx.source_sha256, {**self.ctx.spec.llvm(),
                                                        "num-cores": self.threads},
                               tvm_build.versions())
        database = Path(s.tuning_cache_dir) / key
        restored = False
        if s.tuning_cache_uri and not database.is_dir():
            restored = store.restore_cache(s.tuning_cache_uri, key, database, s.s3())
        trials, hit = 0, True
        stage_started = time.monotonic()
        try:
            for size in self.ctx.bench.sizes:
                started = time.monotonic()

                def report(n: int, size: int | None = size, started: float = started) -> None:
                    self.ctx.progress.step(
                        f"Tuning batch {size_key(size)}: {n} trials, "
                        f"{time.monotonic() - started:.0f}/{s.tuning_budget_s:.0f} s")

                self.ctx.progress.step(f"Tuning batch {size_key(size)} "
                                       f"(budget {s.tuning_budget_s:.0f} s)")
                res = tuning.tune(self._module(size), self.target, database, size,
                                  budget_s=s.tuning_budget_s, max_trials=s.tuning_trials,
                                  on_trials=report)
                trials += res.trials
                hit = hit and res.cache_hit
                self.ctx.progress.done(
                    f"Tuning batch {size_key(size)}: " + (
                        "records reused from the tuning cache" + (" (restored)" if restored
                                                                   else "")
                        if res.cache_hit else f"{res.trials} trials in {res.seconds:.1f} s"))
            folder = self._build_all(r.name, database)
        except Exception as e:
            r.failure = f"TVM tuning failed: {_first_line(e)}"
            self.ctx.progress.done(f"{r.name.value}: {r.failure}")
            return r, tuning.TuneResult(trials, time.monotonic() - stage_started, False,
                                        database)
        # Tuning and building, not evaluating: on a warm cache, the price of reusing records.
        seconds = time.monotonic() - stage_started
        if trials and s.tuning_cache_uri:
            store.save_cache(database, s.tuning_cache_uri, key, s.s3())
        return self._evaluate(r, folder), tuning.TuneResult(trials, seconds, hit, database)

    def _libraries(self, folder: Path) -> list[ArtifactFile]:
        return [ArtifactFile(folder / library_name(s), library_name(s), s)
                for s in self.ctx.bench.sizes]

    def _evaluate(self, r: Evaluated, folder: Path) -> Evaluated:
        r.files = self._libraries(folder)
        if self.ctx.untimed:
            return self._verify(r, folder)
        bench = self.ctx.bench
        backend = TvmBackend(inputs=bench.info.inputs, outputs=bench.info.outputs,
                             libraries=[TvmLibrary(f.name, f.batch_size) for f in r.files],
                             intra_op_threads=self.threads)
        try:
            backend.load(folder)
            gate = bench.fp32_gate(backend, self.ctx.settings.max_abs_diff)
        except Exception as e:
            r.failure = f"the TVM build did not run: {_first_line(e)}"
            self.ctx.progress.done(f"{r.name.value}: {r.failure}")
            return r
        r.accurate, r.max_abs_diff, r.gate_note = gate.passed, gate.max_abs_diff, gate.note
        if gate.passed:
            self.ctx.progress.step(f"Timing {r.name.value}")
            r.p50_s, r.p99_s = bench.time(backend)
        backend.unload()
        cells = ", ".join(f"batch {b} p50 {v * 1e3:.3f} ms" for b, v in r.p50_s.items())
        self.ctx.progress.done(f"{r.name.value}: " + (cells if gate.passed else
                                                      f"failed the accuracy gate ({gate.note})"))
        return r

    def _verify(self, r: Evaluated, folder: Path) -> Evaluated:
        """Cross target: run each library under qemu on the batches of its size."""
        spec, s, bench = self.ctx.spec, self.ctx.settings, self.ctx.bench
        problem = emulate.emulation_problem(spec, s.cross_runtime_dir)
        if problem:
            r.failure = f"built, not verified: {problem}"
            self.ctx.progress.done(f"{r.name.value}: {r.failure}")
            return r
        self.ctx.progress.step(f"Verifying {r.name.value} under {spec.qemu}")
        try:
            libs = emulate.runtime_lib_dir(s.cross_runtime_dir)
            assert libs is not None
            loader = emulate.build_loader(spec, libs, Path(s.work_dir) / "loaders")
            runs = []
            for case in bench.emulation_cases():
                inputs = [(t, case.inputs[t.name]) for t in bench.info.inputs]
                outs = emulate.run(spec, loader, folder / library_name(case.size), inputs,
                                   list(bench.info.outputs))
                runs.append((case, outs))
        except emulate.EmulationError as e:
            r.failure = f"built, not verified: {e}"
            self.ctx.progress.done(f"{r.name.value}: {r.failure}")
            return r
        gate = bench.emulated_gate(runs, s.max_abs_diff)
        r.accurate, r.max_abs_diff, r.gate_note = gate.passed, gate.max_abs_diff, gate.note
        self.ctx.progress.done(f"{r.name.value}: " + (
            f"verified under {spec.qemu} on {len(runs)} batches (max-abs-diff "
            f"{gate.max_abs_diff:.2g}), not timed" if gate.passed else
            f"failed verification ({gate.note})"))
        return r


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    # TVM errors end with the useful line; Python ones start with it.
    line = lines[-1] if lines and "Traceback" in text else (lines[0] if lines else "")
    return (line or type(e).__name__)[:300]
