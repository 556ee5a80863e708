"""Decoding Open Inference Protocol V2 ``infer`` requests: PURE, no I/O.

Its own module because V2 carries what the other formats do not: a declared
``shape`` and ``datatype`` per input, and names chosen by the client. The
shape is checked against the decode bound before anything is built (a 40-byte
input claiming shape [10**12] is a 413, not an allocation), every input name
is checked against the model before any tensor is built, and a name the model
does not declare is described by its position, never quoted. Tensors come as
JSON ``data`` or, with the binary data extension, as raw bytes after a JSON
header (``codec_v2_binary``); both go through the same checks. Encoding V2
responses lives with the other encoders in ``codec_encode``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from kubeinfer_runtime.codec_limits import (
    DEFAULT_LIMITS,
    TEXT_ITEM_BYTES,
    DecodeLimits,
    out_of_memory,
    too_large,
    undecodable,
)
from kubeinfer_runtime.codec_tensors import (
    NotRectangular,
    check_names,
    coerce,
    count_values,
    json_array,
    load_json,
    mismatch,
    to_tensor,
)
from kubeinfer_runtime.codec_v2_binary import (
    binary_layout,
    binary_outputs,
    no_header,
    read_tensor,
    split_body,
)
from kubeinfer_runtime.errors import RuntimeServiceError, ValidationError
from kubeinfer_runtime.models.base import Array, ModelMetadata, Tensors, TensorSpec, numpy_dtype

_DATATYPES = "BOOL, INT8..INT64, UINT8..UINT64, FP16, FP32, FP64 or BYTES"
#: numpy's limit on array dimensions.
_MAX_DIMS = 64


class V2Request(NamedTuple):
    """A decoded V2 ``infer`` request (a tuple: built per request, cheaper than a dataclass)."""

    inputs: Tensors
    #: Requested outputs, or None for all of them.
    output_names: list[str] | None
    id: str | None
    #: Outputs to answer as binary data (the binary extension); None: every one as JSON.
    binary_outputs: frozenset[str] | None = None


def decode_v2(body: bytes, meta: ModelMetadata, limits: DecodeLimits = DEFAULT_LIMITS,
              header_length: int | None = None) -> V2Request:
    """Decode a V2 ``infer`` request and check it against the model's metadata.

    ``header_length``: the request's ``Inference-Header-Content-Length`` (the
    binary data extension: the JSON is that many bytes, binary tensors follow);
    None: the whole body is JSON. Raises ``ValidationError`` (400) for bad
    input and ``PayloadTooLarge`` (413) when the body would decode past
    ``limits``; nothing else escapes.
    """
    if len(body) > limits.max_decoded_bytes:
        raise too_large("Request body", len(body), limits)
    try:
        return _decode_v2(body, meta, limits, header_length)
    except RuntimeServiceError:
        raise
    except MemoryError:
        raise out_of_memory(limits) from None
    except Exception as e:  # whatever hostile bytes make a parser raise: a 400, never a 500
        raise undecodable("a V2 request", e) from None


def _decode_v2(body: bytes, meta: ModelMetadata, limits: DecodeLimits,
               header_length: int | None) -> V2Request:
    binary: memoryview | None = None
    if header_length is None:
        try:
            doc = load_json(body)
        except ValidationError as e:
            if "not valid JSON" not in e.message:
                raise
            raise ValidationError(f"{e.message}, or binary tensors after a JSON header whose "
                                  "length Inference-Header-Content-Length gives") from None
        text_bytes = len(body)
    else:
        head, binary = split_body(body, header_length)
        doc = load_json(head)
        text_bytes = header_length
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list) or not doc["inputs"]:
        raise ValidationError('V2 request must be a JSON object with a non-empty "inputs" list '
                              'of {"name", "shape", "datatype", "data"}')
    inputs = decode_v2_inputs(doc["inputs"], meta.inputs, limits, text_bytes, binary)
    return v2_request(doc, inputs, meta)


def v2_request(doc: dict[str, Any], inputs: Tensors, meta: ModelMetadata) -> V2Request:
    """The request around its decoded ``inputs``: requested outputs (JSON or binary), id.

    Shared with the fast lane (``codec_v2_fast``), which decodes only the inputs
    its own way: everything else a request says is read here, once, for both.
    """
    output_names: list[str] | None = None
    outs: list[dict[str, Any]] | None = None
    if doc.get("outputs") is not None:
        outs = doc["outputs"]
        if not isinstance(outs, list) or not all(
            isinstance(o, dict) and isinstance(o.get("name"), str) for o in outs
        ):
            raise ValidationError('V2 "outputs" must be a list of {"name": "<output>"}')
        output_names = [o["name"] for o in outs]
        known = [t.name for t in meta.outputs]
        unknown = [str(i) for i, n in enumerate(output_names) if n not in known]
        if unknown:
            which = (f"Requested output {unknown[0]} is not an output" if len(unknown) == 1
                     else f"Requested outputs {', '.join(unknown)} are not outputs")
            raise ValidationError(f'{which} of the model (counting "outputs" from 0): it has '
                                  + ", ".join(f'"{n}"' for n in known))
    rid = doc.get("id")
    # Plain JSON in and out, the common case, decides this without a call.
    as_binary = (None if outs is None and "parameters" not in doc
                 else binary_outputs(doc, outs, meta.outputs))
    return V2Request(inputs, output_names, None if rid is None else str(rid), as_binary)


def decode_v2_inputs(items: list[Any], inputs: Sequence[TensorSpec],
                     limits: DecodeLimits = DEFAULT_LIMITS, text_bytes: int | None = None,
                     binary: memoryview | None = None) -> Tensors:
    """V2 ``inputs`` items to checked tensors.

    ``text_bytes``: the JSON text's length; ``binary``: the bytes after the JSON
    header (binary data extension), None when the request has no header.
    """
    by_name: dict[str, dict[str, Any]] = {}
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ValidationError(f'V2 input {i} must be an object with a "name"')
        name = item["name"]
        if name in by_name:
            raise _twice(name, items, i, inputs)
        by_name[name] = item
    # Every name is now one of the model's inputs: messages may quote them.
    check_names(by_name.keys(), inputs)
    layout = None if binary is None else binary_layout(by_name, len(binary))
    raw: Tensors = {}
    total = 0
    for name, item in by_name.items():
        shape = item.get("shape")
        if (not isinstance(shape, list) or len(shape) > _MAX_DIMS
                or not all(type(d) is int and d >= 0 for d in shape)):
            raise ValidationError(f'V2 input "{name}" needs "shape": a list of at most '
                                  f"{_MAX_DIMS} non-negative ints")
        count = math.prod(shape)
        total += count
        # Before anything of this input is built; what came before is within the bound.
        if total * TEXT_ITEM_BYTES > limits.max_decoded_bytes:
            what = (f'V2 input "{name}" ({count} values by its "shape")' if total == count
                    else f'V2 inputs up to "{name}" ({total} values by their "shape")')
            raise too_large(what, total * TEXT_ITEM_BYTES, limits)
        chunk = None
        if layout is not None and binary is not None and name in layout:
            start, size = layout[name]
            chunk = binary[start:start + size]
        raw[name] = _v2_tensor(name, item, shape, count, limits, text_bytes, chunk)
    return {spec.name: to_tensor(raw[spec.name], spec, limits) for spec in inputs}


def _twice(name: str, items: list[Any], i: int, inputs: Sequence[TensorSpec]) -> ValidationError:
    if any(t.name == name for t in inputs):
        which = f'V2 input "{name}" is'
    else:  # not the model's: by position, never quoted
        first = next(j for j, it in enumerate(items) if it.get("name") == name)
        which = f"V2 inputs {first} and {i} are"
    return ValidationError(f"{which} given twice: send each input once")


def _v2_tensor(name: str, item: dict[str, Any], shape: list[int], expected: int,
               limits: DecodeLimits, text_bytes: int | None, chunk: memoryview | None) -> Array:
    """One input's array (``chunk``: its binary data, None when it comes as JSON)."""
    datatype, data = item.get("datatype"), item.get("data")
    if chunk is None:
        params = item.get("parameters")
        if isinstance(params, dict) and "binary_data_size" in params:
            raise no_header(name)
    dtype = numpy_dtype(datatype) if isinstance(datatype, str) else None
    if dtype is None:
        raise ValidationError(f'V2 input "{name}" has an unknown "datatype": use {_DATATYPES}')
    if chunk is not None:
        if data is not None:
            raise ValidationError(f'V2 input "{name}" has both "data" and '
                                  "parameters.binary_data_size: send one of them")
        return read_tensor(name, dtype, shape, expected, chunk)
    if data is None:
        raise ValidationError(f'V2 input "{name}" needs "data"')
    given = count_values(data)
    if given != expected:
        raise _count_mismatch(name, given, shape, expected)
    declared = TensorSpec(name, dtype, None)
    if dtype.kind == "O":
        try:
            arr = np.array(data, dtype=object)
        except (ValueError, TypeError, RecursionError):
            raise _ragged(name) from None
    else:
        try:
            arr = json_array(data, declared, limits, text_bytes)
        except NotRectangular:
            raise _ragged(name) from None
        if arr.dtype.kind == "O":
            raise mismatch(arr, declared)
        arr = coerce(arr, declared)
    if arr.size != expected:
        raise _count_mismatch(name, arr.size, shape, expected)
    return arr.reshape(shape)


def _ragged(name: str) -> ValidationError:
    return ValidationError(f'V2 input "{name}" "data" is not a rectangular array: send a flat '
                           "list, or nested lists of equal length")


def _count_mismatch(name: str, given: int, shape: list[int], expected: int) -> ValidationError:
    return ValidationError(f'V2 input "{name}" has {given} values in "data" but "shape" '
                           f"{shape} needs {expected}")
