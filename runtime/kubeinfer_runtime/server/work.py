"""The work of one inference request, and what its answer's headers say: PURE but for predict.

Decode -> predict -> encode as one plain function per protocol
(:func:`invocations_work`, :func:`v2_work`): called directly when the model
runs inline, or handed to the inference pool whole (one thread hop for all
three steps). Every route serving a model uses them (single-model and
multi-model hot paths, pipeline steps, the async worker), so each protocol is
answered alike everywhere. What a success carries besides its body is decided
here too: its content type; for CSV and .npy, which carry one output, that
output's name (chosen from CustomAttributes ``output=``); for a V2 answer with
binary outputs, ``Inference-Header-Content-Length``.
"""

from __future__ import annotations

import time
from functools import lru_cache
from urllib.parse import quote

from kubeinfer_runtime import codec
from kubeinfer_runtime.codec_v2_binary import HEADER_LENGTH, OCTET_STREAM, parse_header_length
from kubeinfer_runtime.errors import Headers, ValidationError
from kubeinfer_runtime.models.base import TensorSpec
from kubeinfer_runtime.server.state import LoadedModel
from kubeinfer_runtime.wire import H_CUSTOM_ATTRIBUTES

_JSON = b"application/json"
_CUSTOM_ATTRIBUTES = H_CUSTOM_ATTRIBUTES.encode()
#: A success's headers, Content-Length aside (added last, by :func:`ok_headers`).
OutHeaders = tuple[tuple[bytes, bytes], ...]
V2_JSON: OutHeaders = ((b"content-type", _JSON),)
#: The response header naming the output a CSV or .npy answer carries.
H_OUTPUT = b"x-kubeinfer-output"
#: Characters an output name keeps in a header value; the rest are percent-encoded.
_HEADER_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")


def invocations_work(model: LoadedModel, body: bytes | bytearray, content_type: str | None,
                     encoding: codec.Encoding,
                     limits: codec.DecodeLimits = codec.DEFAULT_LIMITS,
                     output: str | None = None) -> tuple[bytes, float]:
    """``output``: the one output a CSV or .npy answer carries (only it is computed)."""
    inputs = codec.decode_request(body, content_type, model.meta.inputs, limits)
    t0 = time.perf_counter()
    outputs = model.backend.predict(inputs, None if output is None else (output,))
    model_s = time.perf_counter() - t0
    return codec.encode_response(outputs, encoding, output), model_s


def v2_work(model: LoadedModel, body: bytes, model_name: str,
            limits: codec.DecodeLimits = codec.DEFAULT_LIMITS,
            header_length: int | None = None,
            lane: bool = False) -> tuple[bytes, float, OutHeaders]:
    """``header_length``: the request's Inference-Header-Content-Length (binary extension).

    ``lane``: decode with the model's V2 lane (``codec_v2_fast``) when it takes the
    request. The inline HTTP path asks for it; the ASGI path does not, so that
    serving one request both ways compares the lane with the general decoder.
    """
    fast = model.v2_lane if lane else None
    req = fast(body, header_length) if fast is not None else None
    if req is None:
        req = codec.decode_v2(body, model.meta, limits, header_length)
    t0 = time.perf_counter()
    outputs = model.backend.predict(req.inputs, req.output_names)
    model_s = time.perf_counter() - t0
    if req.binary_outputs is None:
        return codec.encode_v2(outputs, model_name, model.version, req.id), model_s, V2_JSON
    payload, json_length = codec.encode_v2_binary(outputs, model_name, model.version, req.id,
                                                  req.binary_outputs)
    return payload, model_s, _binary_headers(json_length)


@lru_cache(maxsize=256)
def _binary_headers(json_length: int) -> OutHeaders:
    """A binary answer's headers: a client's answers mostly share one header length."""
    return (b"content-type", OCTET_STREAM), (HEADER_LENGTH, str(json_length).encode())


def invocations_output(encoding: codec.Encoding, outputs: tuple[TensorSpec, ...],
                       raw_headers: list[tuple[bytes, bytes]]) -> tuple[str | None, OutHeaders]:
    """(the output a CSV or .npy answer carries, the answer's headers); raises the 400.

    JSON and .npz carry every output: (None, content type). CSV and .npy carry
    the one named by CustomAttributes ``output=``, else the first, and say
    which (None, as before, for a model of one output when none was named).
    """
    if not encoding.one_output:
        return None, encoding.headers
    attributes = next((v.decode("latin-1") for k, v in raw_headers
                       if k == _CUSTOM_ATTRIBUTES), None)
    output = codec.chosen_output(attributes, outputs)
    return output, answer_headers(encoding, output)


@lru_cache(maxsize=256)
def answer_headers(encoding: codec.Encoding, output: str | None) -> OutHeaders:
    """Content type, and for a chosen output ``X-Kubeinfer-Output`` and CustomAttributes
    ``output=<name>`` (what the gateway passes on and boto3 shows as CustomAttributes)."""
    if output is None:
        return encoding.headers
    content_type = (b"content-type", encoding.content_type)
    value = quote(output, safe=_HEADER_SAFE).encode("ascii")
    return content_type, (H_OUTPUT, value), (_CUSTOM_ATTRIBUTES, b"output=" + value)


def v2_headers(raw: list[tuple[bytes, bytes]]) -> tuple[str | None, int | None, int | None]:
    """(Content-Type, Content-Length, Inference-Header-Content-Length) of a V2 request.

    One pass, as many comparisons per header as for ``/invocations``: V2 has
    no Accept to read (the request's body says how to answer).
    """
    content_type = None
    length = header_length = None
    for k, v in raw:
        if k == b"content-type":
            content_type = v.decode("latin-1")
        elif k == b"content-length":
            try:
                length = int(v)
            except ValueError:
                raise ValidationError("Content-Length is not a number") from None
        elif k == HEADER_LENGTH:
            header_length = parse_header_length(v)
    return content_type, length, header_length


def ok_headers(headers: OutHeaders, payload: bytes) -> Headers:
    """A success's headers, in one order on both paths: ``headers``, then Content-Length."""
    return [*headers, (b"content-length", str(len(payload)).encode())]
