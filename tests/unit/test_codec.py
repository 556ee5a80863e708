"""The codec: every content type in and out, good and bad, and the V2 protocol."""

from __future__ import annotations

import io

import numpy as np
import orjson
import pytest

from kubeinfer_runtime import codec
from kubeinfer_runtime.errors import ValidationError
from kubeinfer_runtime.models.base import ModelMetadata, TensorSpec

X = TensorSpec("X", np.dtype(np.float32), (None, 4))
A = TensorSpec("a", np.dtype(np.float32), (None, 2))
B = TensorSpec("b", np.dtype(np.int64), (None,))
LABEL = TensorSpec("label", np.dtype(np.int64), (None,))
PROBS = TensorSpec("probabilities", np.dtype(np.float32), (None, 3))
IRIS = ModelMetadata((X,), (LABEL, PROBS), "onnxruntime_onnx")
ROWS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def _decode(body: bytes, ct: str | None,
            inputs: tuple[TensorSpec, ...] = (X,)) -> dict[str, np.ndarray]:
    return codec.decode_request(body, ct, inputs)


# ------------------------------------------------------------------ JSON in


@pytest.mark.parametrize("doc", [{"instances": ROWS}, ROWS, {"inputs": {"X": ROWS}},
                                 {"inputs": ROWS}])
def test_json_forms_decode_to_float32(doc: object) -> None:
    out = _decode(orjson.dumps(doc), "application/json")
    assert list(out) == ["X"]
    assert out["X"].dtype == np.float32
    np.testing.assert_allclose(out["X"], np.array(ROWS, dtype=np.float32))


def test_content_type_parameters_and_case_are_ignored() -> None:
    out = _decode(orjson.dumps(ROWS), "Application/JSON; charset=utf-8")
    assert out["X"].shape == (2, 4)


def test_missing_content_type_means_json() -> None:
    assert _decode(orjson.dumps(ROWS), None)["X"].shape == (2, 4)


def test_single_instance_becomes_batch_of_one() -> None:
    out = _decode(orjson.dumps(ROWS[0]), "application/json")
    assert out["X"].shape == (1, 4)


def test_integers_are_coerced_to_the_float_input() -> None:
    out = _decode(b"[[1, 2, 3, 4]]", "application/json")
    assert out["X"].dtype == np.float32


def test_multi_input_named_and_row_forms() -> None:
    named = {"inputs": {"a": [[1, 2]], "b": [7]}}
    rows = {"instances": [{"a": [1, 2], "b": 7}]}
    for doc in (named, rows):
        out = _decode(orjson.dumps(doc), "application/json", (A, B))
        assert out["a"].dtype == np.float32 and out["a"].shape == (1, 2)
        assert out["b"].dtype == np.int64 and out["b"].tolist() == [7]


def test_multi_input_model_refuses_an_unnamed_list() -> None:
    with pytest.raises(ValidationError, match=r'2 inputs \("a", "b"\)'):
        _decode(b"[[1, 2]]", "application/json", (A, B))


def test_missing_inputs_are_named_and_unknown_ones_counted() -> None:
    # Declared names are the model's (not secret); a name from the body is never quoted.
    with pytest.raises(ValidationError, match='missing "b"; 1 unknown input name\\)') as e:
        _decode(orjson.dumps({"inputs": {"a": [[1, 2]], "c": [1]}}), "application/json", (A, B))
    assert '"c"' not in e.value.message


def test_bad_json_is_a_validation_error() -> None:
    with pytest.raises(ValidationError, match="not valid JSON") as e:
        _decode(b"{not json", "application/json")
    assert e.value.status == 400


def test_json_scalar_is_refused_with_the_accepted_forms() -> None:
    with pytest.raises(ValidationError, match='"instances"'):
        _decode(b"42", "application/json")


def test_wrong_shape_names_the_input_and_expectation() -> None:
    with pytest.raises(ValidationError) as e:
        _decode(b"[[1, 2, 3]]", "application/json")
    assert e.value.message == 'Input "X" expects shape [N, 4] float32, got [1, 3]'


def test_strings_for_a_float_input_are_refused() -> None:
    with pytest.raises(ValidationError, match=r'Input "X" expects .* got \[1, 4\] string'):
        _decode(b'[["a", "b", "c", "d"]]', "application/json")


def test_nulls_are_refused_not_turned_into_nan() -> None:
    with pytest.raises(ValidationError, match="mixed/null"):
        _decode(b"[[1, null, 3, 4]]", "application/json")


def test_ragged_rows_are_refused() -> None:
    with pytest.raises(ValidationError, match='Input "X" is not a rectangular array'):
        _decode(b"[[1, 2, 3, 4], [1, 2]]", "application/json")


def test_fractional_values_for_an_int_input_are_refused() -> None:
    with pytest.raises(ValidationError, match=r'Input "b" expects shape \[N\] int64'):
        _decode(orjson.dumps({"inputs": {"a": [[1, 2]], "b": [1.5]}}), "application/json", (A, B))


def test_whole_floats_for_an_int_input_are_accepted() -> None:
    out = _decode(orjson.dumps({"inputs": {"a": [[1, 2]], "b": [3.0]}}), "application/json",
                  (A, B))
    assert out["b"].dtype == np.int64 and out["b"].tolist() == [3]


def test_out_of_range_ints_are_refused() -> None:
    small = TensorSpec("u", np.dtype(np.uint8), (None,))
    with pytest.raises(ValidationError, match='Input "u"'):
        _decode(b"[300]", "application/json", (small,))


def test_string_input_gets_an_object_array() -> None:
    text = TensorSpec("text", np.dtype(object), (None,))
    out = _decode(b'["hello", "world"]', "application/json", (text,))
    assert out["text"].dtype == object and out["text"].tolist() == ["hello", "world"]


def test_unsupported_content_type_lists_the_supported_ones() -> None:
    with pytest.raises(ValidationError,
                       match="'image/png' is not supported: send application/json"):
        _decode(b"...", "image/png")


# ------------------------------------------------------------------ CSV in


def test_csv_rows_decode() -> None:
    out = _decode(b"5.1,3.5,1.4,0.2\n6.7,3.0,5.2,2.3\n", "text/csv")
    np.testing.assert_allclose(out["X"], np.array(ROWS, dtype=np.float32))
    assert out["X"].dtype == np.float32


def test_csv_with_charset_crlf_and_blank_lines() -> None:
    out = _decode(b"5.1,3.5,1.4,0.2\r\n\r\n6.7,3.0,5.2,2.3", "text/csv; charset=utf-8")
    assert out["X"].shape == (2, 4)


def test_csv_header_row_is_named_with_its_position_not_its_text() -> None:
    with pytest.raises(ValidationError, match="CSV row 1 column 2 is not a number: send") as e:
        _decode(b"1,b,c,d\n1,2,3,4\n", "text/csv")
    assert "'b'" not in e.value.message


def test_csv_ragged_rows() -> None:
    with pytest.raises(ValidationError, match="CSV row 2 has 3 columns, row 1 has 4"):
        _decode(b"1,2,3,4\n1,2,3\n", "text/csv")


def test_csv_wrong_width_names_the_input() -> None:
    with pytest.raises(ValidationError,
                       match=r'Input "X" expects shape \[N, 4\] float32, got \[1, 3\]'):
        _decode(b"1,2,3\n", "text/csv")


def test_csv_empty_body() -> None:
    with pytest.raises(ValidationError, match="CSV body is empty"):
        _decode(b"\n", "text/csv")


def test_csv_needs_a_single_input_model() -> None:
    with pytest.raises(ValidationError, match="one input"):
        _decode(b"1,2\n", "text/csv", (A, B))


# ------------------------------------------------------------------ npy in


def test_npy_float64_is_coerced_to_float32() -> None:
    out = _decode(_npy(np.array(ROWS)), "application/x-npy")
    assert out["X"].dtype == np.float32 and out["X"].shape == (2, 4)


def test_npz_feeds_a_multi_input_model() -> None:
    buf = io.BytesIO()
    np.savez(buf, a=np.ones((3, 2), np.float32), b=np.arange(3))
    out = _decode(buf.getvalue(), "application/x-npz", (A, B))
    assert out["a"].shape == (3, 2) and out["b"].tolist() == [0, 1, 2]


def test_npy_refuses_pickles_and_garbage() -> None:
    obj = io.BytesIO()
    np.save(obj, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValidationError, match=r"holds Python objects \(a pickle\)"):
        _decode(obj.getvalue(), "application/x-npy")
    with pytest.raises(ValidationError, match=r"not a \.npy or \.npz array"):
        _decode(b"definitely not numpy", "application/x-npy")


def test_npy_wrong_shape() -> None:
    with pytest.raises(ValidationError,
                       match=r'Input "X" expects shape \[N, 4\] float32, got \[2, 2, 2\]'):
        _decode(_npy(np.zeros((2, 2, 2), np.float32)), "application/x-npy")


# ------------------------------------------------------------------ encode


OUTS = {"label": np.array([0, 2], dtype=np.int64),
        "probabilities": np.array([[0.9, 0.05, 0.05], [0.1, 0.2, 0.7]], dtype=np.float32)}


@pytest.mark.parametrize(("accept", "enc"), [
    (None, codec.Encoding.JSON), ("*/*", codec.Encoding.JSON),
    ("application/json; charset=utf-8", codec.Encoding.JSON), ("text/csv", codec.Encoding.CSV),
    ("application/x-npy", codec.Encoding.NPY), ("image/png, text/csv", codec.Encoding.CSV),
    ("application/x-npz", codec.Encoding.NPZ),
])
def test_negotiate(accept: str | None, enc: codec.Encoding) -> None:
    assert codec.negotiate(accept) is enc


def test_unsupported_accept_lists_the_supported_types() -> None:
    with pytest.raises(ValidationError) as e:
        codec.negotiate("image/png")
    assert e.value.status == 400
    assert ("application/json, text/csv, application/x-npy or application/x-npz"
            in e.value.message)


def test_json_one_output_is_the_predictions() -> None:
    body = codec.encode_response({"logits": np.array([[0.1, 0.2]], np.float32)},
                                 codec.Encoding.JSON)
    assert orjson.loads(body) == {"predictions": [[0.1, 0.2]]}


def test_json_several_outputs_are_keyed_by_name() -> None:
    doc = orjson.loads(codec.encode_response(OUTS, codec.Encoding.JSON))
    assert doc["predictions"]["label"] == [0, 2]
    assert doc["predictions"]["probabilities"][1] == [0.1, 0.2, 0.7]


def test_json_handles_non_contiguous_and_string_arrays() -> None:
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2]
    doc = orjson.loads(codec.encode_response({"y": arr}, codec.Encoding.JSON))
    assert doc["predictions"] == arr.tolist()
    doc = orjson.loads(codec.encode_response({"s": np.array(["a", "b"], dtype=object)},
                                             codec.Encoding.JSON))
    assert doc["predictions"] == ["a", "b"]


def test_csv_encodes_the_first_output() -> None:
    assert codec.encode_response(OUTS, codec.Encoding.CSV) == b"0\n2\n"
    two_d = codec.encode_response({"p": OUTS["probabilities"]}, codec.Encoding.CSV)
    assert two_d == b"0.9,0.05,0.05\n0.1,0.2,0.7\n"


def test_csv_encodes_strings() -> None:
    body = codec.encode_response({"s": np.array(["a,b", "c"], dtype=object)}, codec.Encoding.CSV)
    assert body == b'"a,b"\nc\n'


def test_npy_round_trips_the_first_output() -> None:
    body = codec.encode_response(OUTS, codec.Encoding.NPY)
    np.testing.assert_array_equal(np.load(io.BytesIO(body)), OUTS["label"])


# ------------------------------------------------------------------ V2


def _v2(doc: object) -> codec.V2Request:
    return codec.decode_v2(orjson.dumps(doc), IRIS)


def test_v2_decode_flat_data_and_options() -> None:
    req = _v2({"id": "r1", "inputs": [{"name": "X", "shape": [2, 4], "datatype": "FP32",
                                       "data": [v for row in ROWS for v in row]}],
               "outputs": [{"name": "probabilities"}]})
    assert req.id == "r1" and req.output_names == ["probabilities"]
    np.testing.assert_allclose(req.inputs["X"], np.array(ROWS, dtype=np.float32))


def test_v2_fp64_and_nested_data_are_accepted() -> None:
    req = _v2({"inputs": [{"name": "X", "shape": [2, 4], "datatype": "FP64", "data": ROWS}]})
    assert req.inputs["X"].dtype == np.float32 and req.id is None and req.output_names is None


@pytest.mark.parametrize(("doc", "msg"), [
    ({"inputs": []}, "non-empty"),
    ([1, 2], "non-empty"),
    ({"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FLOAT", "data": [1, 2, 3, 4]}]},
     'unknown "datatype": use BOOL'),
    ({"inputs": [{"name": "X", "shape": [2, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]},
     r'has 4 values in "data" but "shape" \[2, 4\] needs 8'),
    ({"inputs": [{"name": "X", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]},
     r'Input "X" expects shape \[N, 4\] float32, got \[1, 3\]$'),
    ({"inputs": [{"name": "Y", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]},
     'missing "X"; 1 unknown input name'),
    ({"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}],
      "outputs": [{"name": "nope"}]}, "Requested output 0 is not an output of the model"),
    ({"inputs": [{"name": "X", "shape": "1,4", "datatype": "FP32", "data": [1, 2, 3, 4]}]},
     "needs \"shape\""),
    ({"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32"}]}, 'needs "data"'),
    ({"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32", "data": [],
                  "parameters": {"binary_data_size": 16}}]}, "binary data extension"),
    ({"inputs": [{"name": "X", "shape": [1, 4], "datatype": "INT64",
                  "data": [1.5, 2, 3, 4]}]}, 'Input "X"'),
])
def test_v2_bad_requests(doc: object, msg: str) -> None:
    with pytest.raises(ValidationError, match=msg):
        _v2(doc)


def test_v2_duplicate_input() -> None:
    item = {"name": "X", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}
    with pytest.raises(ValidationError, match="given twice"):
        _v2({"inputs": [item, item]})


def test_v2_request_on_invocations_is_understood() -> None:
    doc = {"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32", "data": ROWS[0]}]}
    assert _decode(orjson.dumps(doc), "application/json")["X"].shape == (1, 4)


def test_v2_encode() -> None:
    outs = {**OUTS, "text": np.array(["x", "y"], dtype=object)}
    doc = orjson.loads(codec.encode_v2(outs, "iris", "abc", "r1"))
    assert doc["model_name"] == "iris" and doc["model_version"] == "abc" and doc["id"] == "r1"
    by_name = {o["name"]: o for o in doc["outputs"]}
    assert by_name["label"] == {"name": "label", "shape": [2], "datatype": "INT64", "data": [0, 2]}
    assert by_name["probabilities"]["shape"] == [2, 3]
    assert by_name["probabilities"]["datatype"] == "FP32"
    assert by_name["probabilities"]["data"] == [0.9, 0.05, 0.05, 0.1, 0.2, 0.7]
    assert by_name["text"]["datatype"] == "BYTES" and by_name["text"]["data"] == ["x", "y"]


def test_v2_encode_omits_missing_id() -> None:
    doc = orjson.loads(codec.encode_v2({"y": np.array([True])}, "m", None, None))
    assert "id" not in doc and "model_version" not in doc
    assert doc["outputs"][0]["datatype"] == "BOOL"


def test_octet_stream_is_told_apart_by_magic_bytes() -> None:
    assert _decode(_npy(np.array(ROWS)), "application/octet-stream")["X"].shape == (2, 4)
    assert _decode(orjson.dumps(ROWS), "application/octet-stream")["X"].shape == (2, 4)
    with pytest.raises(ValidationError, match="not valid JSON"):
        _decode(b"\x00\x01", "application/octet-stream")


def test_text_plain_is_not_guessed_to_be_csv() -> None:
    with pytest.raises(ValidationError, match="'text/plain' is not supported"):
        _decode(b"1,2,3,4", "text/plain")


def test_header_values_are_quoted_at_most_100_characters() -> None:
    long_type = "image/" + "x" * 300
    with pytest.raises(ValidationError) as e:
        _decode(b"...", long_type)
    assert f"'{long_type[:100]}...'" in e.value.message and "x" * 101 not in e.value.message
    with pytest.raises(ValidationError) as e:
        codec.negotiate("image/" + "y" * 300)
    assert "y" * 101 not in e.value.message


def test_csv_that_is_not_utf8_gives_the_position_not_the_byte() -> None:
    with pytest.raises(ValidationError) as e:
        _decode(b"1,2,3,\xff\n", "text/csv")
    assert e.value.message == ("CSV body is not UTF-8 (invalid byte at position 6): send UTF-8 "
                               "text")


def test_bad_json_says_where_not_what() -> None:
    with pytest.raises(ValidationError) as e:
        _decode(b'[[1, 2, 3, "secret]]', "application/json")
    assert "line 1 column" in e.value.message and "secret" not in e.value.message
