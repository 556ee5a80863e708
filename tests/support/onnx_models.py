"""Tiny ONNX models built with onnx.helper for tests of edge cases (not examples)."""

from __future__ import annotations

from pathlib import Path

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
