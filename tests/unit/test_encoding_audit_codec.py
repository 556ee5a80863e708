"""What real clients send that the codec's own tests did not: byte order marks, NaN and
Infinity from Python's ``json`` (the SageMaker SDK's JSONSerializer), integers past what
a float holds exactly, non-finite outputs in CSV, and Accept with quality values."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kubeinfer_runtime import codec
from kubeinfer_runtime.errors import ValidationError
from kubeinfer_runtime.models.base import TensorSpec

BOM = b"\xef\xbb\xbf"
F = TensorSpec("x", np.dtype(np.float32), (None, 2))
I64 = TensorSpec("x", np.dtype(np.int64), (None, 2))
U64 = TensorSpec("x", np.dtype(np.uint64), (None, 2))
I32 = TensorSpec("x", np.dtype(np.int32), (None, 2))


def _decode(body: bytes, ct: str | None, spec: TensorSpec = F) -> np.ndarray:
    return codec.decode_request(body, ct, [spec])["x"]


@pytest.mark.parametrize("body", [b"[[1,2]]", b'{"instances":[[1,2]]}',
                                  b'{"inputs":{"x":[[1,2]]}}'])
@pytest.mark.parametrize("ct", ["application/json", "application/json; charset=UTF-8",
                                None, "application/octet-stream"])
def test_json_with_a_utf8_bom_is_read_as_python_json_reads_it(body: bytes,
                                                              ct: str | None) -> None:
    # Notepad and PowerShell's Out-File write one; json.loads(bytes) skips it.
    assert json.loads(BOM + body)
    assert _decode(BOM + body, ct).tolist() == [[1.0, 2.0]]
    assert _decode(BOM + body, ct, I64).tolist() == [[1, 2]]


def test_a_bom_in_the_middle_or_utf16_is_still_a_400() -> None:
    with pytest.raises(ValidationError, match="not valid JSON"):
        _decode(b"[[1," + BOM + b"2]]", "application/json")
    with pytest.raises(ValidationError, match=r"UTF-16 text .*: send UTF-8 JSON"):
        _decode('[[1,2]]'.encode("utf-16"), "application/json")
    with pytest.raises(ValidationError, match="CSV body is not UTF-8"):
        _decode("1,2\n".encode("utf-16"), "text/csv")


def test_nan_and_infinity_as_the_sagemaker_sdk_writes_them() -> None:
    # JSONSerializer: json.dumps(array.tolist()) writes NaN, Infinity, -Infinity.
    body = json.dumps({"instances": [[float("nan"), float("inf")], [-float("inf"), 1.0]]})
    assert "NaN" in body and "-Infinity" in body
    got = _decode(body.encode(), "application/json")
    assert np.isnan(got[0, 0]) and got[0, 1] == np.inf and got[1].tolist() == [-np.inf, 1.0]
    got = _decode(BOM + b"[[NaN, 1]]", "application/json")
    assert np.isnan(got[0, 0])
    # Not for an integer input, and a word like NaN in a string changes nothing.
    with pytest.raises(ValidationError, match='Input "x" expects shape'):
        _decode(b"[[NaN, 1]]", "application/json", I64)
    with pytest.raises(ValidationError, match="not valid JSON"):
        _decode(b'[[1, 2]] "NaN', "application/json")
    # What orjson refuses stays refused when a NaN is there too.
    s = TensorSpec("x", np.dtype(object), (None,))
    for body in (b'["\\ud800", "NaN"]', b"[NaN, 123456789012345678901234567890]"):
        with pytest.raises(ValidationError, match="not valid JSON"):
            _decode(body, "application/json", s)


@pytest.mark.parametrize(("body", "ct", "spec"), [
    (b"[[9223372036854775808, 1]]", "application/json", I64),  # 2^63: read as a float
    (b"[[-9223372036854775809, 1]]", "application/json", I64),  # rounds to -2^63
    (b"[[18446744073709551616, 1]]", "application/json", U64),
    (b"9223372036854775807,1\n", "text/csv", I64),  # float64 2^63: cast to -2^63
    (b"9007199254740993,1\n", "text/csv", I64),  # read as ...992
    (b"18446744073709551615,1\n", "text/csv", U64),  # float64 2^64: cast to 0
])
def test_integers_a_float_cannot_hold_are_refused_not_wrapped(body: bytes, ct: str,
                                                              spec: TensorSpec) -> None:
    with pytest.raises(ValidationError, match="2\\^53 or more read as floats") as e:
        _decode(body, ct, spec)
    assert "922337" not in e.value.message and "1844" not in e.value.message


def test_integers_that_fit_still_decode_exactly() -> None:
    assert _decode(b"[[9223372036854775807, -9223372036854775808]]", "application/json",
                   I64).tolist() == [[2**63 - 1, -2**63]]
    assert _decode(b"9007199254740991,-9007199254740991\n", "text/csv",
                   I64).tolist() == [[2**53 - 1, 1 - 2**53]]
    assert _decode(b"2147483647,-2147483648\n", "text/csv", I32).tolist() == [[2**31 - 1,
                                                                              -2**31]]
    with pytest.raises(ValidationError, match="int32"):
        _decode(b"2147483648,1\n", "text/csv", I32)


def test_csv_output_writes_nan_and_infinities_so_csv_readers_take_them_back() -> None:
    out = np.array([[np.nan, 0.1], [np.inf, -np.inf]], dtype=np.float32)
    body = codec.encode_response({"y": out}, codec.Encoding.CSV)
    assert body == b"nan,0.1\ninf,-inf\n"
    back = _decode(body, "text/csv")
    assert np.isnan(back[0, 0]) and back[1].tolist() == [np.inf, -np.inf]
    assert codec.encode_response({"y": np.array([np.nan, 2.5])},
                                 codec.Encoding.CSV) == b"nan\n2.5\n"
    # Finite outputs keep the shortest form, unchanged.
    assert codec.encode_response({"y": np.array([0.1, 2.0], dtype=np.float32)},
                                 codec.Encoding.CSV) == b"0.1\n2.0\n"


@pytest.mark.parametrize(("accept", "want"), [
    ("text/csv;q=0.1, application/json", codec.Encoding.JSON),
    ("application/json;q=0, text/csv", codec.Encoding.CSV),
    ("application/json; q=0.5, text/csv; q=0.9", codec.Encoding.CSV),
    ("text/csv, */*;q=0.1", codec.Encoding.CSV),
    ("text/csv;q=0, */*", codec.Encoding.JSON),
    ("application/x-npy, text/csv, application/json", codec.Encoding.NPY),
    ("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
     codec.Encoding.JSON),
    (" Text/CSV ; Q=1 ", codec.Encoding.CSV),
    ("application/jsonlines, application/json", codec.Encoding.JSON),
])
def test_accept_quality_values_pick_the_encoding(accept: str, want: codec.Encoding) -> None:
    assert codec.negotiate(accept) is want


@pytest.mark.parametrize("accept", ["application/json;q=0", "text/csv;q=nope",
                                    "application/jsonlines", "application/x-recordio-protobuf"])
def test_accept_with_nothing_acceptable_is_a_400_naming_it(accept: str) -> None:
    with pytest.raises(ValidationError, match=r"Accept .* is not supported: ask for"):
        codec.negotiate(accept)


def test_a_non_ascii_output_name_is_named_as_the_answer_writes_it() -> None:
    # CustomAttributes is ASCII (the gateway refuses anything else, as SageMaker does):
    # an answer writes such a name percent-encoded, and a client sending back what it
    # read names that output.
    from kubeinfer_runtime.server.work import answer_headers

    specs = [TensorSpec("Größe", np.dtype(np.float32), (None,)),
             TensorSpec("p%", np.dtype(np.float32), (None,)),
             TensorSpec("label", np.dtype(np.int64), (None,))]
    for name in ("Größe", "p%"):
        headers = dict(answer_headers(codec.Encoding.CSV, name))
        echoed = headers[b"x-amzn-sagemaker-custom-attributes"].decode("ascii")
        assert codec.chosen_output(echoed, specs) == name
    assert codec.chosen_output("output=label", specs) == "label"
    with pytest.raises(ValidationError, match="names no output"):
        codec.chosen_output("output=%ff%zz", specs)
