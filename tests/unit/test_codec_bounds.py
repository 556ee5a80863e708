"""Every decoder is bounded: bombs are refused (413 or 400) before their size is allocated.

Each test would fail against ``np.load`` / ``np.array`` on the raw input:
they either allocate the bomb (tracemalloc's peak shows it), take seconds,
or raise something that escapes as a 500.
"""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson
import pytest

from kubeinfer_runtime import codec
from kubeinfer_runtime.codec import DecodeLimits
from kubeinfer_runtime.contract import ModelServerSettings
from kubeinfer_runtime.errors import PayloadTooLarge, RuntimeServiceError, ValidationError
from kubeinfer_runtime.models.base import ModelMetadata, TensorSpec
from kubeinfer_runtime.server.state import decode_limits
from tests.support.decode_bombs import (
    MIB,
    npy,
    npy_header,
    npy_header_bomb,
    npz,
    npz_bomb,
    with_compression_method,
    with_declared_size,
)

X = TensorSpec("X", np.dtype(np.float32), (None, 4))
A = TensorSpec("a", np.dtype(np.float32), (None, 2))
B = TensorSpec("b", np.dtype(np.int64), (None,))
TEXT = TensorSpec("text", np.dtype(object), (None,))
IRIS = ModelMetadata((X,), (TensorSpec("label", np.dtype(np.int64), (None,)),), "test")
SETTING = "KUBEINFER_MAX_DECODED_BYTES"
DEFAULT = codec.DEFAULT_LIMITS.max_decoded_bytes


def _refused(fn: Callable[[], Any]) -> tuple[RuntimeServiceError, int, float]:
    """(the error ``fn`` raised, tracemalloc's peak bytes, seconds taken)."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        fn()
    except RuntimeServiceError as e:
        err = e
    else:
        raise AssertionError("the decoder accepted the input")
    finally:
        elapsed = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return err, peak, elapsed


def _decode(body: bytes, ct: str, inputs: tuple[TensorSpec, ...] = (X,),
            limits: DecodeLimits = codec.DEFAULT_LIMITS) -> Any:
    return lambda: codec.decode_request(body, ct, inputs, limits)


def _assert_413(err: RuntimeServiceError, *fragments: str) -> None:
    assert isinstance(err, PayloadTooLarge) and err.status == 413, err
    assert SETTING in err.message and f"limit of {DEFAULT} bytes" in err.message, err.message
    for f in fragments:
        assert f in err.message, err.message


# ------------------------------------------------------------------ limits


def test_limits_default_to_4_x_the_payload_limit_and_follow_the_setting() -> None:
    assert DEFAULT == 4 * 6 * MIB
    assert DecodeLimits.for_settings(1000, None).max_decoded_bytes == 4000
    assert DecodeLimits.for_settings(1000, 123).max_decoded_bytes == 123
    s = ModelServerSettings(model_uri="file:///m.onnx", max_payload_bytes=2 * MIB)
    assert decode_limits(s).max_decoded_bytes == 8 * MIB
    s = ModelServerSettings(model_uri="file:///m.onnx", max_decoded_bytes=5 * MIB)
    assert decode_limits(s).max_decoded_bytes == 5 * MIB


def test_small_json_bound_is_the_largest_safe_body() -> None:
    from kubeinfer_runtime.codec_limits import worst_case_text_bytes

    for limits in (codec.DEFAULT_LIMITS, DecodeLimits(1000), DecodeLimits(1)):
        n = limits.small_json_bytes
        assert worst_case_text_bytes(n) <= limits.max_decoded_bytes or n == 0
        assert worst_case_text_bytes(n + 1) > limits.max_decoded_bytes


# ------------------------------------------------------------------ .npz


def test_npz_decompression_bomb_is_413_without_inflating() -> None:
    body = npz_bomb()  # 512 MB of zeros
    assert len(body) < MIB
    for ct in ("application/x-npz", "application/x-npy", "application/octet-stream"):
        err, peak, elapsed = _refused(_decode(body, ct))
        _assert_413(err, ".npz", "would decode to 536870912 bytes")
        assert peak < 4 * MIB, peak  # nothing near 512 MB was allocated
        assert elapsed < 1.0


def test_npz_member_whose_declared_size_lies_low_is_400_after_inflating_no_more() -> None:
    # The directory says 1 MB; the data inflates to 512 MB.
    body = with_declared_size(npz_bomb(), MIB)
    err, peak, elapsed = _refused(_decode(body, "application/x-npz"))
    assert type(err) is ValidationError and err.status == 400
    assert 'member "X" is corrupt' in err.message, err.message
    assert peak < 8 * MIB, peak
    assert elapsed < 1.0


def test_npz_member_whose_declared_size_lies_high_is_413_or_400() -> None:
    small = npz({"X.npy": npy(np.zeros((2, 4), np.float32))})
    err, _, _ = _refused(_decode(with_declared_size(small, 1 << 31), "application/x-npz"))
    _assert_413(err, "would decode to 2147483648 bytes")
    err, peak, _ = _refused(_decode(with_declared_size(small, 10 * MIB), "application/x-npz"))
    assert err.status == 400 and 'member "X"' in err.message, err.message
    assert peak < 16 * MIB


def test_npz_truncated_member_is_400_naming_the_member() -> None:
    truncated = npy_header((100, 4)) + bytes(50 * 16)  # the header wants 100 rows, 50 are there
    err, _, _ = _refused(_decode(npz({"X.npy": truncated}), "application/x-npz"))
    assert type(err) is ValidationError
    assert err.message.startswith('Request body (.npz) member "X" holds 800 bytes of array '
                                  "data where its header describes 1600"), err.message


def test_npz_corrupt_or_unsupported_data_is_400() -> None:
    good = npz({"X.npy": npy(np.ones((64, 4), np.float32))})
    pos = good.index(b"PK\x03\x04") + 30 + len("X.npy") + 4
    corrupt = good[:pos] + bytes(b ^ 0x5A for b in good[pos:pos + 20]) + good[pos + 20:]
    for body in (corrupt, with_compression_method(good, 99), good[:len(good) // 2]):
        err, _, _ = _refused(_decode(body, "application/x-npz"))
        assert type(err) is ValidationError and err.status == 400, err


def test_npz_member_count_names_and_duplicates_are_checked_before_inflating() -> None:
    one = npy(np.zeros((1, 4), np.float32))
    many = npz({f"m{i}.npy": one for i in range(65)})
    err, _, _ = _refused(_decode(many, "application/x-npz"))
    assert "holds more than 64 arrays" in err.message
    for members, problem in (({"dir/X.npy": one}, "member 1 is not a top-level .npy array"),
                             ({"X.txt": one}, "member 1 is not a top-level .npy array")):
        err, _, _ = _refused(_decode(npz(members), "application/x-npz"))
        assert problem in err.message, err.message
    dup = npz({"X.npy": one, "Y.npy": one}).replace(b"Y.npy", b"X.npy")
    err, _, _ = _refused(_decode(dup, "application/x-npz"))
    assert "members 1 and 2 have the same name" in err.message, err.message


def test_npz_within_the_bound_decodes_as_views_of_the_inflated_bytes() -> None:
    body = npz({"a.npy": npy(np.ones((3, 2), np.float32)), "b.npy": npy(np.arange(3))})
    out = codec.decode_request(body, "application/x-npz", (A, B))
    assert out["a"].shape == (3, 2) and out["b"].tolist() == [0, 1, 2]


# ------------------------------------------------------------------ .npy


def test_npy_header_claiming_10_12_rows_is_413_without_allocating() -> None:
    body = npy_header_bomb()
    assert len(body) == 144
    err, peak, _ = _refused(_decode(body, "application/x-npy"))
    _assert_413(err, "4000000000000 values of 4 bytes", "16000000000000 bytes")
    assert peak < MIB


def test_npy_truncated_padded_or_odd_is_400() -> None:
    header = npy_header((2, 4))
    bodies = {
        header + bytes(16): "holds 16 bytes of array data where its header describes 32",
        header + bytes(48): "holds 48 bytes",
        header[:40]: "truncated inside its .npy header",
        npy_header((2, 4), "<c8") + bytes(64): "data type no model input takes",
        npy_header((2, 4), "|O") + bytes(64): "holds Python objects",
        header.replace(b"'shape'", b"'shapo'") + bytes(32): "header numpy cannot read",
        b"\x93NUMPY\x03\x00" + header[8:]: "version other than 1 or 2",
        b"\x93NUMPY\x02\x00" + b"\xff\xff\xff\x7f" + header[12:]: "header over 10000 bytes",
    }
    for body, problem in bodies.items():
        err, _, _ = _refused(_decode(body, "application/x-npy"))
        assert type(err) is ValidationError and problem in err.message, (problem, err.message)


def test_npy_is_a_view_of_the_body_and_fortran_order_is_kept() -> None:
    arr = np.asfortranarray(np.arange(8, dtype=np.float32).reshape(2, 4))
    out = codec.decode_request(npy(arr), "application/x-npy", (X,))["X"]
    np.testing.assert_array_equal(out, arr)
    empty = codec.decode_request(npy(np.zeros((0, 4), np.float32)), "application/x-npy", (X,))
    assert empty["X"].shape == (0, 4)


# ------------------------------------------------------------------ JSON


@pytest.mark.parametrize("depth", [200, 1100, 100_000])
def test_deeply_nested_json_is_400(depth: int) -> None:
    body = b"[" * depth + b"1" + b"]" * depth
    for fn in (_decode(body, "application/json"),
               lambda: codec.decode_v2(b'{"inputs": [{"name": "X", "shape": [1], "datatype": '
                                       b'"FP32", "data": ' + body + b"}]}", IRIS)):
        err, _, _ = _refused(fn)
        assert isinstance(err, ValidationError) and err.status == 400, err
        assert "nested more than" in err.message, err.message


def test_one_long_string_among_many_values_is_refused_without_the_width_blowup() -> None:
    # numpy would make this a 1,000,001 x 100,000-character string array: 400 GB.
    body = orjson.dumps({"instances": ["x" * 100_000] + [""] * 1_000_000})
    err, peak, elapsed = _refused(_decode(body, "application/json"))
    assert err.message == 'Input "X" expects shape [N, 4] float32, got strings'
    assert peak < 64 * MIB, peak
    assert elapsed < 5.0
    assert codec.fast_float_json(body, X, (4,)) is None


def test_long_strings_for_a_string_input_become_an_object_array() -> None:
    body = orjson.dumps(["x" * 100_000] + ["y"] * 200_000)
    tracemalloc.start()
    out = codec.decode_request(body, "application/json", (TEXT,))["text"]
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert out.dtype == object and out.shape == (200_001,) and out[1] == "y"
    assert peak < 64 * MIB, peak


def test_json_value_count_over_the_limit_is_413_on_the_lane_and_the_general_path() -> None:
    small = DecodeLimits(MIB)
    body = b"[" + b"0," * 300_000 + b"0]"  # 300k values: 2.4 MB decoded, 0.6 MB of JSON
    assert codec.fast_float_json(body, X, (4,), small) is None
    err, _, _ = _refused(_decode(body, "application/json", limits=small))
    assert err.status == 413 and "300001 values" in err.message, err.message
    named = orjson.dumps({"inputs": {"a": [[0, 0]] * 40_000, "b": [0] * 60_000}})
    err, _, _ = _refused(_decode(named, "application/json", (A, B), small))
    assert err.status == 413 and "Request inputs (2 inputs)" in err.message, err.message


def test_text_body_longer_than_the_limit_is_413_before_parsing() -> None:
    body = b"[" + b" " * (2 * MIB) + b"1]"
    for ct in ("application/json", "text/csv"):
        err, peak, _ = _refused(_decode(body, ct, limits=DecodeLimits(MIB)))
        assert err.status == 413 and "Request body would decode to" in err.message
        assert peak < MIB


# ------------------------------------------------------------------ V2


def test_v2_shape_of_10_12_with_little_data_is_413_before_allocating() -> None:
    doc = {"inputs": [{"name": "X", "shape": [10**12], "datatype": "FP32", "data": [1, 2]}]}
    err, peak, elapsed = _refused(lambda: codec.decode_v2(orjson.dumps(doc), IRIS))
    _assert_413(err, 'V2 input "X" (1000000000000 values by its "shape")')
    assert peak < MIB and elapsed < 0.5
    doc["inputs"][0]["datatype"] = "BYTES"
    err, _, _ = _refused(lambda: codec.decode_v2(orjson.dumps(doc), IRIS))
    assert err.status == 413


def test_v2_rank_and_data_count_are_checked_before_building() -> None:
    doc = {"inputs": [{"name": "X", "shape": [1] * 65, "datatype": "FP32", "data": [1]}]}
    err, _, _ = _refused(lambda: codec.decode_v2(orjson.dumps(doc), IRIS))
    assert "at most 64 non-negative ints" in err.message
    doc = {"inputs": [{"name": "X", "shape": [2, 4], "datatype": "FP32",
                       "data": [[1, 2, 3, 4], [5, 6, 7]]}]}
    err, _, _ = _refused(lambda: codec.decode_v2(orjson.dumps(doc), IRIS))
    assert "not a rectangular array" in err.message, err.message


# ------------------------------------------------------------------ CSV


def test_csv_with_a_huge_row_count_is_413_as_soon_as_it_is_over() -> None:
    body = b"1,2,3,4\n" * 200_000  # 1.6 MB of text, 6.4 MB decoded
    err, peak, _ = _refused(_decode(body, "text/csv", limits=DecodeLimits(2 * MIB)))
    # 2 MiB holds 262144 values: the row that goes over is row 65537.
    assert err.status == 413 and "CSV body (at least 65537 rows of 4 values)" in err.message
    assert peak < 8 * MIB, peak  # the text, the values up to the bound, one block of lines
    assert codec.decode_request(body, "text/csv", (X,))["X"].shape == (200_000, 4)


def test_csv_lines_split_across_blocks_as_one_body_would() -> None:
    rows = [f"{i},{i + 1}.5,-{i},1e-3" for i in range(100_000)]  # > 2 blocks of text
    body = "\r\n".join(rows).encode() + b"\r\n\r\n"
    out = codec.decode_request(body, "text/csv", (X,))["X"]
    assert out.shape == (100_000, 4) and out[99_999, 1] == np.float32(100_000.5)


# ------------------------------------------------------------------ nothing escapes


def test_unexpected_failures_inside_decoding_are_400_never_500() -> None:
    bodies = [
        (npz({"X.npy": b"\x93NUMPY\x01\x00\x00\x00"}), "application/x-npz"),
        (npy_header((2, 4), "<U0"), "application/x-npy"),
        (b"PK\x05\x06" + bytes(18), "application/x-npz"),
        (b"PK\x03\x04garbage", "application/x-npz"),
        (b"\x93NUMPY", "application/x-npy"),
        (b'{"inputs": [{"datatype": "FP32", "name": "X", "shape": [1, 4], "data": {}}]}',
         "application/json"),
    ]
    for body, ct in bodies:
        err, _, _ = _refused(_decode(body, ct))
        assert 400 <= err.status < 500, err
