"""The onnxruntime backend against onnxruntime used directly, and its error mapping."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from kubeinfer_runtime.contract import ModelFormat
from kubeinfer_runtime.errors import ModelError, ValidationError
from kubeinfer_runtime.models.base import ModelLoadError
from kubeinfer_runtime.models.onnx import OnnxBackend
from kubeinfer_runtime.models.registry import create_backend
from kubeinfer_runtime.models.warmup import WarmupStatus, run_warmup, warmup_inputs
from kubeinfer_runtime.server.state import choose_inline
from tests.support.onnx_models import reshape_to_3_model


@pytest.fixture(scope="module")
def iris(models_dir: Path) -> OnnxBackend:
    b = OnnxBackend(intra_op_threads=1)
    b.load(models_dir / "iris.onnx")
    return b


def test_metadata_of_the_sklearn_model(iris: OnnxBackend) -> None:
    meta = iris.metadata()
    assert meta.platform == "onnxruntime_onnx"
    (x,) = meta.inputs
    assert (x.name, x.dtype, x.shape) == ("X", np.dtype(np.float32), (None, 4))
    assert x.v2() == {"name": "X", "datatype": "FP32", "shape": [-1, 4]}
    assert x.describe() == "[N, 4] float32"
    assert [o.name for o in meta.outputs] == ["label", "probabilities"]
    label = meta.output("label")
    assert label is not None and label.dtype == np.int64


def test_predictions_match_onnxruntime_in_process(iris: OnnxBackend, models_dir: Path) -> None:
    x = np.random.default_rng(3).normal(5, 1, size=(16, 4)).astype(np.float32)
    ref = ort.InferenceSession(str(models_dir / "iris.onnx"),
                               providers=["CPUExecutionProvider"]).run(None, {"X": x})
    got = iris.predict({"X": x})
    assert list(got) == ["label", "probabilities"]
    np.testing.assert_array_equal(got["label"], ref[0])
    np.testing.assert_allclose(got["probabilities"], ref[1], rtol=1e-6)


def test_requested_outputs_only(iris: OnnxBackend) -> None:
    got = iris.predict({"X": np.ones((2, 4), np.float32)}, ["probabilities"])
    assert list(got) == ["probabilities"] and got["probabilities"].shape == (2, 3)


def test_mlp_matches_onnxruntime(models_dir: Path) -> None:
    b = create_backend(ModelFormat.ONNX, intra_op_threads=2)
    b.load(models_dir / "mlp.onnx")
    x = np.random.default_rng(0).standard_normal((3, 256)).astype(np.float32)
    ref = ort.InferenceSession(str(models_dir / "mlp.onnx")).run(None, {"input": x})[0]
    np.testing.assert_allclose(b.predict({"input": x})["logits"], ref, rtol=1e-5, atol=1e-6)
    b.unload()
    with pytest.raises(ModelError, match="not loaded"):
        b.predict({"input": x})


def test_wrong_input_type_is_a_validation_error(iris: OnnxBackend) -> None:
    with pytest.raises(ValidationError, match="Model rejected the input") as e:
        iris.predict({"X": np.ones((1, 4), np.float64)})
    assert "[ONNXRuntimeError]" not in e.value.message


def test_wrong_width_is_a_validation_error(models_dir: Path) -> None:
    b = OnnxBackend()
    b.load(models_dir / "mlp.onnx")
    with pytest.raises(ValidationError, match="Expected: 256"):
        b.predict({"input": np.ones((1, 3), np.float32)})


def test_failure_inside_the_model_is_a_model_error(tmp_path: Path) -> None:
    b = OnnxBackend()
    b.load(reshape_to_3_model(tmp_path / "r.onnx"))
    assert b.predict({"x": np.ones(3, np.float32)})["y"].tolist() == [1, 1, 1]
    with pytest.raises(ModelError, match="cannot be reshaped") as e:
        b.predict({"x": np.ones(4, np.float32)})
    assert e.value.status == 424 and e.value.code == "ModelError"


def test_corrupt_and_missing_files_raise_model_load_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf")
    for path in (bad, tmp_path / "missing.onnx"):
        with pytest.raises(ModelLoadError) as e:
            OnnxBackend().load(path)
        assert str(e.value) and "[ONNXRuntimeError]" not in str(e.value)


def test_metadata_before_load_is_an_error() -> None:
    with pytest.raises(ModelError):
        OnnxBackend().metadata()


def test_warm_up_measures_and_choose_inline(iris: OnnxBackend) -> None:
    sample = warmup_inputs(iris.metadata())
    assert sample["X"].shape == (1, 4)
    warm = run_warmup(iris, iris.metadata())
    assert warm.status is WarmupStatus.PASSED
    assert warm.latency_s is not None and warm.latency_s > 0
    assert choose_inline("inline", None) is True
    assert choose_inline("thread", 1e-6) is False
    assert choose_inline("auto", 1e-5) is True
    assert choose_inline("auto", 0.01) is False
    assert choose_inline("auto", None) is False
