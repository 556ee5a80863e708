"""The V2 binary tensor data extension: framing, every size checked, nothing allocated early.

Requests are built by hand (the bytes the spec describes) and by tritonclient's
own request builder, and answers are read back with tritonclient's own parser,
so the framing matches the stock client byte for byte. Every declared size is
checked before anything is read: a body that lies about its sizes is a 400
naming the input, a shape over the decode limit is a 413, and neither
allocates what the body claims.
"""

from __future__ import annotations

import struct
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson
import pytest
import tritonclient.http as triton
from tritonclient.utils import serialize_byte_tensor

from kubeinfer_runtime import codec
from kubeinfer_runtime.codec_v2_binary import (
    binary_outputs,
    parse_header_length,
    tensor_bytes,
)
from kubeinfer_runtime.errors import PayloadTooLarge, RuntimeServiceError, ValidationError
from kubeinfer_runtime.models.base import ModelMetadata, TensorSpec

META = ModelMetadata(
    inputs=(TensorSpec("x", np.dtype(np.float32), (None, 4)),
            TensorSpec("flag", np.dtype(np.bool_), (None,)),
            TensorSpec("s", np.dtype(object), (None,)),
            TensorSpec("n", np.dtype(np.int64), (None, 2))),
    outputs=(TensorSpec("label", np.dtype(np.int64), (None,)),
             TensorSpec("probabilities", np.dtype(np.float32), (None, 3))),
    platform="test")
IRIS = ModelMetadata(inputs=(META.inputs[0],), outputs=META.outputs, platform="test")
X = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]], np.float32)
OUTS = {"label": np.array([0, 2], np.int64),
        "probabilities": np.array([[0.9, 0.05, 0.05], [0.1, 0.2, 0.7]], np.float32)}


def _frame(inputs: list[dict[str, Any]], *raws: bytes, **doc: Any) -> tuple[bytes, int]:
    """(body, header length): a JSON header, then ``raws`` in order."""
    header = orjson.dumps({"inputs": inputs, **doc})
    return header + b"".join(raws), len(header)


def _x_item(size: int | None = None, shape: list[int] | None = None,
            datatype: str = "FP32") -> dict[str, Any]:
    return {"name": "x", "shape": shape or [2, 4], "datatype": datatype,
            "parameters": {"binary_data_size": X.nbytes if size is None else size}}


def _decode(body: bytes, header_length: int | None, meta: ModelMetadata = IRIS,
            limits: codec.DecodeLimits = codec.DEFAULT_LIMITS) -> codec.V2Request:
    return codec.decode_v2(body, meta, limits, header_length)


def _refused(fn: Callable[[], object]) -> tuple[RuntimeServiceError, int]:
    """The error ``fn`` raises and the peak bytes it allocated meanwhile."""
    tracemalloc.start()
    try:
        with pytest.raises(RuntimeServiceError) as info:
            fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return info.value, peak


# ------------------------------------------------------------------ requests


def test_fp32_input_round_trips_from_raw_little_endian_bytes() -> None:
    body, n = _frame([_x_item()], X.astype("<f4").tobytes(), id="r1")
    req = _decode(body, n)
    np.testing.assert_array_equal(req.inputs["x"], X)
    assert req.inputs["x"].flags.writeable and req.inputs["x"].flags.aligned
    assert req.id == "r1" and req.binary_outputs is None


def test_binary_and_json_inputs_mix_and_every_datatype_of_the_model_arrives() -> None:
    flags = np.array([True, False])
    text = np.array(["setosa", "virginica ✓"], dtype=object)
    n = np.array([[1, -2], [3, 4]], np.int64)
    body, length = _frame(
        [_x_item(),
         {"name": "flag", "shape": [2], "datatype": "BOOL", "data": [True, False]},
         {"name": "s", "shape": [2], "datatype": "BYTES",
          "parameters": {"binary_data_size": len(serialize_byte_tensor(text).item())}},
         {"name": "n", "shape": [2, 2], "datatype": "INT64",
          "parameters": {"binary_data_size": 32}}],
        X.tobytes(), serialize_byte_tensor(text).item(), n.astype("<i8").tobytes())
    got = _decode(body, length, META).inputs
    np.testing.assert_array_equal(got["x"], X)
    np.testing.assert_array_equal(got["flag"], flags)
    assert got["s"].tolist() == ["setosa", "virginica ✓"]
    np.testing.assert_array_equal(got["n"], n)


def test_tritonclient_request_bodies_decode() -> None:
    """The stock client's own framing (InferInput.set_data_from_numpy, binary by default)."""
    inputs = [triton.InferInput("x", [2, 4], "FP32"), triton.InferInput("flag", [2], "BOOL"),
              triton.InferInput("s", [2], "BYTES"), triton.InferInput("n", [2, 2], "INT64")]
    inputs[0].set_data_from_numpy(X)
    inputs[1].set_data_from_numpy(np.array([False, True]))
    inputs[2].set_data_from_numpy(np.array([b"a", b"b"], dtype=object))
    inputs[3].set_data_from_numpy(np.arange(4, dtype=np.int64).reshape(2, 2))
    body, length = triton.InferenceServerClient.generate_request_body(
        inputs, outputs=[triton.InferRequestedOutput("probabilities")], request_id="7")
    req = _decode(body, length, META)
    np.testing.assert_array_equal(req.inputs["x"], X)
    assert req.inputs["flag"].tolist() == [False, True]
    assert req.inputs["s"].tolist() == ["a", "b"]
    assert req.output_names == ["probabilities"] and req.binary_outputs == {"probabilities"}
    assert req.id == "7"


def test_fp64_on_the_wire_is_coerced_to_the_model_dtype() -> None:
    body, n = _frame([_x_item(64, datatype="FP64")], X.astype("<f8").tobytes())
    got = _decode(body, n).inputs["x"]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, X)


@pytest.mark.parametrize(("make", "fragment"), [
    # The header length larger than the body.
    (lambda: (b'{"inputs": []}', 99), "Inference-Header-Content-Length 99 is larger than"),
    # A truncated body: fewer bytes than binary_data_size.
    (lambda: _frame([_x_item()], X.tobytes()[:20]),
     'V2 input "x" declares binary_data_size 32 but only 20 bytes'),
    # Bytes no input claims.
    (lambda: _frame([_x_item()], X.tobytes() + b"\0" * 8),
     "holds 40 bytes after the JSON header but the inputs' binary_data_size add up to 32"),
    # binary_data_size that does not match shape x datatype.
    (lambda: _frame([_x_item(16, shape=[2, 4])], X.tobytes()[:16]),
     r'V2 input "x" has binary_data_size 16 but shape \[2, 4\] of FP32 needs 32 bytes'),
    (lambda: _frame([_x_item(-1)], b""), "is not a byte count"),
    (lambda: _frame([_x_item("32")], X.tobytes()), "is not a byte count"),  # type: ignore[arg-type]
    (lambda: _frame([{**_x_item(), "data": X.ravel().tolist()}], X.tobytes()),
     'has both "data" and parameters.binary_data_size'),
    (lambda: (b"not json" + X.tobytes(), 8), "not valid JSON"),
])
def test_framing_lies_are_400s_naming_the_input(make: Callable[[], tuple[bytes, int]],
                                                fragment: str) -> None:
    body, length = make()
    with pytest.raises(ValidationError, match=fragment) as info:
        _decode(body, length)
    assert info.value.status == 400


def test_binary_input_without_the_header_says_to_send_it() -> None:
    body, _ = _frame([_x_item()], X.tobytes())
    with pytest.raises(ValidationError) as info:
        _decode(body, None)
    # The body is not JSON as a whole: the message says what a binary body needs.
    assert "Inference-Header-Content-Length" in info.value.message
    header, _ = _frame([_x_item()])
    with pytest.raises(ValidationError, match=r"binary data extension .* no "
                                              r"Inference-Header-Content-Length header"):
        _decode(header, None)


@pytest.mark.parametrize(("raw", "fragment"), [
    (struct.pack("<I", 2) + b"ab" + struct.pack("<I", 9) + b"cd",
     "BYTES element 1 declares 9 bytes but only 2 are left"),
    (b"\x01\x00", "too small for 2 BYTES elements"),
    (struct.pack("<I", 5) + b"abcde" + b"\x01\x00", "ends inside BYTES element 1's length"),
    (struct.pack("<I", 2) + b"\xff\xfe" + struct.pack("<I", 0), "BYTES element 0 is not UTF-8"),
    (struct.pack("<I", 1) + b"a" + struct.pack("<I", 1) + b"b" + b"SECRET",
     "has 6 bytes of binary data after its 2 BYTES elements"),
])
def test_bytes_tensors_are_checked_element_by_element(raw: bytes, fragment: str) -> None:
    meta = ModelMetadata((TensorSpec("s", np.dtype(object), (None,)),), (), "test")
    body, n = _frame([{"name": "s", "shape": [2], "datatype": "BYTES",
                       "parameters": {"binary_data_size": len(raw)}}], raw)
    with pytest.raises(ValidationError, match=fragment) as info:
        _decode(body, n, meta)
    assert "SECRET" not in info.value.message  # the body's bytes are never quoted


def test_bool_bytes_other_than_0_and_1_are_refused() -> None:
    meta = ModelMetadata((TensorSpec("flag", np.dtype(np.bool_), (None,)),), (), "test")
    body, n = _frame([{"name": "flag", "shape": [3], "datatype": "BOOL",
                       "parameters": {"binary_data_size": 3}}], b"\x01\x00\x07")
    with pytest.raises(ValidationError, match="BOOL bytes other than 0 and 1"):
        _decode(body, n, meta)


def test_a_shape_over_the_limit_is_413_before_any_byte_is_read() -> None:
    huge = [10**9, 4]  # 4e9 values: 16 GB of FP32 claimed by a 100-byte body
    body, n = _frame([_x_item(16, shape=huge)], X.tobytes()[:16])
    err, peak = _refused(lambda: _decode(body, n))
    assert isinstance(err, PayloadTooLarge) and err.status == 413
    assert "KUBEINFER_MAX_DECODED_BYTES" in err.message
    assert peak < 1 << 20


def test_a_declared_size_past_the_body_is_refused_without_allocating_it() -> None:
    body, n = _frame([_x_item(10**15, shape=[2, 4])], X.tobytes())
    t0 = time.perf_counter()
    err, peak = _refused(lambda: _decode(body, n))
    assert err.status == 400 and "declares binary_data_size 1000000000000000" in err.message
    assert peak < 1 << 20 and time.perf_counter() - t0 < 1.0


def test_binary_values_count_against_the_limit_like_json_values() -> None:
    limits = codec.DecodeLimits(max_decoded_bytes=63)  # 8 values x 8 bytes is over it
    body, n = _frame([_x_item()], X.tobytes())
    with pytest.raises(PayloadTooLarge):
        _decode(body, n, limits=limits)


@pytest.mark.parametrize("value", [b"", b"-1", b"1e3", b"12a", b"9" * 19])
def test_header_values_that_are_not_byte_counts(value: bytes) -> None:
    with pytest.raises(ValidationError, match="Inference-Header-Content-Length is not a byte "
                                              "count"):
        parse_header_length(value)
    assert parse_header_length(b" 42 ") == 42


# ------------------------------------------------------------------ which outputs are binary


@pytest.mark.parametrize(("doc", "outputs", "expected"), [
    ({}, None, None),
    ({"parameters": {"binary_data_output": True}}, None, {"label", "probabilities"}),
    ({"parameters": {"binary_data_output": False}}, None, None),
    ({}, [{"name": "label", "parameters": {"binary_data": True}}], {"label"}),
    ({"parameters": {"binary_data_output": True}},
     [{"name": "label", "parameters": {"binary_data": False}}, {"name": "probabilities"}],
     {"probabilities"}),
    ({}, [{"name": "label"}], None),
])
def test_binary_outputs_follow_tritons_rules(doc: dict[str, Any],
                                             outputs: list[dict[str, Any]] | None,
                                             expected: set[str] | None) -> None:
    assert binary_outputs(doc, outputs, META.outputs) == expected


@pytest.mark.parametrize("params", [{"classification": 2},
                                    {"shared_memory_region": "r", "shared_memory_byte_size": 8}])
def test_unsupported_output_options_are_refused(params: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match=r'V2 output "label" asks for .* does not support'):
        binary_outputs({}, [{"name": "label", "parameters": params}], META.outputs)


# ------------------------------------------------------------------ answers


def test_binary_answer_reads_back_with_tritonclient() -> None:
    outs = {**OUTS, "text": np.array(["x", "yz"], dtype=object)}
    body, n = codec.encode_v2_binary(outs, "iris", "abc", "r1",
                                      frozenset({"label", "text"}))
    header = orjson.loads(body[:n])
    assert header["model_name"] == "iris" and header["id"] == "r1"
    by_name = {o["name"]: o for o in header["outputs"]}
    assert by_name["label"]["parameters"] == {"binary_data_size": 16}
    assert "data" not in by_name["label"]
    np.testing.assert_allclose(by_name["probabilities"]["data"], OUTS["probabilities"].ravel())
    result = triton.InferenceServerClient.parse_response_body(body, header_length=n)
    np.testing.assert_array_equal(result.as_numpy("label"), OUTS["label"])
    np.testing.assert_array_equal(result.as_numpy("probabilities"), OUTS["probabilities"])
    assert result.as_numpy("text").tolist() == [b"x", b"yz"]


def test_tensor_bytes_are_little_endian_whatever_the_array() -> None:
    big = np.array([1.5, -2.0], dtype=">f4")
    assert tensor_bytes(big) == np.array([1.5, -2.0], "<f4").tobytes()
    assert tensor_bytes(np.array([[1, 2], [3, 4]], np.int16)[:, 0]) == b"\x01\x00\x03\x00"
    assert tensor_bytes(np.array([True, False])) == b"\x01\x00"
    assert tensor_bytes(np.array([b"ab", "c"], dtype=object)) == (
        struct.pack("<I", 2) + b"ab" + struct.pack("<I", 1) + b"c")


def test_a_v2_request_decoded_from_binary_matches_json() -> None:
    as_json = codec.decode_v2(orjson.dumps({"inputs": [
        {"name": "x", "shape": [2, 4], "datatype": "FP32", "data": X.ravel().tolist()}]}), IRIS)
    body, n = _frame([_x_item()], X.tobytes())
    np.testing.assert_array_equal(_decode(body, n).inputs["x"], as_json.inputs["x"])
