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
from hypothesis import given, settings
from hypothesis import strategies as st

from kubeinfer_runtime import codec
from kubeinfer_runtime.errors import ValidationError
from kubeinfer_runtime.models.base import TensorSpec
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


def _two_pass(body: bytes, spec: TensorSpec, tail: tuple[int, ...]) -> np.ndarray | None:
    """What the lane did before its one-pass cast: numpy finds the dtype, then casts."""
    try:
        doc = orjson.loads(body)
        value = doc.get("instances") if type(doc) is dict else doc
        arr = np.array(value)
    except (orjson.JSONDecodeError, ValueError, TypeError, RecursionError):
        return None
    if arr.dtype.kind not in "fiu" or arr.shape[1:] != tail or arr.ndim != len(tail) + 1:
        return None
    return arr.astype(spec.dtype)


_NUMBER = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.floats(min_value=-3.5e38, max_value=3.5e38, allow_nan=False),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.integers(min_value=2**53, max_value=2**62),  # where float64 rounds an integer
    st.booleans(), st.none())
_ROWS = st.one_of(st.lists(st.lists(_NUMBER, min_size=4, max_size=4), min_size=1, max_size=40),
                  st.lists(st.lists(_NUMBER, min_size=3, max_size=5), min_size=1, max_size=40))


@settings(max_examples=400, deadline=None)
@given(rows=_ROWS, wrapped=st.booleans(), pad=st.integers(0, 900),
       dtype=st.sampled_from([np.float32, np.float64, np.float16]))
def test_the_one_pass_cast_equals_the_two_pass_one(rows: list[list[object]], wrapped: bool,
                                                  pad: int, dtype: type) -> None:
    # Bodies past small_json_bytes take the one-pass cast when they hold a float and no
    # string or null; its array must equal numpy's two-pass one bit for bit (or both
    # decline), huge integers, booleans, float16 overflow and ragged rows included.
    import warnings

    limits = codec.DecodeLimits(1_000_000)
    doc = {"instances": rows} if wrapped else rows
    body = b"[" + b" " * pad + orjson.dumps(doc)[1:] if not wrapped else \
        b'{"instances":' + b" " * pad + orjson.dumps(rows) + b"}"
    spec = TensorSpec("x", np.dtype(dtype), (None, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # overflow to inf: both alike
        got = codec.fast_float_json(body, spec, (4,), limits)
        want = _two_pass(body, spec, (4,))
    if len(body) > limits.small_json_bytes and (b'"' in body.replace(b'"instances"', b"")):
        want = None  # strings past the small bound are the general path's, both ways
    if want is None:
        assert got is None
    else:
        assert got is not None and got.dtype == want.dtype
        assert got.tobytes() == want.tobytes(), (body[:200], got, want)


def test_the_one_pass_cast_is_taken_for_a_long_float_body() -> None:
    # The case the cast exists for (a 256-float row): a float32 array, no float64 copy.
    body = orjson.dumps({"instances": np.random.default_rng(2).standard_normal((1, 256))
                         .tolist()})
    spec = TensorSpec("input", np.dtype(np.float32), (None, 256))
    assert len(body) > codec.DEFAULT_LIMITS.small_json_bytes
    got = codec.fast_float_json(body, spec, (256,))
    want = _two_pass(body, spec, (256,))
    assert got is not None and want is not None and got.tobytes() == want.tobytes()
    # A null among the floats is not NaN: the general path explains it.
    assert codec.fast_float_json(body.replace(b",", b",null,", 1), spec, (256,)) is None


def test_integers_only_keep_the_two_pass_rounding() -> None:
    # 2**54 + 2**30 + 1: int64 -> float32 rounds up to 2**54 + 2**31; through float64 it
    # rounds to 2**54 + 2**30, a tie, then down to 2**54. Without a float in the body the
    # one-pass cast would answer differently from the general path.
    n = 2**54 + 2**30 + 1
    body = orjson.dumps({"instances": [[n, 0, 0, 0]] * 200})
    spec = TensorSpec("x", np.dtype(np.float32), (None, 4))
    assert len(body) > codec.DEFAULT_LIMITS.small_json_bytes
    got = codec.fast_float_json(body, spec, (4,))
    assert got is not None and int(got[0, 0]) == 2**54 + 2**31
    want = _two_pass(body, spec, (4,))
    assert want is not None and got.tobytes() == want.tobytes()


def test_a_number_in_quotes_is_never_cast() -> None:
    # numpy would parse "2.5" into 2.5 when converting straight to float32: the one-pass
    # cast must not see a string at all (the general path refuses strings for a float
    # input and names them).
    spec = TensorSpec("x", np.dtype(np.float32), (None, 4))
    for row in ([1.5, "2.5", 3.0, 4.0], [1.5, 2.0, 3.0, "4"]):
        body = orjson.dumps({"instances": [row] * 300})
        assert len(body) > codec.DEFAULT_LIMITS.small_json_bytes
        assert codec.fast_float_json(body, spec, (4,)) is None
        plain = orjson.dumps([row] * 300)
        assert codec.fast_float_json(plain, spec, (4,)) is None
