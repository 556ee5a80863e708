"""The test bench every candidate faces: the same inputs, the same reference, the same clock.

Built once per compilation from the model's signature: per compiled batch size
a generated batch (also the one timed) and up to ``MAX_CALIBRATION_BATCHES``
batches of calibration rows, plus one batch of an uncompiled size (the largest
plus three) that makes a TVM build split and pad like the server does, and
(without a calibration set) ``ACCURACY_ROWS`` generated rows in one batch. The
reference outputs are onnxruntime fp32's. A candidate is any ``Backend``:
its accuracy is checked on every batch and its latency measured through
``predict``, the call the model server makes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kubeinfer_runtime.compile import accuracy, measure
from kubeinfer_runtime.compile.errors import BadInput
from kubeinfer_runtime.compile.signature import ModelInfo, batches, generated
from kubeinfer_runtime.models.base import Array, Backend, Tensors

MAX_CALIBRATION_BATCHES = 8
#: Seeds of the generated inputs (fixed: a recompile checks the same numbers).
TIMING_SEED = 1
ODD_SEED = 2
ACCURACY_SEED = 3
#: Interleaved rounds re-measuring a winner against the baseline.
CONFIRM_ROUNDS = 5
#: Generated rows checked besides the timed batches (without a calibration set): a
#: top-1 agreement from a few dozen rows says little.
ACCURACY_ROWS = 512
#: Batches of generated rows a cross build runs under emulation besides the timed ones
#: (each is one qemu process, ~0.2 s).
EMULATED_EXTRA_BATCHES = 4


def size_key(size: int | None) -> int:
    """How reports name a batch size (a model without a batch dimension: 1 call)."""
    return 1 if size is None else size


@dataclass
class Case:
    #: The compiled batch size it runs at (None: the model's static shape; -1: an
    #: uncompiled size, checking split and pad).
    size: int | None
    inputs: Tensors
    reference: Tensors


@dataclass
class Bench:
    info: ModelInfo
    sizes: list[int | None]
    measure_s: float
    cases: list[Case] = field(default_factory=list)
    timing: dict[int | None, Tensors] = field(default_factory=dict)

    @classmethod
    def build(cls, info: ModelInfo, sizes: list[int | None], baseline: Backend,
              calibration: Tensors | None, measure_s: float) -> Bench:
        bench = cls(info, sizes, measure_s)
        inputs: list[tuple[int | None, Tensors]] = []
        for s in sizes:
            x = generated(info, s, TIMING_SEED)
            bench.timing[s] = x
            inputs.append((s, x))
            if calibration is not None:
                if s is None:
                    inputs.append((s, calibration))
                else:
                    inputs += [(s, b) for b in batches(calibration, s)[:MAX_CALIBRATION_BATCHES]]
        if info.batched:
            # Uncompiled sizes (split and pad), and rows enough for a top-1 rate.
            odd = max(s for s in sizes if s is not None) + 3
            inputs.append((-1, generated(info, odd, ODD_SEED)))
            if calibration is None:
                inputs.append((-1, generated(info, ACCURACY_ROWS, ACCURACY_SEED)))
        for s, x in inputs:
            try:
                ref = baseline.predict(x)
            except Exception as e:
                detail = getattr(e, "message", None) or str(e) or type(e).__name__
                raise BadInput(f"onnxruntime cannot run the model on inputs made from its "
                               f"signature ({detail[:300]}): give a calibration set with real "
                               "inputs (KUBEINFER_CALIBRATION_URI)") from None
            bench.cases.append(Case(s, x, ref))
        return bench

    def emulation_cases(self, extra: int = EMULATED_EXTRA_BATCHES) -> list[Case]:
        """The cases a cross build runs under emulation: those at a compiled size, plus up to
        ``extra`` batches of the largest compiled size cut from the uncompiled-size rows
        (a library takes only its own size; more rows make the check worth more)."""
        out = [c for c in self.cases if c.size != -1]
        largest = max((s for s in self.sizes if s is not None), default=None)
        if largest is None:
            return out
        for c in self.cases:
            if c.size != -1:
                continue
            rows = min(a.shape[0] for a in c.inputs.values())
            for start in range(0, rows - largest + 1, largest):
                if extra <= 0:
                    return out
                window = slice(start, start + largest)
                out.append(Case(largest,
                                {k: np.ascontiguousarray(v[window]) for k, v in c.inputs.items()},
                                {k: v[window] for k, v in c.reference.items()}))
                extra -= 1
        return out

    def outputs(self, backend: Backend, only_compiled: bool = False) -> list[Tensors]:
        return [backend.predict(c.inputs) for c in self.cases
                if not (only_compiled and c.size == -1)]

    def references(self) -> list[Tensors]:
        return [c.reference for c in self.cases]

    def fp32_gate(self, backend: Backend, tolerance: float) -> accuracy.GateResult:
        diff = accuracy.max_abs_diff(self.references(), self.outputs(backend))
        return accuracy.fp32_gate(diff, tolerance)

    def quantized_gate(self, backend: Backend, threshold: float) -> accuracy.GateResult:
        got = self.outputs(backend)
        refs = self.references()
        return accuracy.quantized_gate(accuracy.max_abs_diff(refs, got),
                                       accuracy.top1_agreement(refs, got), threshold)

    def emulated_gate(self, runs: list[tuple[Case, list[Array]]],
                      tolerance: float) -> accuracy.GateResult:
        """Gate of outputs produced elsewhere (under emulation), case by case."""
        names = [t.name for t in self.info.outputs]
        refs = [c.reference for c, _ in runs]
        got = [dict(zip(names, outs, strict=True)) for _, outs in runs]
        return accuracy.fp32_gate(accuracy.max_abs_diff(refs, got), tolerance)

    def time(self, backend: Backend) -> tuple[dict[int, float], dict[int, float]]:
        """(p50, p99) seconds per batch size."""
        p50: dict[int, float] = {}
        p99: dict[int, float] = {}
        for s in self.sizes:
            x = self.timing[s]
            t = measure.time_calls(lambda x=x: backend.predict(x), self.measure_s)  # type: ignore[misc]
            p50[size_key(s)], p99[size_key(s)] = t.p50_s, t.p99_s
        return p50, p99

    def confirm(self, base: Backend, cand: Backend, rounds: int = CONFIRM_ROUNDS
                ) -> dict[int, float]:
        """Speedup of ``cand`` over ``base`` per batch size, re-measured in interleaved
        rounds (base, cand, base, cand, ...): the median of the rounds' p50 ratios.

        Candidates are first timed one after the other, and this machine's speed
        drifts; a winner is only published when it still wins side by side.
        """
        out: dict[int, float] = {}
        slice_s = max(self.measure_s / rounds, 0.02)
        for s in self.sizes:
            x = self.timing[s]
            ratios = []
            for _ in range(rounds):
                b = measure.time_calls(lambda x=x: base.predict(x), slice_s)  # type: ignore[misc]
                c = measure.time_calls(lambda x=x: cand.predict(x), slice_s)  # type: ignore[misc]
                ratios.append(b.p50_s / c.p50_s)
            out[size_key(s)] = sorted(ratios)[len(ratios) // 2]
        return out
