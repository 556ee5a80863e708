"""The V2 lane decodes exactly as the general decoder does, or steps aside.

For every request, ``v2_work`` with the model's lane (what the inline HTTP
path runs) must answer byte for byte as without it (the general decoder, what
the ASGI path runs): the same body and headers, or the same error. Requests
are generated (hypothesis): valid ones of every input kind, JSON and binary
tensors, and near misses (other datatypes, shapes to promote, floats and bools
in shapes, nulls and strings in data, counts that do not add up, binary sizes
off by one, duplicate and unknown inputs, requested outputs, ids of every JSON
type). The lane keeps the last layout it saw as a template, and the model
(with its lane) lives for the whole module, so examples also run against
templates learned from earlier ones; the template tests aim bodies at them
on purpose: the same bytes around another value, including values that would
change the document's structure. Real ONNX models (iris, the mlp, a model of
int64, float32 and bool inputs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubeinfer_runtime import codec
from kubeinfer_runtime.codec_encode import dumps
from kubeinfer_runtime.codec_v2_binary import tensor_bytes
from kubeinfer_runtime.codec_v2_fast import V2Lane, build_v2_lane
from kubeinfer_runtime.errors import RuntimeServiceError
from kubeinfer_runtime.models.base import v2_datatype
from kubeinfer_runtime.models.onnx import OnnxBackend
from kubeinfer_runtime.server.state import LoadedModel
from kubeinfer_runtime.server.work import v2_work
from tests.support.onnx_models import identity_of, mixed_inputs_model
from tests.support.v2_requests import requests

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
LIMITS = codec.DecodeLimits.for_settings(64 * 1024, None)
_PROPERTY = settings(max_examples=250, deadline=None, database=None,
                     suppress_health_check=[HealthCheck.too_slow,
                                            HealthCheck.function_scoped_fixture])


def _load(path: Path) -> LoadedModel:
    backend = OnnxBackend()
    backend.load(path)
    meta = backend.metadata()
    lane = build_v2_lane(meta, LIMITS)
    assert lane is not None
    return LoadedModel(backend, meta, "0" * 64, True, None, None, lane)


@pytest.fixture(scope="module")
def models(models_dir: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> dict[str, LoadedModel]:
    mixed = mixed_inputs_model(tmp_path_factory.mktemp("v2-lane") / "mixed.onnx")
    return {"iris": _load(models_dir / "iris.onnx"), "mlp": _load(models_dir / "mlp.onnx"),
            "mixed": _load(mixed)}


def outcome(model: LoadedModel, body: bytes, header_length: int | None,
            lane: bool) -> tuple[Any, ...]:
    """What a client gets: (200, body, headers) or (status, message)."""
    try:
        payload, _, headers = v2_work(model, body, "m", LIMITS, header_length, lane)
    except RuntimeServiceError as exc:
        return exc.status, exc.message
    return 200, payload, headers


def same(model: LoadedModel, body: bytes, header_length: int | None = None) -> tuple[Any, ...]:
    general = outcome(model, body, header_length, lane=False)
    assert outcome(model, body, header_length, lane=True) == general
    assert general[0] != 500
    return general


@pytest.mark.parametrize("name", ["iris", "mlp", "mixed"])
def test_the_lane_answers_every_request_as_the_general_decoder(
        models: dict[str, LoadedModel], name: str) -> None:
    model = models[name]
    lane = model.v2_lane
    assert lane is not None
    taken = [0, 0]

    # Derandomized: how many drawn requests are clean enough for the lane depends on
    # the draw, and the share is checked below; which ones it takes must not vary.
    @settings(_PROPERTY, derandomize=True)
    @given(request=requests(model.meta))
    def check(request: tuple[bytes, int | None]) -> None:
        same(model, *request)
        taken[0] += lane(*request) is not None
        taken[1] += 1

    check()
    # Half the generated requests are clean: the lane must decode a good share of them
    # itself, or this test would pass with a lane that steps aside every time.
    # (test_the_lane_takes_the_common_requests_and_learns_their_layout checks the
    # common shapes one by one.)
    assert taken[0] >= taken[1] // 20, taken


@pytest.mark.parametrize("name", ["iris", "mixed"])
def test_requests_in_a_learned_layout_with_other_data(models: dict[str, LoadedModel],
                                                     name: str) -> None:
    """A template learned from one request, then the same layout with drawn data."""
    model = models[name]

    @_PROPERTY
    @given(first=requests(model.meta), data=st.data())
    def check(first: tuple[bytes, int | None], data: st.DataObject) -> None:
        same(model, *first)
        for _ in range(3):
            same(model, *data.draw(_relayout(first)))

    check()


@st.composite
def _relayout(draw: st.DrawFn, request: tuple[bytes, int | None]) -> tuple[bytes, int | None]:
    """``request`` with its last ``"data"`` value (or its binary bytes) replaced."""
    body, header_length = request
    if header_length is not None:
        tail = body[header_length:] if 0 <= header_length <= len(body) else b""
        new = bytes(draw(st.binary(min_size=len(tail), max_size=len(tail)))) if draw(
            st.booleans()) else draw(st.binary(max_size=len(tail) + 2))
        return body[:len(body) - len(tail)] + new, header_length
    key = body.rfind(b'"data"')
    if key < 0:
        return request
    start = body.index(b":", key) + 1
    close = body.find(b"]}", start)
    end = close + 1 if close >= 0 else len(body)
    middle = draw(_middles(body[start:end]))
    return body[:start] + middle + body[end:], None


def _middles(original: bytes) -> st.SearchStrategy[bytes]:
    """Values to put where ``data`` was: others of its shape, and ones that are not values."""
    try:
        shape = np.array(orjson.loads(original), dtype=np.float64).shape
    except Exception:
        shape = (1,)
    size = int(np.prod(shape))
    same_kind = st.lists(st.floats(-10, 10, allow_nan=False, width=32), min_size=size,
                         max_size=size).map(
        lambda v: orjson.dumps(np.array(v).reshape(shape).tolist()))
    tricky = st.sampled_from([
        original + b'},{"name":"X","shape":[1,4],"datatype":"FP32","data":' + original,
        original + b'}],"outputs":[{"name":"label"}],"x":{"y":' + original,
        original + b"]", b"[" + original, b" " + original + b"\n", b"null", b'"x"', b"[]",
        original.replace(b",", b", "), original.replace(b"1", b"true", 1),
        original.replace(b"]", b",1]", 1), original + b",1", b"1e400", b"[1e400]",
        b"[" * 70 + b"1" + b"]" * 70, original.replace(b"[", b"[[", 1) + b"]",
    ])
    junk = st.text(alphabet='[]{},:"0123456789.e-truefalsn ', max_size=40).map(str.encode)
    return st.one_of(same_kind, same_kind, tricky, junk)


def test_the_lane_takes_the_common_requests_and_learns_their_layout(
        models: dict[str, LoadedModel]) -> None:
    """Not a fallback in disguise: the lane itself decodes these (and then from templates)."""
    model = models["iris"]
    lane = model.v2_lane
    assert lane is not None
    rows = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]
    for i in range(3):
        body = orjson.dumps({"inputs": [{"name": "X", "shape": [2, 4], "datatype": "FP32",
                                         "data": [[v + i for v in r] for r in rows]}]})
        req = lane(body, None)
        assert req is not None and req.inputs["X"].dtype == np.float32
        assert req == codec.decode_v2(body, model.meta)._replace(inputs=req.inputs)
        np.testing.assert_array_equal(req.inputs["X"],
                                      codec.decode_v2(body, model.meta).inputs["X"])
    assert lane.__self__.json is not None  # type: ignore[attr-defined]
    # tritonclient's default: binary tensors, binary answers asked for every output.
    x = np.array(rows, np.float32)
    head = orjson.dumps({"id": "r", "inputs": [{"name": "X", "shape": [2, 4], "datatype": "FP32",
                        "parameters": {"binary_data_size": x.nbytes}}],
                         "parameters": {"binary_data_output": True}})
    for scale in (1, 2):
        body = head + (x * scale).tobytes()
        req = lane(body, len(head))
        assert req is not None and req.binary_outputs == {"label", "probabilities"}
        np.testing.assert_array_equal(req.inputs["X"], x * scale)
        assert same(model, body, len(head))[0] == 200
    assert lane.__self__.binary is not None  # type: ignore[attr-defined]


@pytest.mark.parametrize("dtype", ["int8", "uint16", "int32", "int64", "float16", "float64",
                                   "bool"])
def test_a_learned_binary_layout_of_one_input_reads_as_the_general_decoder(
        tmp_path: Path, dtype: str) -> None:
    """One input of each numeric dtype, its binary layout learned, then new bytes in it.

    Every dtype but BOOL (whose bytes must be 0 or 1) is read in one step; the
    answers must be the general decoder's, bytes that are not numbers (NaN,
    infinities) and BOOL bytes over 1 included.
    """
    model = _load(identity_of(tmp_path / f"{dtype}.onnx", dtype))
    lane = model.v2_lane
    assert lane is not None
    x = np.arange(6).astype(dtype).reshape(2, 3)
    head = orjson.dumps({"inputs": [{"name": "x", "shape": [2, 3],
                                     "datatype": v2_datatype(x.dtype),
                                     "parameters": {"binary_data_size": x.nbytes}}],
                         "parameters": {"binary_data_output": True}})
    assert same(model, head + x.tobytes(), len(head))[0] == 200
    learned = lane.__self__.binary  # type: ignore[attr-defined]
    assert learned is not None and (learned.one is None) == (dtype == "bool")
    rng = np.random.default_rng(0)
    for _ in range(30):
        raw = rng.integers(0, 256, x.nbytes, dtype=np.uint8).tobytes()
        if dtype == "bool" and _ % 2:
            raw = bytes(b & 1 for b in raw)
        assert lane(head + raw, len(head)) is not None or dtype == "bool"
        answer = same(model, head + raw, len(head))
        if answer[0] == 200:
            # The answer's bytes are the request's (an identity model), after its header.
            assert answer[1].endswith(raw)
    for wrong in (head + x.tobytes()[:-1], head + x.tobytes() + b"\0"):
        assert lane(wrong, len(head)) is None
        assert same(model, wrong, len(head))[0] == 400


@pytest.mark.parametrize("body", [
    b'{"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}',
    b'{"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}],'
    b' "inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32", "data": [5, 6, 7, 8]}]}',
    b'{"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4],'
    b' "data": [5, 6, 7, 8]}]}',
    b'{"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32", "d\\u0061ta": [1, 2, 3, 4]}]}',
    b'{"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4],'
    b' "x": "\\"data\\": [9]"}]}',
])
def test_duplicate_and_escaped_keys(models: dict[str, LoadedModel], body: bytes) -> None:
    model = models["iris"]
    for _ in range(2):  # the second time, against whatever the first one taught the lane
        same(model, body)
        same(model, body.replace(b"1, 2", b"2, 1"))


# ------------------------------------------------------------------ the V2 encoder


def _reference_encode_v2(outputs: dict[str, np.ndarray], model_name: str,
                         model_version: str | None, request_id: str | None) -> bytes:
    """The V2 answer as a document (how encode_v2 wrote it before it was written in pieces)."""
    doc: dict[str, Any] = {"model_name": model_name}
    if model_version is not None:
        doc["model_version"] = model_version
    if request_id is not None:
        doc["id"] = request_id
    doc["outputs"] = [{"name": name, "shape": list(arr.shape),
                       "datatype": v2_datatype(arr.dtype), "data": arr.reshape(-1)}
                      for name, arr in outputs.items()]
    return dumps(doc)


def _reference_encode_v2_binary(outputs: dict[str, np.ndarray], model_name: str,
                                model_version: str | None, request_id: str | None,
                                binary: frozenset[str]) -> tuple[bytes, int]:
    """The binary answer as a document, as encode_v2_binary wrote it before."""
    doc: dict[str, Any] = {"model_name": model_name}
    if model_version is not None:
        doc["model_version"] = model_version
    if request_id is not None:
        doc["id"] = request_id
    items: list[dict[str, Any]] = []
    raws: list[bytes] = []
    for name, arr in outputs.items():
        item: dict[str, Any] = {"name": name, "shape": list(arr.shape),
                                "datatype": v2_datatype(arr.dtype)}
        if name in binary:
            raw = (tensor_bytes(arr) if arr.dtype.kind in "OUS"
                   else np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes())
            raws.append(raw)
            item["parameters"] = {"binary_data_size": len(raw)}
        else:
            item["data"] = arr.reshape(-1)
        items.append(item)
    doc["outputs"] = items
    header = dumps(doc)
    return b"".join([header, *raws]), len(header)


_DTYPES = [np.float32, np.float64, np.float16, np.int64, np.int32, np.uint8, np.bool_]


@st.composite
def _outputs(draw: st.DrawFn) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for name in draw(st.lists(st.text(max_size=6), max_size=3, unique=True)):
        shape = tuple(draw(st.lists(st.integers(0, 3), max_size=3)))
        if draw(st.integers(0, 5)) == 0:
            arr = np.array(draw(st.lists(st.text(max_size=3), min_size=int(np.prod(shape)),
                                         max_size=int(np.prod(shape)))), dtype=object)
            out[name] = arr.reshape(shape)
            continue
        dtype = np.dtype(draw(st.sampled_from(_DTYPES)))
        arr = np.arange(int(np.prod(shape)) * 2, dtype=np.float64).reshape(-1)[::2] * 0.37
        arr = arr.astype(dtype).reshape(shape)
        out[name] = arr.T if draw(st.booleans()) else arr  # non-contiguous too
    return out


@settings(max_examples=300, deadline=None, database=None)
@given(outputs=_outputs(), name=st.text(max_size=8), version=st.none() | st.text(max_size=12),
       request_id=st.none() | st.text(max_size=8))
def test_encode_v2_writes_the_document_byte_for_byte(outputs: dict[str, np.ndarray], name: str,
                                                     version: str | None,
                                                     request_id: str | None) -> None:
    assert (codec.encode_v2(outputs, name, version, request_id)
            == _reference_encode_v2(outputs, name, version, request_id))


@settings(max_examples=300, deadline=None, database=None)
@given(outputs=_outputs(), version=st.none() | st.text(max_size=12),
       request_id=st.none() | st.text(max_size=8), data=st.data())
def test_encode_v2_binary_writes_the_document_byte_for_byte(
        outputs: dict[str, np.ndarray], version: str | None, request_id: str | None,
        data: st.DataObject) -> None:
    binary = frozenset(data.draw(st.lists(st.sampled_from(sorted(outputs) or ["-"]))))
    assert (codec.encode_v2_binary(outputs, "m", version, request_id, binary)
            == _reference_encode_v2_binary(outputs, "m", version, request_id, binary))
    # Again with other values of the same names, shapes and dtypes: the header may now
    # come from the cache of headers; the answer must not.
    other = {name: _other_values(arr) for name, arr in outputs.items()}
    assert (codec.encode_v2_binary(other, "m", version, request_id, binary)
            == _reference_encode_v2_binary(other, "m", version, request_id, binary))


def _other_values(arr: np.ndarray) -> np.ndarray:
    if arr.dtype.kind == "b":
        return np.logical_not(arr)
    if arr.dtype.kind in "iuf":
        with np.errstate(all="ignore"):  # integers wrap: still other values
            return np.asarray(arr + 1, dtype=arr.dtype).reshape(arr.shape)
    return arr


def test_a_cached_binary_header_is_only_reused_for_the_same_layout() -> None:
    probabilities = np.array([[0.1, 0.2, 0.7]], np.float32)
    label = np.array([2], np.int64)
    layouts = [
        {"label": label, "probabilities": probabilities},
        {"probabilities": probabilities, "label": label},  # another order
        {"label": label, "probabilities": np.repeat(probabilities, 2, 0)},  # batch of 2
        {"label": label.astype(np.int32), "probabilities": probabilities},
        # Same datatypes and shapes in another memory order: the cached header fits,
        # and the bytes must still be in C order.
        {"label": label, "probabilities": np.asfortranarray(np.repeat(probabilities, 2, 0))},
    ]
    for binary in (frozenset({"label", "probabilities"}), frozenset({"label"})):
        for _ in range(2):  # the second pass reads what the first one cached
            for outputs in layouts:
                for version, request_id in ((None, None), ("7", None), (None, "id-1")):
                    assert (codec.encode_v2_binary(outputs, "m", version, request_id, binary)
                            == _reference_encode_v2_binary(outputs, "m", version, request_id,
                                                           binary)), (outputs, binary)
            # A byte-swapped array has no V2 datatype: refused as before anything was
            # cached, though its datatype number and shape match a cached header.
            swapped = {"label": label.astype(">i8"), "probabilities": probabilities}
            with pytest.raises(ValueError, match="no V2 datatype"):
                codec.encode_v2_binary(swapped, "m", None, None, binary)


def test_binary_outputs_are_little_endian_whatever_the_array() -> None:
    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    for arr in (values, values.T, values.astype(">f4"), values.astype(">f4").T):
        assert tensor_bytes(arr) == np.ascontiguousarray(arr, "<f4").tobytes()


def _mlp_with_default_limits(models_dir: Path) -> tuple[LoadedModel, V2Lane]:
    """The MLP with a lane under the default limits: under this module's small ones a
    256-value body is refused by the lane's bound before any cast."""
    backend = OnnxBackend()
    backend.load(models_dir / "mlp.onnx")
    meta = backend.metadata()
    lane = build_v2_lane(meta, codec.DEFAULT_LIMITS)
    assert lane is not None
    return LoadedModel(backend, meta, "0" * 64, True, None, None, lane), lane


def _mlp_body(data: list[Any]) -> bytes:
    return orjson.dumps({"inputs": [{"name": "input", "shape": [1, 256], "datatype": "FP32",
                                     "data": data}]})


def test_a_learned_layout_keeps_the_general_rounding_of_integers(models_dir: Path) -> None:
    # The template path casts straight to FP32 when the data holds a float; integers only
    # take numpy's two steps, which round 2**54 + 2**30 + 1 differently (int64 -> float32
    # once, 2**54 + 2**31) from float64 first (2**54). Both must answer as the general one.
    model, lane = _mlp_with_default_limits(models_dir)
    floats = np.random.default_rng(3).standard_normal(256).tolist()
    assert lane(_mlp_body(floats), None) is not None  # learns the layout
    n = 2**54 + 2**30 + 1
    for data in ([n] * 256, [n] * 255 + [0.5], floats[:128] + [n] * 128,
                 [*floats[:255], None], [*floats[:255], True]):
        same(model, _mlp_body(data))
        assert lane(_mlp_body(data), None) is not None or None in data
    request = lane(_mlp_body([n] * 256), None)
    assert request is not None
    assert int(next(iter(request.inputs.values()))[0, 0]) == 2**54 + 2**31


def test_a_number_in_quotes_is_never_cast_by_a_learned_layout(models_dir: Path) -> None:
    model, lane = _mlp_with_default_limits(models_dir)
    floats = np.random.default_rng(4).standard_normal(256).tolist()
    assert lane(_mlp_body(floats), None) is not None  # learns the layout
    quoted = _mlp_body([*floats[:255], "2.5"])
    assert lane(quoted, None) is None
    status = same(model, quoted)[0]
    assert status == 400
