"""The V2 binary tensor data extension (KServe / Triton): PURE, no I/O.

Stock Open Inference Protocol clients (``tritonclient.http`` with its defaults)
send tensors as raw bytes after the JSON request and ask for the outputs the
same way. ``Inference-Header-Content-Length: N`` says the first N bytes of the
body are the JSON header; each input with ``parameters.binary_data_size``
takes that many bytes from the rest, in the order of ``inputs``. Fixed-size
datatypes are little-endian in C order (BOOL one byte each); a BYTES element
is a 4-byte little-endian length and that many bytes. Outputs come back the
same way when the request asks (``parameters.binary_data_output`` for all,
``outputs[].parameters.binary_data`` for one).

Its own module because raw bytes need bounds JSON never needed: every size the
request declares is checked against the bytes actually present and against
shape x datatype before anything is read, and nothing is ever allocated from
a declared size (tensors are read from the body where they lie, then copied
at their checked size). The decode limit applies as for JSON tensors:
``codec_v2`` counts every value from its ``shape`` first. Messages quote only
the model's own input and output names (checked before), never the body.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import orjson

from kubeinfer_runtime.errors import ValidationError
from kubeinfer_runtime.models.base import Array, TensorSpec, v2_datatype

#: The request and response header carrying the JSON header's length (as ASGI spells it).
HEADER_LENGTH = b"inference-header-content-length"
#: The Content-Type of a response with binary outputs.
OCTET_STREAM = b"application/octet-stream"
_FIX = ("send Inference-Header-Content-Length with the byte length of the JSON part of the "
        "body")
#: Digits a header value may have: more is no body this server would accept.
_MAX_DIGITS = 18
_LENGTH = struct.Struct("<I")
_OBJECT_JSON = orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY
#: dtype byte orders that are little-endian as they are: "<", "|" (one byte), and
#: "=" (native) on a little-endian machine.
_LITTLE = ("<", "|", "=") if sys.byteorder == "little" else ("<", "|")


def parse_header_length(value: bytes) -> int:
    """``Inference-Header-Content-Length`` as a byte count, or a 400 saying what to send."""
    text = value.strip()
    if not text or len(text) > _MAX_DIGITS or not text.isdigit():
        raise ValidationError(f"Inference-Header-Content-Length is not a byte count: {_FIX}")
    return int(text)


def split_body(body: bytes, header_length: int) -> tuple[memoryview, memoryview]:
    """(the JSON header, the binary data after it), both views of ``body``: nothing copied."""
    if header_length > len(body):
        raise ValidationError(f"Inference-Header-Content-Length {header_length} is larger than "
                              f"the body ({len(body)} bytes): {_FIX}")
    view = memoryview(body)
    return view[:header_length], view[header_length:]


def no_header(name: str) -> ValidationError:
    """The 400 for a binary input in a request without the header (all of it JSON)."""
    return ValidationError(f'V2 input "{name}" uses the binary data extension '
                           "(parameters.binary_data_size) but the request has no "
                           f"Inference-Header-Content-Length header: {_FIX}")


def binary_layout(items: Mapping[str, Mapping[str, Any]],
                  available: int) -> dict[str, tuple[int, int]]:
    """Where each binary input's bytes lie in the binary data: name -> (offset, size).

    ``items``: the request's inputs by name, in request order, every name
    already one of the model's. Checks each declared size against what is
    left before going on, and that the sizes account for every byte.
    """
    layout: dict[str, tuple[int, int]] = {}
    offset = 0
    for name, item in items.items():
        params = item.get("parameters")
        if not isinstance(params, dict) or "binary_data_size" not in params:
            continue
        size = params["binary_data_size"]
        if type(size) is not int or size < 0:
            raise ValidationError(f'V2 input "{name}" parameters.binary_data_size is not a '
                                  "byte count: send the size of its binary data")
        if size > available - offset:
            raise ValidationError(
                f'V2 input "{name}" declares binary_data_size {size} but only '
                f"{available - offset} bytes of binary data are left after the JSON header "
                "(and the inputs before it): send every input's bytes, in the order of "
                '"inputs"')
        layout[name] = (offset, size)
        offset += size
    if offset != available:
        raise ValidationError(
            f"The body holds {available} bytes after the JSON header but the inputs' "
            f"binary_data_size add up to {offset}: send exactly the inputs' binary data "
            "after the JSON header")
    return layout


def read_tensor(name: str, dtype: np.dtype[Any], shape: list[int], count: int,
                data: memoryview) -> Array:
    """An input's binary data as an array of ``dtype`` and ``shape`` (``count`` values).

    ``count`` is the product of ``shape``, already within the decode limit.
    The array is a copy: aligned, writable, independent of the request body.
    """
    if dtype.kind == "O":
        return _read_bytes(name, shape, count, data)
    need = count * dtype.itemsize
    if len(data) != need:
        raise ValidationError(f'V2 input "{name}" has binary_data_size {len(data)} but shape '
                              f"{shape} of {v2_datatype(dtype)} needs {need} bytes: send "
                              "shape x datatype size bytes")
    if dtype.kind == "b":
        raw = np.frombuffer(data, np.uint8, count)
        if count and int(raw.max()) > 1:
            raise ValidationError(f'V2 input "{name}" has BOOL bytes other than 0 and 1: send '
                                  "one byte per value, 0 or 1")
        return raw.astype(np.bool_).reshape(shape)
    return np.frombuffer(data, dtype.newbyteorder("<"), count).astype(dtype).reshape(shape)


def _read_bytes(name: str, shape: list[int], count: int, data: memoryview) -> Array:
    """BYTES: ``count`` elements of (4-byte little-endian length, bytes), as ``str``."""
    end = len(data)
    if count * _LENGTH.size > end:
        raise ValidationError(f'V2 input "{name}" has binary_data_size {end}, too small for '
                              f"{count} BYTES elements (4 bytes of length each): send every "
                              "element of its shape")
    out = np.empty(count, dtype=object)
    pos = 0
    for i in range(count):
        if pos + _LENGTH.size > end:
            raise ValidationError(f'V2 input "{name}" binary data ends inside BYTES element '
                                  f"{i}'s length: send {count} elements (shape {shape})")
        (size,) = _LENGTH.unpack_from(data, pos)
        pos += _LENGTH.size
        if size > end - pos:
            raise ValidationError(f'V2 input "{name}" BYTES element {i} declares {size} bytes '
                                  f"but only {end - pos} are left in its binary data: send "
                                  "each element's length before its bytes")
        try:
            out[i] = str(data[pos:pos + size], "utf-8")
        except UnicodeDecodeError:
            raise ValidationError(f'V2 input "{name}" BYTES element {i} is not UTF-8: send '
                                  "text") from None
        pos += size
    if pos != end:
        raise ValidationError(f'V2 input "{name}" has {end - pos} bytes of binary data after '
                              f"its {count} BYTES elements: send exactly binary_data_size "
                              "bytes")
    return out.reshape(shape)


def binary_outputs(doc: Mapping[str, Any], outputs: Sequence[Mapping[str, Any]] | None,
                   model_outputs: Sequence[TensorSpec]) -> frozenset[str] | None:
    """The outputs to answer as binary data, None when none: what the request asks.

    ``parameters.binary_data_output`` sets the default for every output;
    an entry of ``outputs`` with ``parameters.binary_data`` decides for itself
    (Triton's rules). ``outputs``: the request's, names already checked; None: all.
    """
    params = doc.get("parameters")
    default = isinstance(params, dict) and params.get("binary_data_output") is True
    if outputs is None:
        return frozenset(t.name for t in model_outputs) if default else None
    chosen = set()
    for out in outputs:
        p = out.get("parameters")
        if isinstance(p, dict):
            if "classification" in p or "shared_memory_region" in p:
                raise _unsupported(str(out["name"]), p)
            if "binary_data" in p:
                if p["binary_data"] is True:
                    chosen.add(str(out["name"]))
                continue
        if default:
            chosen.add(str(out["name"]))
    return frozenset(chosen) or None


def _unsupported(name: str, params: Mapping[str, Any]) -> ValidationError:
    what = ("classification" if "classification" in params
            else "shared memory (shared_memory_region)")
    return ValidationError(f'V2 output "{name}" asks for {what}, which this server does not '
                           "support: request the output itself, as JSON or binary data")


def tensor_bytes(arr: Array) -> bytes:
    """An output's binary data: little-endian C order; BYTES as (length, UTF-8 bytes)."""
    if arr.dtype.kind in "OUS":
        parts: list[bytes] = []
        for value in arr.reshape(-1).tolist():
            raw = value if isinstance(value, bytes) else (
                value.encode("utf-8") if isinstance(value, str)
                else orjson.dumps(value, default=str, option=_OBJECT_JSON))
            parts += (_LENGTH.pack(len(raw)), raw)
        return b"".join(parts)
    if arr.dtype.byteorder in _LITTLE:  # already little-endian: C order is all it takes
        return arr.tobytes()
    return np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()

