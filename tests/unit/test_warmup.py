"""Readiness means "answers": warm-up inputs from signatures, the warm-up run, the slot's states.

The input builder is pure and checked over many signatures; the warm-up run is
checked with fake backends (to pin the retry rules) and with real onnxruntime
models that fail on zeros, on tiny images, or on everything.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import REGISTRY

from kubeinfer_operator.local.supervisor import LOAD_FAILED
from kubeinfer_operator.render.k8s_workloads import MODEL_SERVER_READY_PATH
from kubeinfer_runtime.contract import ModelServerSettings
from kubeinfer_runtime.errors import ModelError, NotReady, ValidationError
from kubeinfer_runtime.metrics import ModelServerMetrics
from kubeinfer_runtime.models.base import Backend, ModelMetadata, Tensors, TensorSpec
from kubeinfer_runtime.models.onnx import OnnxBackend
from kubeinfer_runtime.models.warmup import (
    MAX_WARMUP_ELEMENTS,
    WIDE_DYNAMIC_DIM,
    WarmupImpossible,
    WarmupStatus,
    run_warmup,
    warmup_inputs,
    warmup_tries,
)
from kubeinfer_runtime.pipeline import handlers
from kubeinfer_runtime.server.state import (
    LOAD_FAILED_MARKER,
    LoadedModel,
    ModelSlot,
    Phase,
    SlotStateError,
    load_into,
)
from tests.support.onnx_models import (
    add_3_model,
    conv3x3_model,
    fails_every_inference_model,
    int_divide_model,
    reshape_to_3_model,
)


def _meta(*inputs: tuple[str, Any, tuple[int | None, ...] | None]) -> ModelMetadata:
    return ModelMetadata(tuple(TensorSpec(n, np.dtype(d), s) for n, d, s in inputs),
                         (TensorSpec("y", np.dtype(np.float32), (None,)),), "test")


# ------------------------------------------------------------------ inputs from signatures


@pytest.mark.parametrize(("dtype", "shape", "want"), [
    (np.float32, (None, 4), (1, 4)),           # the usual [N, features]
    (np.float64, (None,), (1,)),               # a vector: its only dim is the batch
    (np.float16, (None, 3, None, None), (1, 3, 1, 1)),  # an image with dynamic H, W
    (np.int64, (None, None), (1, 1)),          # token ids [batch, sequence]
    (np.int32, (2, 3), (2, 3)),                # static: exactly as declared
    (np.uint8, (1, 28, 28), (1, 28, 28)),      # static batch of one
    (np.int8, (), ()),                         # a scalar
    (np.uint16, (5, None), (5, 1)),            # static first dim, dynamic second
    (np.uint32, (None, 0), (1, 0)),            # a declared empty dimension stays empty
    (np.uint64, (None, 2), (1, 2)),
    (np.int16, (None, 2), (1, 2)),
    (np.bool_, (None, 2), (1, 2)),
])
def test_numeric_inputs_take_the_declared_dtype_batch_one_and_zeros(
        dtype: Any, shape: tuple[int | None, ...], want: tuple[int, ...]) -> None:
    out = warmup_inputs(_meta(("x", dtype, shape)))
    assert list(out) == ["x"]
    assert out["x"].shape == want and out["x"].dtype == np.dtype(dtype)
    assert not out["x"].any()
    ones = warmup_inputs(_meta(("x", dtype, shape)), fill=1)["x"]
    assert ones.dtype == np.dtype(dtype) and (ones == 1).all()


def test_dynamic_dims_after_the_batch_take_the_asked_size() -> None:
    meta = _meta(("img", np.float32, (None, 3, None, None)), ("v", np.float32, (None,)))
    out = warmup_inputs(meta, dynamic=WIDE_DYNAMIC_DIM)
    assert out["img"].shape == (1, 3, WIDE_DYNAMIC_DIM, WIDE_DYNAMIC_DIM)
    assert out["v"].shape == (1,)  # the batch stays 1


def test_string_inputs_get_a_short_string() -> None:
    out = warmup_inputs(_meta(("text", object, (None, 1)), ("n", np.float32, (None, 2))))
    assert out["text"].dtype == np.dtype(object) and out["text"].tolist() == [["a"]]
    assert out["n"].shape == (1, 2)


def test_every_input_of_a_multi_input_model_is_made() -> None:
    meta = _meta(("ids", np.int64, (None, None)), ("mask", np.int64, (None, None)),
                 ("scale", np.float32, ()))
    out = warmup_inputs(meta)
    assert {k: v.shape for k, v in out.items()} == {"ids": (1, 1), "mask": (1, 1), "scale": ()}


def test_unknown_rank_or_oversized_inputs_cannot_be_made() -> None:
    with pytest.raises(WarmupImpossible, match='input "seq" declares no rank'):
        warmup_inputs(_meta(("x", np.float32, (None, 4)), ("seq", object, None)))
    with pytest.raises(WarmupImpossible, match="more than the"):
        warmup_inputs(_meta(("x", np.float32, (MAX_WARMUP_ELEMENTS + 1,))))


def test_tries_are_zeros_ones_and_wide_only_when_some_dim_after_the_batch_is_dynamic() -> None:
    assert [t.label for t in warmup_tries(_meta(("x", np.float32, (None, 4))))] == [
        "zeros, batch 1", "ones, batch 1"]
    labels = [t.label for t in warmup_tries(_meta(("x", np.float32, (None, 1, None, None))))]
    assert labels == ["zeros, batch 1", "ones, batch 1",
                      f"ones, batch 1, dynamic dimensions {WIDE_DYNAMIC_DIM}"]
    # Too wide to make: the narrow tries only.
    big = _meta(("x", np.float32, (None,) * 6))
    assert len(warmup_tries(big)) == 2


# ------------------------------------------------------------------ the warm-up run


class Fake(Backend):
    """Answers or raises as ``rule(inputs)`` decides; counts calls."""

    def __init__(self, meta: ModelMetadata, rule: Callable[[Tensors], None]) -> None:
        self.meta = meta
        self.rule = rule
        self.calls = 0

    def load(self, path: Path) -> None:
        pass

    def predict(self, inputs: Tensors, output_names: Sequence[str] | None = None) -> Tensors:
        self.calls += 1
        self.rule(inputs)
        return {"y": np.zeros(1, np.float32)}

    def unload(self) -> None:
        pass

    def metadata(self) -> ModelMetadata:
        return self.meta


META = _meta(("x", np.float32, (None, 4)))


def test_a_model_that_answers_passes_on_the_first_try_and_is_timed() -> None:
    fake = Fake(META, lambda _: None)
    result = run_warmup(fake, META, timed_runs=3)
    assert result.status is WarmupStatus.PASSED and result.tried == ("zeros, batch 1",)
    assert result.latency_s is not None and result.latency_s >= 0
    assert fake.calls == 4


def test_a_model_that_fails_on_zeros_only_passes_with_ones() -> None:
    def rule(inputs: Tensors) -> None:
        if not inputs["x"].any():
            raise ModelError("Model failed: division by zero")

    result = run_warmup(Fake(META, rule), META)
    assert result.status is WarmupStatus.PASSED and result.detail == "ones, batch 1"


def test_a_model_that_fails_every_try_fails_with_the_first_error() -> None:
    errors = iter([ModelError("Model failed: first"), ValidationError("Model rejected: second")])

    def rule(inputs: Tensors) -> None:
        raise next(errors)

    result = run_warmup(Fake(META, rule), META)
    assert result.status is WarmupStatus.FAILED
    assert result.detail == "Model failed: first"
    assert result.tried == ("zeros, batch 1", "ones, batch 1")
    assert result.failure() == ("its warm-up inference on inputs made from its signature failed "
                                "(zeros, batch 1; ones, batch 1): Model failed: first")


def test_any_exception_of_predict_counts_and_is_named() -> None:
    def rule(inputs: Tensors) -> None:
        raise TypeError("bad backend")

    result = run_warmup(Fake(META, rule), META)
    assert result.status is WarmupStatus.FAILED and result.detail == "TypeError: bad backend"


def test_answering_once_then_failing_on_the_same_input_is_a_failure() -> None:
    calls = iter(range(100))

    def rule(inputs: Tensors) -> None:
        if next(calls) == 2:
            raise ModelError("Model failed: flaky")

    result = run_warmup(Fake(META, rule), META)
    assert result.status is WarmupStatus.FAILED and result.detail == "Model failed: flaky"


def test_a_signature_without_inputs_to_make_skips_the_warm_up_without_calling_predict() -> None:
    meta = _meta(("seq", object, None))
    fake = Fake(meta, lambda _: None)
    result = run_warmup(fake, meta)
    assert result.status is WarmupStatus.SKIPPED and "declares no rank" in result.detail
    assert fake.calls == 0


@pytest.mark.parametrize(("build", "status", "detail"), [
    (add_3_model, WarmupStatus.PASSED, "zeros, batch 1"),
    (int_divide_model, WarmupStatus.PASSED, "ones, batch 1"),  # integer division by zero
    (conv3x3_model, WarmupStatus.PASSED, f"dynamic dimensions {WIDE_DYNAMIC_DIM}"),
    (fails_every_inference_model, WarmupStatus.FAILED, "cannot be reshaped"),
    (reshape_to_3_model, WarmupStatus.FAILED, "cannot be reshaped"),  # fails at N == 1
])
def test_real_onnx_models(tmp_path: Path, build: Callable[[Path], Path],
                          status: WarmupStatus, detail: str) -> None:
    backend = OnnxBackend()
    backend.load(build(tmp_path / "m.onnx"))
    result = run_warmup(backend, backend.metadata())
    assert result.status is status and detail in result.detail, result


# ------------------------------------------------------------------ the slot's states


def _loaded() -> LoadedModel:
    return LoadedModel(Fake(META, lambda _: None), META, "0" * 64, inline=False, warmup_s=None)


def test_slot_is_ready_only_after_the_warm_up() -> None:
    slot = ModelSlot("m", "file:///m.onnx")
    assert slot.phase is Phase.LOADING and not slot.failed
    with pytest.raises(NotReady, match="still loading"):
        slot.get()
    slot.warming_up()
    with pytest.raises(NotReady, match="warming up"):
        slot.get()
    assert slot.model is None
    model = _loaded()
    slot.publish(model)
    assert slot.phase is Phase.READY and slot.get() is model and slot.reason == ""
    assert slot.unload() is model and slot.model is None
    with pytest.raises(NotReady, match="shutting down"):
        slot.get()
    assert slot.unload() is None  # twice is fine


@pytest.mark.parametrize("warmed", [False, True])
def test_a_failed_slot_stays_failed_with_the_marker(warmed: bool) -> None:
    slot = ModelSlot("m", "file:///m.onnx")
    if warmed:
        slot.warming_up()
    reason = slot.fail("its warm-up inference failed: boom")
    assert reason == 'Model "m" failed to load from file:///m.onnx: its warm-up inference ' \
                     "failed: boom"
    assert slot.failed and slot.phase is Phase.FAILED
    with pytest.raises(NotReady) as info:
        slot.get()
    assert info.value.message == reason and info.value.status == 503
    for illegal in (lambda: slot.publish(_loaded()), slot.warming_up,
                    lambda: slot.fail("again")):
        with pytest.raises(SlotStateError):
            illegal()
    assert slot.model is None and slot.reason == reason


def test_a_model_cannot_be_published_without_warming_up() -> None:
    slot = ModelSlot("m", "file:///m.onnx")
    with pytest.raises(SlotStateError, match="from Loading to Ready"):
        slot.publish(_loaded())


def test_the_marker_is_the_one_the_local_supervisor_and_handlers_use() -> None:
    assert LOAD_FAILED_MARKER == LOAD_FAILED == handlers.LOAD_FAILED


def test_the_model_server_readiness_probe_is_the_route_that_reads_the_slot() -> None:
    # The render test pins the Deployment's probe to this path; the integration
    # test (test_readiness) shows the path stays unready for a failing warm-up.
    assert MODEL_SERVER_READY_PATH == "/v2/health/ready"


def _sample(name: str, labels: dict[str, str]) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def test_load_into_fails_a_model_that_fails_every_inference(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = fails_every_inference_model(tmp_path / "bad.onnx")
    settings = ModelServerSettings(model_uri=f"file://{model}", model_name="bad-unit",
                                   model_cache_dir=str(tmp_path / "cache"))
    labels = {"endpoint": "e", "variant": "v", "model": "bad-unit"}
    metrics = ModelServerMetrics("e", "v", "bad-unit")
    slot = ModelSlot("bad-unit", settings.model_uri)
    with caplog.at_level(logging.INFO, logger="kubeinfer.server"):
        load_into(slot, settings, metrics)
    assert slot.failed and slot.model is None
    assert slot.reason.startswith(f'Model "bad-unit" failed to load from file://{model}: its '
                                  "warm-up inference on inputs made from its signature failed "
                                  "(zeros, batch 1; ones, batch 1): Model failed: ")
    assert "cannot be reshaped" in slot.reason and slot.reason.endswith("keeps serving")
    assert [r.getMessage() for r in caplog.records] == [slot.reason]  # logged once
    assert _sample("kubeinfer_model_loaded", labels) in (None, 0.0)
    assert _sample("kubeinfer_model_load_failures_total", {**labels, "stage": "warmup"}) == 1.0


def test_load_into_serves_a_model_that_answers(tmp_path: Path, models_dir: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gc, "freeze", lambda: None)  # not in the test process
    settings = ModelServerSettings(model_uri=f"file://{models_dir / 'iris.onnx'}",
                                   model_name="good-unit",
                                   model_cache_dir=str(tmp_path / "cache"))
    slot = ModelSlot("good-unit", settings.model_uri)
    load_into(slot, settings, ModelServerMetrics("e", "v", "good-unit"))
    assert slot.phase is Phase.READY
    assert slot.get().warmup_s is not None
