"""The accuracy gate: a candidate is published only when it answers like onnxruntime fp32.

Pure (numpy only). fp32 candidates (TVM, onnxruntime's optimised graph) must
match the reference within an absolute tolerance on every output element,
1e-5 by default: different kernels reorder float sums, nothing more is allowed.
Quantized candidates cannot meet that; their gate is the share of rows whose
top-1 class (argmax of the scores) is the reference's, 99% by default, and the
max-abs-diff is still reported so users see the price.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kubeinfer_runtime.models.base import Array, Tensors


@dataclass(frozen=True)
class GateResult:
    passed: bool
    max_abs_diff: float | None
    top1_agreement: float | None
    #: Why it failed (empty when it passed).
    note: str = ""


def _diff(ref: Array, got: Array) -> float:
    if ref.shape != got.shape:
        return float("inf")
    if ref.size == 0:
        return 0.0
    if ref.dtype.kind in "OUSb" or got.dtype.kind in "OUSb":
        return 0.0 if np.array_equal(ref, got) else float("inf")
    a = ref.astype(np.float64)
    b = got.astype(np.float64)
    both_nan = np.isnan(a) & np.isnan(b)
    d = np.abs(a - b)
    d[both_nan] = 0.0
    d[np.isnan(d)] = np.inf
    return float(d.max())


def max_abs_diff(refs: Sequence[Tensors], gots: Sequence[Tensors]) -> float:
    """Largest |ref - got| over every output of every batch (inf on a shape or key mismatch)."""
    worst = 0.0
    for ref, got in zip(refs, gots, strict=True):
        for name, r in ref.items():
            g = got.get(name)
            worst = max(worst, float("inf") if g is None else _diff(r, g))
    return worst


def scores_output(ref: Tensors) -> str | None:
    """The output holding class scores: the first float one with rows and >= 2 columns."""
    for name, a in ref.items():
        if a.dtype.kind == "f" and a.ndim >= 2 and a.shape[-1] >= 2:
            return name
    return None


def top1_agreement(refs: Sequence[Tensors], gots: Sequence[Tensors]) -> float | None:
    """Share of rows whose argmax matches (None: no output looks like class scores)."""
    name = scores_output(refs[0]) if refs else None
    if name is None:
        return None
    same = total = 0
    for ref, got in zip(refs, gots, strict=True):
        r, g = ref[name], got.get(name)
        if g is None or g.shape != r.shape:
            total += int(np.prod(r.shape[:-1]))
            continue
        hits = np.argmax(r, axis=-1) == np.argmax(g, axis=-1)
        same += int(hits.sum())
        total += hits.size
    return same / total if total else None


def fp32_gate(diff: float, tolerance: float) -> GateResult:
    if diff <= tolerance:
        return GateResult(True, diff, None)
    return GateResult(False, diff, None,
                      f"max-abs-diff {diff:.2g} > {tolerance:.0e} allowed")


def quantized_gate(diff: float, agreement: float | None, threshold: float) -> GateResult:
    if agreement is None:
        return GateResult(False, diff, None, "no class-score output to compare top-1 on")
    if agreement >= threshold:
        return GateResult(True, diff, agreement)
    return GateResult(False, diff, agreement,
                      f"top-1 agreement {agreement:.1%} < {threshold:.1%} required")
