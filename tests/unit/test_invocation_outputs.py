"""Every model output reaches an ``/invocations`` caller, whatever the Accept.

JSON carries every output by name; ``application/x-npz`` carries every output
as an archive member; CSV and .npy carry one output, the one CustomAttributes
``output=<name>`` names (else the first), and the answer's headers say which
(``X-Kubeinfer-Output``, and CustomAttributes ``output=<name>``, which the
gateway passes on and boto3 shows). Nothing is dropped without saying so.
"""

from __future__ import annotations

import io

import numpy as np
import pytest

from kubeinfer_runtime import codec
from kubeinfer_runtime.errors import ValidationError
from kubeinfer_runtime.models.base import TensorSpec
from kubeinfer_runtime.server.work import answer_headers, invocations_output

OUTS = {"label": np.array([0, 2], np.int64),
        "probabilities": np.array([[0.9, 0.05, 0.05], [0.1, 0.2, 0.7]], np.float32)}
SPECS = (TensorSpec("label", np.dtype(np.int64), (None,)),
         TensorSpec("probabilities", np.dtype(np.float32), (None, 3)))
ATTRS = b"x-amzn-sagemaker-custom-attributes"


@pytest.mark.parametrize(("header", "expected"), [
    (None, None), ("", None), ("output=probabilities", "probabilities"),
    ("trace=abc; output = label ", "label"), ("a=1,Output=label", "label"),
    ("output", None), ("outputs=label", None), ("output=label;output=probabilities", "label"),
])
def test_custom_attributes_are_key_value_pairs(header: str | None, expected: str | None) -> None:
    assert codec.custom_attribute(header, "output") == expected


def test_the_chosen_output_defaults_to_the_first_of_several() -> None:
    assert codec.chosen_output(None, SPECS) == "label"
    assert codec.chosen_output("output=probabilities", SPECS) == "probabilities"
    # One output, none named: that output, with nothing to say about it.
    assert codec.chosen_output(None, SPECS[:1]) is None
    assert codec.chosen_output("output=label", SPECS[:1]) == "label"


def test_an_unknown_output_is_a_400_listing_the_outputs_without_quoting_the_request() -> None:
    with pytest.raises(ValidationError) as info:
        codec.chosen_output("output=secret-name", SPECS)
    msg = info.value.message
    assert info.value.status == 400
    assert '"label", "probabilities"' in msg and "application/x-npz" in msg
    assert "secret-name" not in msg


def test_npz_carries_every_output_by_name() -> None:
    outs = {**OUTS, "file": np.array(["a", "bc"], dtype=object),
            "allow_pickle": np.array([1.5])}  # names numpy.savez would trip over
    body = codec.encode_response(outs, codec.Encoding.NPZ)
    with np.load(io.BytesIO(body), allow_pickle=False) as archive:
        assert sorted(archive.files) == sorted(outs)
        np.testing.assert_array_equal(archive["label"], OUTS["label"])
        np.testing.assert_array_equal(archive["probabilities"], OUTS["probabilities"])
        assert archive["file"].tolist() == ["a", "bc"]
    # ... and our own .npz decoder reads it back (same format both ways).
    plain = codec.encode_response(OUTS, codec.Encoding.NPZ)
    assert codec.decode_request(plain, codec.NPZ, SPECS)["probabilities"].shape == (2, 3)


def test_csv_and_npy_carry_the_chosen_output() -> None:
    assert codec.encode_response(OUTS, codec.Encoding.CSV) == b"0\n2\n"
    assert codec.encode_response(OUTS, codec.Encoding.CSV, "probabilities") == (
        b"0.9,0.05,0.05\n0.1,0.2,0.7\n")
    npy = codec.encode_response(OUTS, codec.Encoding.NPY, "probabilities")
    np.testing.assert_array_equal(np.load(io.BytesIO(npy)), OUTS["probabilities"])


def test_the_answer_names_its_output_in_headers() -> None:
    raw = [(b"host", b"x"), (ATTRS, b"output=probabilities")]
    output, headers = invocations_output(codec.Encoding.CSV, SPECS, raw)
    assert output == "probabilities"
    assert headers == ((b"content-type", b"text/csv"),
                       (b"x-kubeinfer-output", b"probabilities"),
                       (ATTRS, b"output=probabilities"))
    # The default (first) output is named too: the caller learns there are others.
    assert invocations_output(codec.Encoding.NPY, SPECS, [])[1][1] == (
        b"x-kubeinfer-output", b"label")
    # JSON and .npz carry every output: only the content type.
    for enc in (codec.Encoding.JSON, codec.Encoding.NPZ):
        assert invocations_output(enc, SPECS, raw) == (None, ((b"content-type",
                                                              enc.content_type),))
    # A model of one output answers CSV as before, with no extra header.
    assert invocations_output(codec.Encoding.CSV, SPECS[:1], []) == (
        None, ((b"content-type", b"text/csv"),))


def test_output_names_are_made_safe_for_a_header() -> None:
    headers = answer_headers(codec.Encoding.CSV, "prob\u00e4 %\r\n")
    assert headers[1] == (b"x-kubeinfer-output", b"prob%C3%A4 %25%0D%0A")
