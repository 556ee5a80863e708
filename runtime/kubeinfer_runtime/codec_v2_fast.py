"""The commonest V2 ``infer`` requests decoded in as few steps as possible: PURE, no I/O.

What V2 clients send over and over is one shape of request: every input of a
numeric model once, under its own datatype, with a shape of the model's rank,
as JSON ``data`` or (``tritonclient``'s default) as binary data after a JSON
header. The general decoder (``codec_v2``) re-derives on every request what
such a request can only mean (which checks apply, which datatype to coerce
from, where each tensor lies) and builds a checked tensor twice (once as
declared, once as the model takes it). On a model that answers in a few µs
that is a third of a request's Python time; this lane decides those things
once, when the model loads, and then does only what the general decoder would
conclude anyway.

It never answers differently from the general decoder: for anything it cannot
vouch for without more work (another datatype, a shape to promote, parameters
it does not read, bad JSON, nulls or strings in ``data``, any size that does
not add up, a body that could decode past the bound) it returns None, and the
general decoder decodes the request again and explains the problem. What a
request says besides its inputs (requested outputs, binary answers, its id) is
read by the general decoder's own function (``codec_v2.v2_request``).

A client sends the same layout again and again: the same JSON around new
``data`` (or, with binary tensors, the very same JSON header before new bytes).
So once a request has been decoded, the lane keeps its layout as a template: the
bytes before and after the one input's ``data`` value (or the whole binary
header) and what they decoded to. A later body that starts and ends with the
same bytes and has one JSON value in between is the same document with other
``data`` (JSON's grammar leaves no other reading), so only that value is parsed.

tests/unit/test_v2_lane.py checks the lane against the general decoder over
many generated requests, templates included.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import orjson

from kubeinfer_runtime.codec_limits import DEFAULT_LIMITS, TEXT_ITEM_BYTES, DecodeLimits
from kubeinfer_runtime.codec_tensors import coerce, count_values
from kubeinfer_runtime.codec_v2 import V2Request, v2_request
from kubeinfer_runtime.codec_v2_binary import read_tensor
from kubeinfer_runtime.models.base import Array, ModelMetadata, TensorSpec, numpy_dtype, v2_datatype

#: (body, Inference-Header-Content-Length or None) -> the decoded request, or None:
#: let the general decoder take it.
V2Lane = Callable[[bytes, "int | None"], "V2Request | None"]

#: numpy's limit on array dimensions (as the general decoder's).
_MAX_DIMS = 64
#: A template that missed this many requests in a row is replaced by the next layout.
_RELEARN_AFTER = 16
_DATA_KEY = re.compile(rb'"data"\s*:\s*')
#: What may follow a value inside an object: a value before it cannot run on into it.
_AFTER_VALUE = (b"}", b",", b" ", b"\t", b"\n", b"\r")


class _Input:
    """What the lane needs of one model input, decided once."""

    __slots__ = ("datatype", "dtype", "float", "rank", "spec", "static")

    def __init__(self, spec: TensorSpec, datatype: str) -> None:
        self.spec = spec
        self.dtype = spec.dtype
        self.datatype = datatype
        #: None: any rank (the model declares no shape).
        self.rank = None if spec.shape is None else len(spec.shape)
        #: (position, size) of every static dimension.
        self.static = () if spec.shape is None else tuple(
            (i, d) for i, d in enumerate(spec.shape) if d is not None)
        #: A float input takes every bool, int and float array as it is (``coerce``'s rule).
        self.float = spec.dtype.kind == "f"


def _input(spec: TensorSpec) -> _Input | None:
    """The lane's view of one input, or None: no lane for the model."""
    if spec.dtype.kind not in "biuf":
        return None
    try:
        datatype = v2_datatype(spec.dtype)
    except ValueError:
        return None
    # Only the datatype that decodes to the model's own dtype: no second coercion.
    if numpy_dtype(datatype) != spec.dtype:
        return None
    return _Input(spec, datatype)


class _JsonTemplate(NamedTuple):
    """A JSON request's layout around its one input's ``data``, and what it decoded to."""

    prefix: bytes
    suffix: bytes
    name: str
    inp: _Input
    shape: list[int]
    size: int
    #: The request as decoded, its input aside.
    rest: V2Request


class _BinaryTemplate(NamedTuple):
    """A binary request's JSON header, and where each input's bytes lie after it."""

    header: bytes
    #: (name, input, shape, values, offset, byte size), in request order.
    layout: tuple[tuple[str, _Input, list[int], int, int, int], ...]
    binary_bytes: int
    rest: V2Request
    #: One numeric input whose wire bytes are the model's dtype as it is (little-endian,
    #: not BOOL): (name, dtype, shape, values), its bytes right after the header, read
    #: in one step; None: ``read_tensor`` reads each input.
    one: tuple[str, np.dtype[Any], tuple[int, ...], int] | None


class _Lane:
    """One model's lane: the decoder, and the last layouts it learned."""

    def __init__(self, meta: ModelMetadata, by_name: dict[str, _Input],
                 limits: DecodeLimits) -> None:
        self.meta = meta
        self.by_name = by_name
        self.count = len(by_name)
        self.order = [spec.name for spec in meta.inputs]
        self.max_bytes = limits.max_decoded_bytes
        self.small = limits.small_json_bytes
        self.json: _JsonTemplate | None = None
        self.binary: _BinaryTemplate | None = None
        self.json_misses = self.binary_misses = 0

    def decode(self, body: bytes, header_length: int | None) -> V2Request | None:
        """The request, or None: the general decoder takes it."""
        if len(body) > self.max_bytes:
            return None
        try:
            if header_length is None:
                t = self.json
                if t is not None:
                    if body.startswith(t.prefix) and body.endswith(t.suffix) \
                            and len(body) > len(t.prefix) + len(t.suffix):
                        req = self._from_json_template(t, body)
                        if req is not None:
                            return req
                    self.json_misses += 1
                return self._parse(body, None)
            b = self.binary
            if b is not None:
                if header_length == len(b.header) and body.startswith(b.header):
                    one = b.one
                    if one is None:
                        return self._from_binary_template(b, body)
                    if len(body) != header_length + b.binary_bytes:
                        return None
                    name, dtype, shape, size = one
                    # read_tensor's answer for this input, in one step: a copy (aligned,
                    # writable, independent of the body) of the bytes as they are.
                    rest = b.rest
                    return V2Request({name: np.frombuffer(body, dtype, size, header_length)
                                      .reshape(shape).copy()},
                                     rest.output_names, rest.id, rest.binary_outputs)
                self.binary_misses += 1
            return self._parse(body, header_length)
        except Exception:
            # Bad JSON, ragged data, a value that changes meaning when coerced,
            # sizes that do not add up, memory: the general decoder explains it.
            return None

    def _from_json_template(self, t: _JsonTemplate, body: bytes) -> V2Request | None:
        start, end = len(t.prefix), len(body) - len(t.suffix)
        data = orjson.loads(body[start:end])
        n = len(body)
        if n > self.small and (count_values(data) != t.size
                               or t.size * 4 * max(n, 64) > self.max_bytes):
            return None
        inp = t.inp
        find = body.find
        if inp.float and find(b".", start, end) >= 0 and find(b'"', start, end) < 0 \
                and find(b"u", start, end) < 0:
            # Numbers only (no string, no null), one a float: numpy would find float64
            # for all of them and cast, which converting straight to the datatype does
            # without the search (codec.fast_float_json says more; same result).
            arr = np.asarray(data, dtype=inp.dtype)
            if arr.size != t.size:
                return None
        else:
            arr = np.array(data)
            if arr.dtype.kind not in "biuf" or arr.size != t.size:
                return None
            arr = arr.astype(inp.dtype) if inp.float else coerce(arr, inp.spec)
        rest = t.rest
        return V2Request({t.name: arr.reshape(t.shape)}, rest.output_names, rest.id,
                         rest.binary_outputs)

    def _from_binary_template(self, b: _BinaryTemplate, body: bytes) -> V2Request | None:
        view = memoryview(body)[len(b.header):]
        if len(view) != b.binary_bytes:
            return None
        tensors: dict[str, Array] = {}
        for name, inp, shape, size, offset, nbytes in b.layout:
            tensors[name] = read_tensor(name, inp.dtype, shape, size,
                                        view[offset:offset + nbytes])
        if self.count > 1:
            tensors = {name: tensors[name] for name in self.order}
        rest = b.rest
        return V2Request(tensors, rest.output_names, rest.id, rest.binary_outputs)

    def _parse(self, body: bytes, header_length: int | None) -> V2Request | None:
        """Decode a request of a layout not seen last (and learn it)."""
        n = len(body)
        binary: memoryview | None = None
        if header_length is None:
            doc = orjson.loads(body)
            text_bytes = n
        else:
            if header_length > n:
                return None
            view = memoryview(body)
            doc = orjson.loads(view[:header_length])
            binary = view[header_length:]
            text_bytes = header_length
        if type(doc) is not dict:
            return None
        items = doc.get("inputs")
        if type(items) is not list or len(items) != self.count:
            return None
        tensors: dict[str, Array] = {}
        layout = []
        total = offset = depth = 0
        for item in items:
            if type(item) is not dict:
                return None
            name = item.get("name")
            if type(name) is not str:
                return None
            inp = self.by_name.get(name)
            if inp is None or name in tensors:
                return None
            shape = item.get("shape")
            if item.get("datatype") != inp.datatype or type(shape) is not list:
                return None
            rank = inp.rank
            if len(shape) != (len(shape) if rank is None else rank) or len(shape) > _MAX_DIMS:
                return None  # the general decoder may promote it, or explains why not
            for d in shape:
                if type(d) is not int or d < 0:
                    return None
            for i, d in inp.static:
                if shape[i] != d:
                    return None
            size = math.prod(shape)
            total += size
            if total * TEXT_ITEM_BYTES > self.max_bytes:
                return None
            params = item.get("parameters")
            if binary is None:
                data = item.get("data")
                if params is not None or data is None or count_values(data) != size:
                    return None
                # The general decoder looks for strings (which make numpy allocate
                # for every value as wide as the longest) before numpy sees them.
                if text_bytes > self.small and size * 4 * max(text_bytes, 64) > self.max_bytes:
                    return None
                arr = np.array(data)
                if arr.dtype.kind not in "biuf" or arr.size != size:
                    return None
                depth = arr.ndim
                arr = arr.astype(inp.dtype) if inp.float else coerce(arr, inp.spec)
                tensors[name] = arr.reshape(shape)
                continue
            if type(params) is not dict or item.get("data") is not None:
                return None
            nbytes = params.get("binary_data_size")
            if type(nbytes) is not int or nbytes < 0 or nbytes > len(binary) - offset:
                return None
            tensors[name] = read_tensor(name, inp.dtype, shape, size,
                                        binary[offset:offset + nbytes])
            layout.append((name, inp, shape, size, offset, nbytes))
            offset += nbytes
        if binary is not None and offset != len(binary):
            return None
        if self.count > 1:
            tensors = {name: tensors[name] for name in self.order}
        req = (V2Request(tensors, None, None, None) if len(doc) == 1  # "inputs" alone
               else v2_request(doc, tensors, self.meta))
        if binary is None:
            if self.count == 1 and depth > 0 and (self.json is None
                                                  or self.json_misses >= _RELEARN_AFTER):
                self._learn_json(body, doc, req, depth)
        elif self.binary is None or self.binary_misses >= _RELEARN_AFTER:
            rest = req._replace(inputs={})
            one = None
            if len(layout) == 1:  # its size was checked by read_tensor
                name, inp, shape, size, _, _ = layout[0]
                dtype = inp.dtype
                if dtype.kind != "b" and dtype.newbyteorder("<") == dtype:
                    one = (name, dtype, tuple(shape), size)
            self.binary = _BinaryTemplate(bytes(body[:header_length]), tuple(layout),
                                          offset, rest, one)
            self.binary_misses = 0
        return req

    def _learn_json(self, body: bytes, doc: dict[str, Any], req: V2Request,
                    depth: int) -> None:
        """Keep the bytes around the one input's ``data`` (an array ``depth`` deep)."""
        keys = _DATA_KEY.findall(body)
        if len(keys) != 1:
            return  # "data" elsewhere too (or escaped): not worth telling apart
        m = _DATA_KEY.search(body)
        assert m is not None
        start = m.end()
        # The data holds only numbers, true/false, commas, brackets and spaces (it
        # decoded to a numeric array), so the first run of ``depth`` closing brackets
        # after its start closes it: runs inside it are shorter.
        close = re.compile(rb"\]" + rb"\s*\]" * (depth - 1)).search(body, start)
        if close is None:
            return
        prefix, suffix = body[:start], body[close.end():]
        if suffix[:1] not in _AFTER_VALUE:
            return
        # Check the cut: the same bytes around another value must read as this
        # document with that value as the input's data, and nothing else changed.
        item = doc["inputs"][0]
        other = orjson.loads(prefix + b"0" + suffix)
        expected = {**doc, "inputs": [{**item, "data": 0}]}
        if orjson.dumps(other) != orjson.dumps(expected):
            return
        name = item["name"]
        self.json = _JsonTemplate(prefix, suffix, name, self.by_name[name], item["shape"],
                                  math.prod(item["shape"]), req._replace(inputs={}))
        self.json_misses = 0


def build_v2_lane(meta: ModelMetadata, limits: DecodeLimits = DEFAULT_LIMITS) -> V2Lane | None:
    """The lane for a model whose inputs are all numeric; None for others (strings)."""
    if not meta.inputs:
        return None
    found = [_input(spec) for spec in meta.inputs]
    by_name = {i.spec.name: i for i in found if i is not None}
    if len(by_name) != len(meta.inputs):
        return None
    return _Lane(meta, by_name, limits).decode
