"""Request decoding for the model server, and the codec's one import: PURE, no I/O.

Two wire protocols meet one backend interface here:

* the SageMaker container contract (``POST /invocations``): the body's
  Content-Type picks the decoder (JSON, CSV, .npy/.npz) and Accept picks the
  encoder;
* the Open Inference Protocol V2 (``POST /v2/models/{m}/infer``): tensors
  with explicit name, shape and datatype, as JSON or as binary data after a
  JSON header (decoded in ``codec_v2`` and ``codec_v2_binary``).

Encoding lives in ``codec_encode``; this module re-exports it, so callers
import ``codec`` alone. Every decoded tensor is coerced to the dtype the model
declares and checked against its rank and static dimensions
(``codec_tensors``), so a bad request is answered with a 400 naming the input
and what was expected instead of an opaque backend failure. Every decoder is
bounded by :class:`DecodeLimits` (``codec_limits``): what a body would decode
to is checked before it is allocated or inflated (.npy/.npz in
``codec_numpy``), and going over is a 413. Anything else bad bytes make
numpy, zipfile or the parsers raise is a 400, never a 500. No error message
quotes the request's content: messages say what was wrong and where (row,
column, position, expected shape). orjson does all JSON work: tensors never
go through pydantic, which would cost more than the model on small requests.
"""

from __future__ import annotations

import io
from array import array
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import orjson

from kubeinfer_runtime.codec_encode import (
    CSV,
    JSON,
    NPY,
    NPZ,
    Encoding,
    chosen_output,
    custom_attribute,
    dumps,
    encode_response,
    encode_v2,
    encode_v2_binary,
    media_type,
    negotiate,
)
from kubeinfer_runtime.codec_limits import (
    DEFAULT_LIMITS,
    TEXT_ITEM_BYTES,
    DecodeLimits,
    header_value,
    out_of_memory,
    too_large,
    undecodable,
)
from kubeinfer_runtime.codec_numpy import NPY_MAGIC, ZIP_MAGICS, read_npy, read_npz
from kubeinfer_runtime.codec_tensors import (
    check_names,
    count_values,
    load_json,
    to_tensor,
)
from kubeinfer_runtime.codec_v2 import V2Request, decode_v2, decode_v2_inputs
from kubeinfer_runtime.errors import RuntimeServiceError, ValidationError
from kubeinfer_runtime.models.base import Array, Tensors, TensorSpec

__all__ = [
    "CSV", "DEFAULT_LIMITS", "JSON", "NPY", "NPZ", "DecodeLimits", "Encoding", "V2Request",
    "chosen_output", "custom_attribute", "decode_request", "decode_v2", "dumps",
    "encode_response", "encode_v2", "encode_v2_binary", "fast_float_json", "media_type",
    "negotiate", "to_tensor",
]

_DECODABLE = f"{JSON}, {CSV}, {NPY} or {NPZ}"
#: CSV text is split into lines this many characters at a time.
_CSV_BLOCK = 1 << 18


# --------------------------------------------------------------------------- decode


def decode_request(body: bytes | bytearray, content_type: str | None,
                   inputs: Sequence[TensorSpec],
                   limits: DecodeLimits = DEFAULT_LIMITS) -> Tensors:
    """Decode an ``/invocations`` body into checked tensors keyed by input name.

    A missing Content-Type is read as JSON, as most SageMaker clients send JSON.
    Raises ``ValidationError`` (400) for bad input and ``PayloadTooLarge`` (413)
    when the body would decode past ``limits``; nothing else escapes. ``body`` may
    be a bytearray: an async worker's input, read into one buffer and not copied.
    """
    mt = media_type(content_type)
    if len(body) > limits.max_decoded_bytes:
        raise too_large("Request body", len(body), limits)
    try:
        if mt in ("", JSON):
            if len(inputs) == 1:
                spec = inputs[0]
                if spec.dtype.kind == "f" and spec.batch_tail is not None:
                    arr = fast_float_json(body, spec, spec.batch_tail, limits)
                    if arr is not None:
                        return {spec.name: arr}
            return _decode_json(body, inputs, limits)
        if mt == CSV:
            return _decode_csv(body, inputs, limits)
        if mt in (NPY, NPZ):
            return _decode_numpy(body, inputs, limits)
        if mt == "application/octet-stream":
            # What some clients send when no type was given: tell by the magic bytes.
            if body.startswith((NPY_MAGIC, *ZIP_MAGICS)):
                return _decode_numpy(body, inputs, limits)
            return _decode_json(body, inputs, limits)
    except RuntimeServiceError:
        raise
    except MemoryError:
        raise out_of_memory(limits) from None
    except Exception as e:  # whatever hostile bytes make a parser raise: a 400, never a 500
        raise undecodable(mt or JSON, e) from None
    raise ValidationError(
        f"Content-Type {header_value(content_type or '')} is not supported: send {_DECODABLE}"
    )


def fast_float_json(body: bytes | bytearray, spec: TensorSpec, tail: tuple[int, ...],
                    limits: DecodeLimits = DEFAULT_LIMITS) -> Array | None:
    """The common request in as few steps as possible, or None to take the full path.

    One float input of shape [N, static...], a list of numbers or {"instances":
    [...]}: parse, check kind and shape, cast. Python-level steps cost more than
    they seem next to a 6 µs model (they evict the model's code from the CPU
    caches), so this lane does only what the full path would conclude anyway.
    Anything unusual (bad JSON, nulls, strings, another shape) returns None and
    the full path decodes it again and explains the problem.

    Bounded without walking the body: a body up to ``limits.small_json_bytes``
    cannot make numpy allocate past the bound whatever it holds; a longer one
    is taken only when it holds no string values (no quote but the
    "instances" key's) and numbers alone fit the bound.
    """
    try:
        doc = orjson.loads(body)
        value = doc.get("instances") if type(doc) is dict else doc
        n = len(body)
        if n > limits.small_json_bytes:
            # No quote but the "instances" key's two (find is memchr; count is not).
            find = body.find
            if type(doc) is dict:
                first = find(b'"')
                second = find(b'"', first + 1) if first >= 0 else -1
                plain = second >= 0 and find(b'"', second + 1) < 0
            else:
                plain = find(b'"') < 0
            if not plain or (n // 2 + 1) * TEXT_ITEM_BYTES > limits.max_decoded_bytes:
                return None
            if type(value) is list and b"." in body and b"u" not in body:
                # No string and no null ("instances" has no "u"; a null would become
                # NaN here), one value a float: numpy would find float64 for the whole
                # array (booleans included, as 0.0 and 1.0) and cast it, which is what
                # converting straight to the input's dtype does, element by element,
                # without the search (a third of this lane's time for a 256-float row).
                # All integers take the general steps: int64 -> float32 rounds once,
                # via float64 twice.
                arr = np.asarray(value, dtype=spec.dtype)
                if arr.shape[1:] != tail or arr.ndim != len(tail) + 1:
                    return None
                return arr
        arr = np.array(value)
    except (orjson.JSONDecodeError, ValueError, TypeError, RecursionError):
        return None
    if arr.dtype.kind not in "fiu" or arr.shape[1:] != tail or arr.ndim != len(tail) + 1:
        return None
    return arr.astype(spec.dtype)


def _decode_json(body: bytes | bytearray, inputs: Sequence[TensorSpec],
                 limits: DecodeLimits) -> Tensors:
    doc = load_json(body)
    if isinstance(doc, list):
        return _single(doc, inputs, limits, body, 0)
    if isinstance(doc, dict):
        if "instances" in doc:
            instances = doc["instances"]
            if len(inputs) == 1 and not (instances and isinstance(instances, list)
                                         and isinstance(instances[0], dict)):
                # The common case, without detours: one input, a list of instances.
                return _single(instances, inputs, limits, body, len(doc))
            return _decode_instances(instances, inputs, limits, body, len(doc))
        if "inputs" in doc:
            named = doc["inputs"]
            if isinstance(named, dict):
                return _named(named, inputs, limits, body, len(doc) + len(named))
            if isinstance(named, list) and named and all(
                isinstance(t, dict) and "datatype" in t for t in named
            ):
                # A V2 request sent to /invocations: accept it as such.
                return decode_v2_inputs(named, inputs, limits, len(body))
            return _single(named, inputs, limits, body, len(doc))
    raise ValidationError(
        'JSON body must be {"instances": [...]}, {"inputs": {"<input>": [...]}} or a list '
        f"of instances, got {type(doc).__name__}"
    )


def _has_strings(body: bytes | bytearray, keys: int, limits: DecodeLimits) -> bool:
    """Whether a JSON body may hold string values (not just its ``keys`` object keys).

    Exactly two quotes per object key means no string values: then numpy
    cannot make a string array of them however many there are, and
    :func:`~kubeinfer_runtime.codec_tensors.json_array` need not look at them.
    Counted only for bodies long enough for it to matter.
    """
    return len(body) <= limits.small_json_bytes or body.count(b'"') != 2 * keys


def _decode_instances(instances: Any, inputs: Sequence[TensorSpec], limits: DecodeLimits,
                      body: bytes | bytearray, top_keys: int) -> Tensors:
    if isinstance(instances, list) and instances and isinstance(instances[0], dict):
        # Row-oriented multi-input form: [{"a": ..., "b": ...}, ...].
        if not all(isinstance(r, dict) for r in instances):
            raise ValidationError('"instances" mixes objects and other values: send every '
                                  'instance as {"<input>": ...}')
        names = {k for r in instances for k in r}
        check_names(names, inputs)
        columns = {t.name: [r.get(t.name) for r in instances] for t in inputs}
        return _named(columns, inputs, limits, body,
                      top_keys + sum(len(r) for r in instances))
    return _single(instances, inputs, limits, body, top_keys)


def _single(value: Any, inputs: Sequence[TensorSpec], limits: DecodeLimits,
            body: bytes | bytearray | None, keys: int = 0) -> Tensors:
    """The one input's tensor; ``body``: the JSON text ``value`` came from (None: an array)."""
    if len(inputs) != 1:
        names = ", ".join(f'"{t.name}"' for t in inputs)
        raise ValidationError(
            f"Model has {len(inputs)} inputs ({names}): send "
            '{"inputs": {"<input>": [...], ...}} naming each one'
        )
    spec = inputs[0]
    if body is None:
        return {spec.name: to_tensor(value, spec, limits)}
    n = len(body)
    # _has_strings, inlined: this is the general path's commonest step.
    strings = n <= limits.small_json_bytes or body.count(b'"') != 2 * keys
    return {spec.name: to_tensor(value, spec, limits, text_bytes=n, strings=strings)}


def _named(named: dict[str, Any], inputs: Sequence[TensorSpec], limits: DecodeLimits,
           body: bytes | bytearray, keys: int) -> Tensors:
    check_names(set(named), inputs)
    if len(inputs) > 1:
        # The request's total, before any input is built (each is checked alone too).
        total = sum(count_values(named[t.name]) * TEXT_ITEM_BYTES for t in inputs)
        if total > limits.max_decoded_bytes:
            raise too_large(f"Request inputs ({len(inputs)} inputs)", total, limits)
    strings = _has_strings(body, keys, limits)
    return {spec.name: to_tensor(named[spec.name], spec, limits, text_bytes=len(body),
                                 strings=strings)
            for spec in inputs}


def _decode_csv(body: bytes | bytearray, inputs: Sequence[TensorSpec],
                limits: DecodeLimits) -> Tensors:
    if len(inputs) != 1:
        raise ValidationError(
            f"Content-Type {CSV} needs a model with one input, this one has {len(inputs)}: "
            f"send {JSON} naming each input"
        )
    spec = inputs[0]
    # A float32 input is parsed straight to float32: numpy's parser reads each value as
    # a double and rounds it, as the cast from float64 would, one pass and 8% sooner.
    arr = _csv_fast(body, limits, np.float32 if spec.dtype == np.float32 else np.float64)
    if arr is not None:
        if spec.shape is not None and len(spec.shape) == 1 and arr.shape[1] == 1:
            arr = arr[:, 0]
        return {spec.name: to_tensor(arr, spec, limits)}
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        # The position, not the byte: the byte is the request's content.
        raise ValidationError(f"CSV body is not UTF-8 (invalid byte at position {e.start}): "
                              "send UTF-8 text") from None
    # Values go straight into a compact buffer (8 bytes each), checked against
    # the bound row by row: never a list of Python floats, never a line past it.
    values = array("d")
    cap = limits.max_decoded_bytes // TEXT_ITEM_BYTES
    width = rows = 0
    for rows, line in enumerate(_csv_lines(text), 1):
        cells = line.split(",")
        if rows == 1:
            width = len(cells)
        elif len(cells) != width:
            raise ValidationError(f"CSV row {rows} has {len(cells)} columns, row 1 has "
                                  f"{width}: every row needs the same number of values")
        if len(values) + width > cap:
            raise too_large(f"CSV body (at least {rows} rows of {width} values)",
                            (len(values) + width) * TEXT_ITEM_BYTES, limits)
        try:
            values.extend([float(c) for c in cells])
        except ValueError:
            j = next(j for j, c in enumerate(cells, 1) if not _is_float(c))
            raise ValidationError(
                f"CSV row {rows} column {j} is not a number: send numbers only, without a "
                "header row"
            ) from None
    if not rows:
        raise ValidationError("CSV body is empty: send one row of comma-separated numbers "
                              "per instance")
    arr = np.frombuffer(values, dtype=np.float64).reshape(rows, width)
    if spec.shape is not None and len(spec.shape) == 1 and width == 1:
        arr = arr[:, 0]  # one column per row feeds a 1-D input
    return {spec.name: to_tensor(arr, spec, limits)}


#: Bytes that end a line for ``str.splitlines`` but not for numpy's parser.
_LINE_BREAKS = (b"\x0b", b"\x0c", b"\x1c", b"\x1d", b"\x1e")


def _csv_fast(body: bytes | bytearray, limits: DecodeLimits,
              dtype: type[np.floating[Any]] = np.float64) -> Array | None:
    """A plain numeric CSV body through numpy's C parser (4x the exact path), or None.

    Taken only where both parsers agree: ASCII, no line breaks but ``\n`` and
    ``\r\n``, every value one Python's ``float`` reads the same (numpy refuses the
    rest: ``1_000``, whitespace-only lines, ragged rows). Anything it refuses
    goes to the exact path, which explains the problem. Bounded before parsing:
    one value per comma or newline, at most ``limits`` allows.
    """
    # Blank bodies go to the exact path (numpy would warn, and warnings.catch_warnings
    # is not thread-safe: decoding runs in the inference threads).
    if not body or body.isspace() or not body.isascii():
        return None
    if any(b in body for b in _LINE_BREAKS):
        return None
    if b"\r" in body and body.count(b"\r") != body.count(b"\r\n"):
        return None
    # Every value takes a byte and a separator: a body this short cannot go over the
    # bound, and two scans of a 6 MB body are skipped (the common case in batch jobs).
    if ((len(body) + 1) // 2 * TEXT_ITEM_BYTES > limits.max_decoded_bytes
            and (body.count(b",") + body.count(b"\n") + 1) * TEXT_ITEM_BYTES
            > limits.max_decoded_bytes):
        return None
    try:
        arr = np.loadtxt(io.BytesIO(body), delimiter=",", dtype=dtype, ndmin=2,
                         comments=None, quotechar=None)
    except ValueError:
        return None
    return arr if arr.size else None


def _csv_lines(text: str) -> Iterator[str]:
    """The non-blank lines of ``text``, as ``str.splitlines`` splits them, a block at a time.

    Splitting the whole body at once holds every line (~60 bytes each) together;
    blocks end just after a newline, so they split exactly as the whole would.
    """
    start, n = 0, len(text)
    while start < n:
        end = text.find("\n", start + _CSV_BLOCK)
        end = n if end < 0 else end + 1
        for line in text[start:end].splitlines():
            if line.strip():
                yield line
        start = end


def _is_float(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _decode_numpy(body: bytes | bytearray, inputs: Sequence[TensorSpec],
                  limits: DecodeLimits) -> Tensors:
    if body.startswith(ZIP_MAGICS):
        named = read_npz(body, limits, lambda names: check_names(names, inputs))
        return {spec.name: to_tensor(named[spec.name], spec, limits) for spec in inputs}
    if not body.startswith(NPY_MAGIC):
        raise ValidationError("Request body is not a .npy or .npz array: save it with "
                              "numpy.save or numpy.savez, without pickled objects")
    return _single(read_npy(body, limits), inputs, limits, None)
