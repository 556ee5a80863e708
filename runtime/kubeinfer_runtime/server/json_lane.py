"""The commonest inference request as one function, built once per loaded model.

Most traffic to a real-time endpoint is the same request over and over: one
float input ``[N, static...]``, a JSON body (``{"instances": [...]}`` or a
plain nested list), a JSON answer. The general path (``codec.decode_request``
→ ``Backend.predict`` → ``codec.encode_response``) decides the content type,
the input layout and the encoding again on every request; the lane decides
them once, when the model loads, and binds what it needs. It saves ~2.7 µs of
a 30 µs request to a small model measured in-process (docs/benchmarks.md): on
this path a few µs are several percent of throughput.

The lane never answers differently from the general path: it uses the same
codec fast path and encoder, and returns None for anything else (other input
layouts, bad JSON, nulls, strings, another shape), so the general path decodes
it again and explains the problem.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from kubeinfer_runtime import codec
from kubeinfer_runtime.models.base import Backend, ModelMetadata

#: body -> (JSON response body, model seconds), or None: take the general path.
JsonLane = Callable[[bytes], "tuple[bytes, float] | None"]

#: Request content types the lane reads (media types, as ``codec.media_type`` gives).
LANE_CONTENT_TYPES = frozenset({"", codec.JSON})


def build_json_lane(backend: Backend, meta: ModelMetadata,
                    limits: codec.DecodeLimits = codec.DEFAULT_LIMITS) -> JsonLane | None:
    """The lane for a model with one float input ``[N, static...]``; None for others.

    ``limits`` bound what a body may decode to, as on the general path: bodies
    the lane cannot vouch for without walking them go to the general path.
    """
    if len(meta.inputs) != 1:
        return None
    spec = meta.inputs[0]
    tail = spec.batch_tail
    if spec.dtype.kind != "f" or tail is None:
        return None
    name = spec.name
    decode = codec.fast_float_json
    encode = codec.encode_response
    json = codec.Encoding.JSON
    predict = backend.predict
    perf = time.perf_counter

    def lane(body: bytes) -> tuple[bytes, float] | None:
        arr = decode(body, spec, tail, limits)
        if arr is None:
            return None
        t0 = perf()
        outputs = predict({name: arr})
        model_s = perf() - t0
        return encode(outputs, json), model_s

    return lane
