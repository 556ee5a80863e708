"""No error message ever quotes the request's content.

An async worker once read ``/proc/self/environ`` as CSV and its failure object
said ``CSV row 1 column 1 is not a number: 'AWS_SECRET_ACCESS_KEY=...'``.
Every decoder (JSON, CSV, .npy, .npz, V2, and the async worker's path through
``invocations_work`` into a failure object) runs here over malformed bodies
that carry a marker in every place a body can hold bytes: values, keys, input
and output names, datatypes, shapes, CSV cells, .npy headers and data, .npz
member names, contents and comments. Whatever the decoder answers, the marker
is not in it, and only the runtime's typed errors come out (never a 500).
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubeinfer_runtime import codec
from kubeinfer_runtime.errors import RuntimeServiceError
from kubeinfer_runtime.models.base import ModelMetadata, TensorSpec
from kubeinfer_runtime.models.onnx import OnnxBackend
from kubeinfer_runtime.queue.request import AsyncRequest, failure_body
from kubeinfer_runtime.server.hotpath import invocations_work, v2_work
from kubeinfer_runtime.server.state import LoadedModel
from tests.support.decode_bombs import npy, npy_header, npz

MARK = "SECRET-MARKER-1234"
M = MARK.encode()
X = TensorSpec("X", np.dtype(np.float32), (None, 4))
A = TensorSpec("a", np.dtype(np.float32), (None, 2))
B = TensorSpec("b", np.dtype(np.int64), (None,))
TEXT = TensorSpec("text", np.dtype(object), (None,))
FLAG = TensorSpec("flag", np.dtype(np.bool_), (None,))
SPECS: list[tuple[TensorSpec, ...]] = [(X,), (A, B), (TEXT,), (FLAG,), (B,)]
META = ModelMetadata((X,), (TensorSpec("label", np.dtype(np.int64), (None,)),), "test")
TYPES = ["application/json", "text/csv", "application/x-npy", "application/x-npz",
         "application/octet-stream", None]


def _v2(**item: Any) -> bytes:
    base: dict[str, Any] = {"name": "X", "shape": [1, 4], "datatype": "FP32",
                            "data": [1, 2, 3, 4]}
    return orjson.dumps({"inputs": [{**base, **item}]})


def _zip_with_comment(comment: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("X.npy", npy(np.zeros((1, 4), np.float32)))
        zf.comment = comment
    return buf.getvalue()


def _bodies() -> Iterator[bytes]:
    """Malformed bodies with the marker in every place a body holds bytes."""
    s = MARK
    docs: list[Any] = [
        [[s, 1, 2, 3]], [[1, 2, 3, s]], {"instances": [[s] * 4]}, {"instances": s},
        {"instances": [{s: [1, 2]}]}, {"instances": [{"a": [1, 2], s: 1}]}, {s: [[1, 2, 3, 4]]},
        {"inputs": {s: [[1, 2, 3, 4]]}}, {"inputs": {"X": [[1, 2, 3, 4]], s: [1]}},
        {"inputs": {"X": s}}, {"inputs": {"X": [[1, 2], [s]]}}, {"inputs": [s]},
        {"inputs": {"a": [[s, 1]], "b": [s]}}, [s], [[None, s, 1, 2]], [{"x": s}],
        [[1, 2, 3, 4], [s]], [["x" * 5000 + s] + [""] * 10_000], [s * 2000] * 3,
        [[1.5, 2, 3, 4], [1, 2, 3, 4]], [[10**18, 2, 3, 4]], [[True, s]], {"instances": [[[s]]]},
    ]
    yield from (orjson.dumps(d) for d in docs)
    yield from (
        _v2(name=s), _v2(datatype=s), _v2(shape=s), _v2(shape=[s, 4]), _v2(data=s),
        _v2(data=[s, 1, 2, 3]), _v2(data=[[1, 2], [s]]), _v2(datatype="BYTES", data=[s] * 4),
        _v2(parameters={"binary_data_size": s}), _v2(shape=[2, 4]),
        orjson.dumps({"inputs": [{"name": s, "shape": [1], "datatype": "FP32", "data": [1]},
                                 {"name": s, "shape": [1], "datatype": "FP32", "data": [1]}]}),
        orjson.dumps({"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32",
                                  "data": [1, 2, 3, 4]}], "outputs": [{"name": s}]}),
        orjson.dumps({"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32",
                                  "data": [1, 2, 3, 4]}], "outputs": s}),
    )
    # Not JSON at all, or JSON then more.
    yield from (b"{" + M, b"[1, " + M + b"]", b'["' + M + b'\xff"]', b"[1]" + M,
                b'{"a": "' + M + b'\\ud800"}', b"\xef\xbb\xbf" + M, M)
    # CSV: the /proc/self/environ accident, header rows, bad cells, bad UTF-8.
    yield from (b"AWS_SECRET_ACCESS_KEY=" + M + b"\x00PATH=/usr/bin\x00",
                b"a,b,c," + M + b"\n1,2,3,4\n", b"1,2,3,4\n1,2," + M + b",4\n",
                b"1,2,3,4\n" + M + b"\n", b"1,2,\xff" + M + b",4\n", M + b"," + M)
    # .npy: marker in the header's every field, as data, and as a pickle.
    header = npy_header((1, 4))
    yield from (
        header.replace(b"'<f4'", b"'" + M + b"'"),
        header.replace(b"(1, 4)", b"('" + M + b"', 4)"),
        header.replace(b"False", b"'" + M + b"'"),
        header.replace(b"'shape'", b"'" + M + b"'"),
        header[:-len(M) - 2] + M + b"\n",
        header + M,
        header + bytes(16) + M,
        npy_header((1, 4), "<U18") + M * 4,
        _pickle_npy(),
        b"\x93NUMPY" + M,
    )
    # .npz: marker as member names, contents, nested paths, duplicates, comment.
    good = npy(np.zeros((1, 4), np.float32))
    yield from (
        npz({s + ".npy": good}), npz({f"dir/{s}.npy": good}), npz({s: good}),
        npz({"X.npy": M}), npz({"X.npy": header + M}), npz({"X.npy": good, s + ".npy": good}),
        npz({s + ".npy": good, "Y.npy": good}).replace(b"Y.npy", (s + ".npy").encode()[-5:]),
        _zip_with_comment(M), b"PK\x03\x04" + M, npz({"X.npy": good})[:-30] + M,
    )


def _pickle_npy() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([{MARK: MARK}], dtype=object), allow_pickle=True)
    return buf.getvalue()


def _assert_no_echo(fn: Callable[[], Any]) -> None:
    try:
        fn()
    except RuntimeServiceError as e:
        assert "SECRET-MARKER" not in e.message, e.message
        assert "SECRET-MARKER" not in repr(e)
        assert 400 <= e.status < 500, e


BODIES = list(_bodies())


@pytest.mark.parametrize("index", range(len(BODIES)))
def test_no_decoder_quotes_the_body(index: int) -> None:
    body = BODIES[index]
    for ct in TYPES:
        for inputs in SPECS:
            _assert_no_echo(lambda: codec.decode_request(body, ct, inputs))  # noqa: B023
    _assert_no_echo(lambda: codec.decode_v2(body, META))
    for inputs in SPECS:
        if len(inputs) == 1 and inputs[0].dtype.kind == "f" and inputs[0].batch_tail:
            codec.fast_float_json(body, inputs[0], inputs[0].batch_tail)  # None or an array


@pytest.fixture(scope="module")
def iris(models_dir: Path) -> LoadedModel:
    backend = OnnxBackend()
    backend.load(models_dir / "iris.onnx")
    return LoadedModel(backend, backend.metadata(), "0" * 64, True, None)


def test_async_worker_failure_objects_never_quote_the_input(iris: LoadedModel) -> None:
    """The worker's path: ``invocations_work`` on the object's bytes, then the failure object."""
    req = AsyncRequest(inference_id="i-1", endpoint="e", input_location="s3://in/x",
                       output_location="s3://out/i-1.out", failure_location="s3://out/i-1.err",
                       content_type="", accept="", custom_attributes="", received_at=0.0,
                       expires_at=1e12, invocation_timeout_s=60.0)
    limits = codec.DecodeLimits.for_settings(6 << 20, None)
    failures = 0
    for body in BODIES:
        for ct in TYPES:
            try:
                invocations_work(iris, body, ct, codec.Encoding.JSON, limits)
            except RuntimeServiceError as e:
                failures += 1
                doc = failure_body(req, e.code, e.message, 1)
                assert b"SECRET-MARKER" not in doc, doc
        _assert_no_echo(lambda: v2_work(iris, body, "iris", limits))  # noqa: B023
    assert failures > len(BODIES)  # the bodies really are malformed


# ------------------------------------------------------------------ property tests

_KEYS = st.sampled_from([MARK, "instances", "inputs", "outputs", "X", "a", "b", "name",
                         "shape", "datatype", "data", "parameters", "binary_data_size"])
_LEAVES = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
           | st.floats(allow_nan=False, allow_infinity=False) | st.just(MARK)
           | st.sampled_from(["FP32", "BYTES", "INT64", MARK * 3]))
_JSON = st.recursive(_LEAVES, lambda inner: st.lists(inner, max_size=5)
                     | st.dictionaries(_KEYS, inner, max_size=5), max_leaves=25)
_SEEDS = [orjson.dumps({"instances": [[1, 2, 3, 4]]}), _v2(), b"1,2,3,4\n5,6,7,8\n",
          npy(np.zeros((2, 4), np.float32)),
          npz({"X.npy": npy(np.zeros((2, 4), np.float32))})]
# Bounded so the unit suite stays fast; no example database left in the checkout.
_PROPERTY = settings(max_examples=200, deadline=None, database=None,
                     suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@_PROPERTY
@given(doc=_JSON)
def test_json_and_v2_documents_never_echo(doc: Any) -> None:
    body = orjson.dumps(doc)
    for inputs in SPECS:
        _assert_no_echo(lambda: codec.decode_request(body, "application/json", inputs))  # noqa: B023
    _assert_no_echo(lambda: codec.decode_v2(body, META))


@_PROPERTY
@given(seed=st.sampled_from(_SEEDS), at=st.integers(0, 10_000), cut=st.integers(0, 64),
       ct=st.sampled_from(TYPES))
def test_marker_spliced_into_any_body_never_echoes(seed: bytes, at: int, cut: int,
                                                   ct: str | None) -> None:
    at %= len(seed) + 1
    body = seed[:at] + M + seed[at + cut:]
    for inputs in SPECS:
        _assert_no_echo(lambda: codec.decode_request(body, ct, inputs))  # noqa: B023
    _assert_no_echo(lambda: codec.decode_v2(body, META))
