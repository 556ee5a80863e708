"""Which candidate becomes the artifact: pure rules, never slower than onnxruntime fp32.

On a target this host runs, every candidate was timed against onnxruntime fp32
(the baseline) at each batch size. A candidate may replace the baseline only
when it passed its accuracy gate, is no slower at any batch size, and is at
least ``min_speedup`` faster as a geometric mean over the batch sizes (the
margin keeps timing noise from choosing a merely equal candidate). The fastest
such candidate wins; when none qualifies the artifact is the ONNX model itself,
served by onnxruntime, and the reason says so. Only an explicit
``force_candidate`` setting publishes a slower one, and the report says so.

On a cross target nothing can be timed: a TVM build that was verified under
emulation is chosen (and said to be untimed); an unverified one never is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from kubeinfer_runtime.contract.compile import CandidateName

BASELINE = CandidateName.ORT_FP32


@dataclass(frozen=True)
class Outcome:
    """What is known about one candidate when the choice is made."""

    name: CandidateName
    #: Built and passed its accuracy gate (cross: verified under emulation).
    accurate: bool
    #: Median latency per batch size, seconds (empty: not timed).
    p50_s: dict[int, float] = field(default_factory=dict)
    #: Why it has no result, when it failed to build or run.
    failure: str = ""
    #: Accuracy gate's note when it failed.
    gate_note: str = ""


@dataclass(frozen=True)
class Choice:
    chosen: CandidateName
    reason: str
    #: Speedup vs the baseline per candidate (geometric mean; None: not timed).
    speedups: dict[CandidateName, float | None]
    #: One line per candidate: why it was (not) chosen.
    notes: dict[CandidateName, str]


def speedup(base: dict[int, float], cand: dict[int, float]) -> tuple[float, float] | None:
    """(geometric mean, worst) of base/cand over the batch sizes both were timed at."""
    sizes = [b for b in base if b in cand and cand[b] > 0 and base[b] > 0]
    if not sizes or len(sizes) != len(base):
        return None
    ratios = [base[b] / cand[b] for b in sizes]
    geo = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    return geo, min(ratios)


def choose_timed(outcomes: list[Outcome], min_speedup: float,
                 force: CandidateName | None = None) -> Choice:
    """The choice on a target this host runs (every candidate timed).

    ``force`` names a candidate to publish whatever its speed, as long as it is
    accurate (for A/B tests on the real device); the reason says how it compares.
    """
    base = next(o for o in outcomes if o.name is BASELINE)
    speedups: dict[CandidateName, float | None] = {BASELINE: 1.0}
    notes: dict[CandidateName, str] = {}
    best: tuple[float, CandidateName] | None = None
    for o in outcomes:
        if o.name is BASELINE:
            continue
        if o.failure:
            speedups[o.name], notes[o.name] = None, o.failure
            continue
        s = speedup(base.p50_s, o.p50_s)
        speedups[o.name] = None if s is None else round(s[0], 3)
        if not o.accurate:
            notes[o.name] = f"inaccurate: {o.gate_note or 'outputs differ'}"
        elif s is None:
            notes[o.name] = "not timed at every batch size"
        elif s[1] < 1.0:
            worst = min(o.p50_s, key=lambda b: base.p50_s[b] / o.p50_s[b])
            notes[o.name] = (f"slower at batch {worst} "
                             f"({base.p50_s[worst] / o.p50_s[worst]:.2f}x)")
        elif s[0] < min_speedup:
            notes[o.name] = f"only {s[0]:.3f}x (needs {min_speedup:.2f}x)"
        else:
            notes[o.name] = f"{s[0]:.2f}x, accurate"
            if best is None or s[0] > best[0]:
                best = (s[0], o.name)
    forced = next((o for o in outcomes if o.name is force), None)
    if forced is not None and forced.name is not BASELINE:
        if forced.accurate and not forced.failure:
            notes[BASELINE] = "baseline"
            notes[forced.name] = "chosen: forced"
            ratio = speedups.get(forced.name)
            return Choice(forced.name, f"{forced.name.value} was forced (force_candidate) and "
                          "passed the accuracy gate; it is "
                          + ("not timed" if ratio is None else f"{ratio:.2f}x onnxruntime fp32"),
                          speedups, notes)
        notes[forced.name] = "forced, but " + notes.get(forced.name, "it failed")
    if best is None:
        reason = (f"nothing beat onnxruntime fp32 by {min_speedup:.2f}x at every batch size "
                  "with accurate outputs: the artifact is the ONNX model itself, served by "
                  "onnxruntime")
        notes[BASELINE] = "chosen: nothing beat it"
        return Choice(BASELINE, reason, speedups, notes)
    notes[BASELINE] = "baseline"
    notes[best[1]] = "chosen: " + notes[best[1]]
    reason = (f"{best[1].value} is {best[0]:.2f}x faster than onnxruntime fp32 (geometric mean "
              "over the batch sizes), no slower at any, and passed the accuracy gate")
    return Choice(best[1], reason, speedups, notes)


def choose_untimed(outcomes: list[Outcome], target: str, why_untimed: str) -> Choice:
    """The choice on a target this host cannot run: a verified TVM build, else the ONNX model."""
    speedups: dict[CandidateName, float | None] = {o.name: None for o in outcomes}
    notes: dict[CandidateName, str] = {}
    chosen: CandidateName | None = None
    for o in outcomes:
        if o.name is BASELINE:
            continue
        if o.failure:
            notes[o.name] = o.failure
        elif not o.accurate:
            notes[o.name] = f"failed verification: {o.gate_note or 'outputs differ'}"
        elif chosen is None and o.name in (CandidateName.TVM_TUNED, CandidateName.TVM_UNTUNED):
            chosen = o.name
            notes[o.name] = f"chosen: verified, not timed ({why_untimed})"
        else:
            notes[o.name] = "verified, not timed"
    if chosen is None:
        notes[BASELINE] = "chosen: no verified TVM build"
        reason = (f"no TVM build for {target} could be verified ({why_untimed}): the artifact "
                  "is the ONNX model itself, served by onnxruntime")
        return Choice(BASELINE, reason, speedups, notes)
    notes[BASELINE] = f"not timed ({why_untimed})"
    reason = (f"{chosen.value} for {target} matches onnxruntime fp32 under verification; its "
              f"speed is unknown here ({why_untimed}): measure it on the device")
    return Choice(chosen, reason, speedups, notes)
