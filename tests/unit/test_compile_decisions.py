"""Compile's pure decisions: the choice rules, the accuracy gate, timing stats, split plans."""

from __future__ import annotations

import numpy as np
import pytest

from kubeinfer_runtime.compile import accuracy
from kubeinfer_runtime.compile.bench import Bench, Case
from kubeinfer_runtime.compile.choice import Outcome, choose_timed, choose_untimed, speedup
from kubeinfer_runtime.compile.measure import percentile, summarize, time_calls
from kubeinfer_runtime.compile.signature import ModelInfo
from kubeinfer_runtime.contract.compile import CandidateName as C
from kubeinfer_runtime.models.base import TensorSpec
from kubeinfer_runtime.models.tvm import SplitPlanner

BASE = Outcome(C.ORT_FP32, True, {1: 0.030, 64: 0.300})


# ------------------------------------------------------------------ choice


def test_a_faster_accurate_candidate_wins_and_says_how_much() -> None:
    fast = Outcome(C.ORT_INT8, True, {1: 0.015, 64: 0.100})
    choice = choose_timed([BASE, fast], min_speedup=1.05)
    assert choice.chosen is C.ORT_INT8
    assert choice.speedups[C.ORT_INT8] == pytest.approx((2.0 * 3.0) ** 0.5, rel=1e-3)
    assert "2.45x faster than onnxruntime fp32" in choice.reason
    assert choice.notes[C.ORT_INT8].startswith("chosen:")


def test_the_fastest_of_several_qualifying_candidates_wins() -> None:
    a = Outcome(C.ORT_OPTIMIZED, True, {1: 0.020, 64: 0.200})
    b = Outcome(C.TVM_TUNED, True, {1: 0.010, 64: 0.150})
    assert choose_timed([BASE, a, b], min_speedup=1.05).chosen is C.TVM_TUNED


def test_slower_at_any_batch_size_never_wins_even_when_faster_on_average() -> None:
    # 3x faster at batch 1, 10% slower at batch 64: geometric mean 1.65x, still refused.
    tvm = Outcome(C.TVM_TUNED, True, {1: 0.010, 64: 0.330})
    choice = choose_timed([BASE, tvm], min_speedup=1.05)
    assert choice.chosen is C.ORT_FP32
    assert choice.notes[C.TVM_TUNED] == "slower at batch 64 (0.91x)"
    assert "the ONNX model itself" in choice.reason


def test_merely_equal_is_not_enough_the_margin_absorbs_timing_noise() -> None:
    same = Outcome(C.ORT_OPTIMIZED, True, {1: 0.0295, 64: 0.295})
    choice = choose_timed([BASE, same], min_speedup=1.05)
    assert choice.chosen is C.ORT_FP32
    assert choice.notes[C.ORT_OPTIMIZED].startswith("only 1.0")


def test_an_inaccurate_candidate_never_wins_however_fast() -> None:
    fast_wrong = Outcome(C.ORT_INT8, False, {1: 0.001, 64: 0.01},
                         gate_note="top-1 agreement 97.0% < 99.0% required")
    choice = choose_timed([BASE, fast_wrong], min_speedup=1.05)
    assert choice.chosen is C.ORT_FP32
    assert "top-1 agreement 97.0%" in choice.notes[C.ORT_INT8]


def test_failed_candidates_are_notes_not_errors() -> None:
    broken = Outcome(C.TVM_UNTUNED, False, failure="TVM could not compile the model: boom")
    choice = choose_timed([BASE, broken], min_speedup=1.05)
    assert choice.chosen is C.ORT_FP32
    assert choice.notes[C.TVM_UNTUNED] == "TVM could not compile the model: boom"
    assert choice.speedups[C.TVM_UNTUNED] is None


def test_force_publishes_an_accurate_slower_candidate_and_says_so() -> None:
    slow = Outcome(C.TVM_UNTUNED, True, {1: 0.3, 64: 3.0})
    choice = choose_timed([BASE, slow], min_speedup=1.05, force=C.TVM_UNTUNED)
    assert choice.chosen is C.TVM_UNTUNED
    assert "forced" in choice.reason and "0.10x onnxruntime fp32" in choice.reason


def test_force_never_publishes_an_inaccurate_candidate() -> None:
    wrong = Outcome(C.TVM_UNTUNED, False, {1: 0.3, 64: 3.0}, gate_note="max-abs-diff 0.1")
    choice = choose_timed([BASE, wrong], min_speedup=1.05, force=C.TVM_UNTUNED)
    assert choice.chosen is C.ORT_FP32
    assert choice.notes[C.TVM_UNTUNED].startswith("forced, but inaccurate")


def test_cross_targets_choose_a_verified_tvm_build_untimed() -> None:
    base = Outcome(C.ORT_FP32, True)
    tvm = Outcome(C.TVM_UNTUNED, True)
    choice = choose_untimed([base, tvm], "aarch64", "cross-compiled")
    assert choice.chosen is C.TVM_UNTUNED
    assert choice.speedups == {C.ORT_FP32: None, C.TVM_UNTUNED: None}
    assert "measure it on the device" in choice.reason


def test_cross_targets_never_choose_an_unverified_build() -> None:
    base = Outcome(C.ORT_FP32, True)
    tvm = Outcome(C.TVM_UNTUNED, False, failure="built, not verified: qemu-aarch64 missing")
    choice = choose_untimed([base, tvm], "aarch64", "cross-compiled")
    assert choice.chosen is C.ORT_FP32
    assert "no TVM build for aarch64 could be verified" in choice.reason


def test_speedup_needs_every_batch_size_timed() -> None:
    assert speedup({1: 1.0, 8: 2.0}, {1: 0.5}) is None
    geo, worst = speedup({1: 1.0, 8: 2.0}, {1: 0.5, 8: 4.0}) or (0, 0)
    assert geo == pytest.approx(1.0) and worst == pytest.approx(0.5)


# ------------------------------------------------------------------ accuracy gate


def _t(**arrays: list[list[float]] | list[int]) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, dtype=np.float32 if isinstance(v[0], list) else np.int64)
            for k, v in arrays.items()}


def test_max_abs_diff_over_every_output_and_batch() -> None:
    refs = [_t(y=[[1.0, 2.0]]), _t(y=[[3.0, 4.0]], label=[1])]
    gots = [_t(y=[[1.0, 2.000001]]), _t(y=[[3.0, 4.5]], label=[1])]
    assert accuracy.max_abs_diff(refs, gots) == pytest.approx(0.5)


def test_shape_mismatch_missing_output_and_nan_are_infinitely_wrong() -> None:
    assert accuracy.max_abs_diff([_t(y=[[1.0, 2.0]])], [_t(y=[[1.0]])]) == float("inf")
    assert accuracy.max_abs_diff([_t(y=[[1.0]])], [_t(z=[[1.0]])]) == float("inf")
    nan = {"y": np.array([np.nan, 1.0])}
    assert accuracy.max_abs_diff([nan], [{"y": np.array([np.nan, 1.0])}]) == 0.0
    assert accuracy.max_abs_diff([nan], [{"y": np.array([0.0, 1.0])}]) == float("inf")


def test_fp32_gate_at_the_tolerance() -> None:
    assert accuracy.fp32_gate(1e-5, 1e-5).passed
    failed = accuracy.fp32_gate(2e-5, 1e-5)
    assert not failed.passed and failed.note == "max-abs-diff 2e-05 > 1e-05 allowed"


def test_top1_agreement_counts_rows_on_the_class_score_output() -> None:
    refs = [{"label": np.array([0, 1]), "scores": np.array([[0.9, 0.1], [0.2, 0.8]])}]
    gots = [{"label": np.array([0, 1]), "scores": np.array([[0.6, 0.4], [0.7, 0.3]])}]
    assert accuracy.top1_agreement(refs, gots) == 0.5
    gate = accuracy.quantized_gate(0.5, 0.5, 0.99)
    assert not gate.passed and gate.note == "top-1 agreement 50.0% < 99.0% required"
    assert accuracy.quantized_gate(0.01, 0.995, 0.99).passed


def test_no_class_scores_no_quantized_gate() -> None:
    regression = [{"y": np.array([[1.0], [2.0]])}]
    assert accuracy.top1_agreement(regression, regression) is None
    assert not accuracy.quantized_gate(0.0, None, 0.99).passed


# ------------------------------------------------------------------ timing


def test_percentiles_by_nearest_rank() -> None:
    samples = [float(i) for i in range(1, 101)]
    assert percentile(samples, 0.5) == 50.0
    assert percentile(samples, 0.99) == 99.0
    assert percentile([3.0], 0.99) == 3.0
    t = summarize([5.0, 1.0, 3.0])
    assert (t.p50_s, t.p99_s, t.calls) == (3.0, 5.0, 3)


def test_time_calls_runs_until_the_clock_says_stop() -> None:
    now = [0.0]

    def clock() -> float:
        now[0] += 0.25
        return now[0]

    calls = []
    t = time_calls(lambda: calls.append(1), 10.0, min_calls=3, clock=clock)
    # 5 warm-up calls, then timed calls until the fake clock passes 10 s.
    assert t.calls == len(calls) - 5 and t.p50_s == 0.25
    assert 15 <= t.calls <= 25


# ------------------------------------------------------------------ split and pad


def test_split_plan_pads_when_one_big_call_is_cheaper_than_many_small() -> None:
    p = SplitPlanner({1: 0.03, 64: 0.3})
    assert p.plan(1) == [(1, 1)]
    assert p.plan(5) == [(1, 1)] * 5
    assert p.plan(40) == [(40, 64)]  # padded
    assert p.plan(65) == [(64, 64), (1, 1)]
    assert p.plan(130) == [(64, 64), (64, 64), (1, 1), (1, 1)]


def test_split_plan_prefers_the_size_cheapest_per_row() -> None:
    p = SplitPlanner({1: 0.001, 64: 3.0})  # batch 64 is slower per row: never used
    assert p.plan(70) == [(1, 1)] * 70
    plan = p.plan(100_000)
    assert sum(take for take, _ in plan) == 100_000


@pytest.mark.parametrize("rows", [1, 2, 7, 8, 9, 63, 64, 65, 200, 1000])
def test_split_plan_covers_every_row_once(rows: int) -> None:
    p = SplitPlanner({1: 0.02, 8: 0.05, 64: 0.25})
    plan = p.plan(rows)
    assert sum(take for take, _ in plan) == rows
    assert all(0 < take <= size for take, size in plan)
    assert all(take == size for take, size in plan[:-1])  # only the last call is padded


# ------------------------------------------------------------------ emulated checks


def test_cross_builds_are_checked_on_extra_batches_cut_from_the_generated_rows() -> None:
    spec = TensorSpec("x", np.dtype(np.float32), (None, 2))
    info = ModelInfo((spec,), (TensorSpec("y", np.dtype(np.float32), (None, 2)),), ())
    rows = np.arange(40, dtype=np.float32).reshape(20, 2)
    bench = Bench(info, [1, 4], 0.1, cases=[
        Case(1, {"x": rows[:1]}, {"y": rows[:1] * 2}),
        Case(4, {"x": rows[:4]}, {"y": rows[:4] * 2}),
        Case(-1, {"x": rows[:7]}, {"y": rows[:7] * 2}),  # the odd size: too few for two
        Case(-1, {"x": rows}, {"y": rows * 2}),
    ])
    cases = bench.emulation_cases(extra=3)
    assert [c.size for c in cases] == [1, 4, 4, 4, 4]
    for c in cases:  # every cut keeps its rows' references
        np.testing.assert_array_equal(c.reference["y"], c.inputs["x"] * 2)
    assert [c.inputs["x"][0, 0] for c in cases[2:]] == [0.0, 0.0, 8.0]
