"""Tiny ONNX models built with onnx.helper for tests of edge cases (not examples)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def reshape_to_3_model(path: Path) -> Path:
    """Declares input ``x`` float32 [N] and output ``y`` [3]; fails inside (Reshape) unless N == 3.

    The input passes every declared-shape check, so a request with N != 3 is
    a failure of the model itself: the case SageMaker answers with ModelError.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "s"], ["y"])], "reshape3",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
        [numpy_helper.from_array(np.array([3], np.int64), "s")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def _save(graph: object, path: Path) -> Path:
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def fails_every_inference_model(path: Path) -> Path:
    """Iris's signature (``X`` float32 [N, 4]) but a Reshape of X to [5]: 4N is never 5.

    onnxruntime loads it (N is symbolic, so no shape check can refuse it) and
    then every run fails with "cannot be reshaped": a model that loads but
    answers no request.
    """
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Reshape", ["X", "s"], ["y"])], "fails_every_inference",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5])],
        [numpy_helper.from_array(np.array([5], np.int64), "s")],
    )
    return _save(graph, path)


def add_3_model(path: Path) -> Path:
    """``x`` float32 [N] plus a constant [3]: answers N == 1 (broadcast) and N == 3, fails inside
    (ModelError) for any other N, so it passes its warm-up and then fails some requests."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "c"], ["y"])], "add3",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
        [numpy_helper.from_array(np.zeros(3, np.float32), "c")],
    )
    return _save(graph, path)


def int_divide_model(path: Path) -> Path:
    """``a // b`` on int64 [N]: onnxruntime fails on a zero divisor, so zeros fail, ones pass."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Div", ["a", "b"], ["y"])], "intdiv",
        [helper.make_tensor_value_info("a", TensorProto.INT64, ["N"]),
         helper.make_tensor_value_info("b", TensorProto.INT64, ["N"])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, ["N"])],
    )
    return _save(graph, path)


def conv3x3_model(path: Path) -> Path:
    """A 3x3 convolution, no padding, over ``img`` float32 [N, 1, H, W]: fails for H or W < 3."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Conv", ["img", "w"], ["y"], kernel_shape=[3, 3])], "conv3x3",
        [helper.make_tensor_value_info("img", TensorProto.FLOAT, ["N", 1, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, None, None])],
        [numpy_helper.from_array(np.ones((1, 1, 3, 3), np.float32), "w")],
    )
    return _save(graph, path)


def row_sum_model(path: Path, width: int = 2) -> Path:
    """``X`` float32 [N, width] -> ``Y`` [N, 1], the sum of each row: outputs anyone can
    check by eye (``1,2`` -> ``3.0``), for golden files of batch jobs."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "w"], ["Y"])], "row_sum",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 1])],
        [numpy_helper.from_array(np.ones((width, 1), np.float32), "w")],
    )
    return _save(graph, path)


def mixed_inputs_model(path: Path) -> Path:
    """Three inputs of three kinds: ``a`` int64 [N, 2], ``b`` float32 [N, 2], ``c`` bool [N];
    outputs ``y`` = float(a) + b (float32 [N, 2]) and ``z`` = not c (bool [N])."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Cast", ["a"], ["af"], to=TensorProto.FLOAT),
         helper.make_node("Add", ["af", "b"], ["y"]),
         helper.make_node("Not", ["c"], ["z"])], "mixed",
        [helper.make_tensor_value_info("a", TensorProto.INT64, ["N", 2]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 2]),
         helper.make_tensor_value_info("c", TensorProto.BOOL, ["N"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2]),
         helper.make_tensor_value_info("z", TensorProto.BOOL, ["N"])],
    )
    return _save(graph, path)


def identity_model(path: Path) -> Path:
    """``x`` float32 [N] -> ``y`` = x: answers every request (add_3_model's healthy twin)."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N"])],
    )
    return _save(graph, path)


def identity_of(path: Path, dtype: str) -> Path:
    """``x`` ``dtype`` [N, 3] -> ``y`` = x: one input of any numeric dtype (numpy's name)."""
    import numpy as np
    from onnx import helper

    kind = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "identity_of",
        [helper.make_tensor_value_info("x", kind, ["N", 3])],
        [helper.make_tensor_value_info("y", kind, ["N", 3])],
    )
    return _save(graph, path)


def label_model(path: Path, flip_percent: float = 0.0) -> Path:
    """``x`` float32 [N] (whole numbers i >= 0) -> ``y`` int64 [N] class labels ``i % 3``,
    except ``(i + 1) % 3`` where ``i % 100 < flip_percent``: over any 100 consecutive
    ``i`` exactly ``flip_percent`` % of the labels differ from the unflipped model's."""
    from onnx import TensorProto, helper

    def const(name: str, value: float) -> Any:
        return helper.make_node("Constant", [], [name], value=helper.make_tensor(
            name, TensorProto.FLOAT, [], [value]))

    graph = helper.make_graph(
        [const("hundred", 100.0), const("three", 3.0), const("p", float(flip_percent)),
         helper.make_node("Mod", ["x", "hundred"], ["m100"], fmod=1),
         helper.make_node("Less", ["m100", "p"], ["flip_b"]),
         helper.make_node("Cast", ["flip_b"], ["flip"], to=TensorProto.FLOAT),
         helper.make_node("Add", ["x", "flip"], ["shifted"]),
         helper.make_node("Mod", ["shifted", "three"], ["label_f"], fmod=1),
         helper.make_node("Cast", ["label_f"], ["y"], to=TensorProto.INT64)],
        "labels",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N"])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, ["N"])],
    )
    return _save(graph, path)


def scale_sum_model(path: Path, factor: float) -> Path:
    """``X`` float32 [N, 2] -> ``Y`` [N, 1] = factor * (x0 + x1): versions of a model that
    answer differently, so a caller can tell which one served it."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "w"], ["Y"])], "scale_sum",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 1])],
        [numpy_helper.from_array(np.full((2, 1), factor, np.float32), "w")],
    )
    return _save(graph, path)
