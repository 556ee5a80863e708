"""The JSON lane answers exactly as the general path does, or steps aside.

For every body, the lane's response must be byte-identical to
``invocations_work`` (decode -> predict -> encode) on the same model, and for
anything outside its one shape of request it must return None so the general
path answers (and explains errors). Real ONNX models from ``models_dir``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pytest

from kubeinfer_runtime import codec
from kubeinfer_runtime.errors import ValidationError
from kubeinfer_runtime.models.onnx import OnnxBackend
from kubeinfer_runtime.server.hotpath import invocations_work
from kubeinfer_runtime.server.json_lane import JsonLane, build_json_lane
from kubeinfer_runtime.server.state import LoadedModel

JSON = codec.Encoding.JSON


def loaded(path: Path) -> tuple[LoadedModel, JsonLane]:
    backend = OnnxBackend()
    backend.load(path)
    meta = backend.metadata()
    lane = build_json_lane(backend, meta)
    assert lane is not None
    return LoadedModel(backend, meta, "0" * 64, True, None, lane), lane


@pytest.mark.parametrize("body", [
    b'{"instances": [[5.1, 3.5, 1.4, 0.2]]}',
    b"[[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3], [5, 3, 1, 0]]",  # ints too
    b'{"instances": [[1e-3, 2E2, -0.0, 4]], "other": 1}',
])
def test_iris_answers_match_the_general_path(models_dir: Path, body: bytes) -> None:
    model, lane = loaded(models_dir / "iris.onnx")
    done = lane(body)
    assert done is not None
    payload, model_s = done
    assert payload == invocations_work(model, body, "application/json", JSON)[0]
    assert model_s > 0 and set(orjson.loads(payload)["predictions"]) == {"label",
                                                                         "probabilities"}


def test_mlp_answers_match_the_general_path(models_dir: Path) -> None:
    model, lane = loaded(models_dir / "mlp.onnx")
    body = orjson.dumps({"instances": np.random.default_rng(1).standard_normal((2, 256))
                         .tolist()})
    done = lane(body)
    assert done is not None
    assert done[0] == invocations_work(model, body, "application/json", JSON)[0]


@pytest.mark.parametrize("body", [
    b"not json",
    b'{"instances": [[5.1, null, 1.4, 0.2]]}',
    b'{"instances": [["5.1", 3.5, 1.4, 0.2]]}',
    b'{"instances": [[true, false, true, true]]}',
    b'{"instances": [[5.1, 3.5, 1.4]]}',
    b'{"instances": [5.1, 3.5, 1.4, 0.2]}',
    b'{"inputs": {"X": [[5.1, 3.5, 1.4, 0.2]]}}',
    b"{}",
])
def test_anything_else_is_left_to_the_general_path(models_dir: Path, body: bytes) -> None:
    model, lane = loaded(models_dir / "iris.onnx")
    assert lane(body) is None
    # ... which answers it (here, as a 400 that names the problem) or decodes it.
    try:
        invocations_work(model, body, "application/json", JSON)
    except ValidationError as exc:
        assert exc.status == 400 and exc.message


def test_no_lane_for_other_input_layouts(tmp_path: Path) -> None:
    from onnx import TensorProto, helper, save

    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["y"])], "two",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [None, 2]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, [None, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])])
    path = tmp_path / "two.onnx"
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                   ir_version=9), path)
    backend = OnnxBackend()
    backend.load(path)
    assert build_json_lane(backend, backend.metadata()) is None
