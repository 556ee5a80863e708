"""Parsed request values to checked tensors: the model's dtype and shape, within the bound.

Every request format ends here (``codec``: JSON, CSV, .npy/.npz;
``codec_v2``: V2), so the rules live in one place: a value is coerced to the
dtype the model declares only when no value changes meaning, its rank and
static dimensions are checked, and a failure is a 400 naming the input and
what was expected. Input names are quoted only when the model declares them
(they are not secret); anything else from the body is described by position or
count, never quoted.

``np.array`` on parsed JSON is where a small body can become a huge array: a
list holding one long string and many numbers turns into a fixed-width string
array as wide as that string for *every* value. :func:`json_array` never lets
numpy see such a list unless its worst case fits the bound.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from itertools import chain
from typing import Any

import numpy as np
import orjson

from kubeinfer_runtime.codec_limits import (
    DEFAULT_LIMITS,
    TEXT_ITEM_BYTES,
    DecodeLimits,
    too_large,
)
from kubeinfer_runtime.errors import ValidationError
from kubeinfer_runtime.models.base import Array, TensorSpec

#: Counting stops past this many values: enough to be over any bound.
_COUNT_CAP = 1 << 62
#: numpy's limit on array dimensions.
_MAX_DIMS = 64
#: Every integer below this is a float64 exactly; from it on, not every one.
_FLOAT_EXACT = 2**53


#: The UTF-8 byte order mark Windows tools and Excel write at the start of text files.
UTF8_BOM = b"\xef\xbb\xbf"


def load_json(body: bytes | bytearray | memoryview) -> Any:
    """The parsed body, or a 400 saying where the JSON breaks (never what it holds).

    Read as Python's ``json`` (SageMaker's containers) reads bytes, on the error path
    only: a leading UTF-8 BOM is skipped, and ``NaN``/``Infinity``/``-Infinity`` (what
    ``json.dumps`` and the SageMaker SDK's JSONSerializer write for a numpy NaN or
    infinity) are read as floats.
    """
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as e:
        lenient = _lenient_json(body)
        if lenient is not _NOT_JSON:
            return lenient
        # orjson's reasons are fixed texts ("unexpected character, expected a JSON
        # value"); the position is where. Neither repeats the body.
        if body[:2] in (b"\xff\xfe", b"\xfe\xff"):
            raise ValidationError("Request body is UTF-16 text (it starts with a UTF-16 byte "
                                  "order mark): send UTF-8 JSON") from None
        if "depth limit" in e.msg:
            raise ValidationError("Request body is JSON nested more than 1024 levels deep: "
                                  "send arrays of at most a few dimensions") from None
        raise ValidationError(f"Request body is not valid JSON ({e.msg} at line {e.lineno} "
                              f"column {e.colno}): send UTF-8 JSON") from None


_NOT_JSON = object()


def _lenient_json(body: bytes | bytearray | memoryview) -> Any:
    """``body`` without a leading BOM, with NaN and Infinity allowed; ``_NOT_JSON`` when
    that does not make it JSON (the caller reports orjson's error)."""
    data = bytes(body)
    if data.startswith(UTF8_BOM):
        data = data[3:]
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass
    if b"NaN" not in data and b"Infinity" not in data:
        return _NOT_JSON
    try:
        doc = json.loads(data.decode("utf-8"))
        # What orjson refuses to read stays refused (lone surrogates, integers past 64
        # bits): orjson writes back what it reads.
        orjson.dumps(doc)
    except (ValueError, TypeError, RecursionError):  # JSON errors, bad UTF-8, refusals
        return _NOT_JSON
    return doc


def count_values(value: Any) -> int:
    """How many values nested lists hold, judged by the first element of every level.

    Exact for the rectangular arrays numpy accepts; a ragged list fails to
    convert anyway. O(depth), so it costs nothing next to parsing.
    """
    n = 1
    while type(value) is list:
        if not value:
            return 0
        n *= len(value)
        if n > _COUNT_CAP:
            return n
        value = value[0]
    return n


def check_names(given: Collection[str], inputs: Sequence[TensorSpec]) -> None:
    """The request names exactly the model's inputs; unknown names are only counted."""
    expected = [t.name for t in inputs]
    known = set(expected)
    # Callers never pass duplicates: equal sizes and all known means equal.
    if len(given) == len(known) and known.issuperset(given):
        return
    unknown = sum(1 for n in given if n not in known)
    missing = [n for n in expected if n not in given]
    if unknown or missing:
        parts = []
        if missing:
            parts.append("missing " + ", ".join(f'"{n}"' for n in missing))
        if unknown:
            parts.append(f"{unknown} unknown input name" + ("s" if unknown > 1 else ""))
        want = ", ".join(f'"{n}"' for n in expected)
        raise ValidationError(f"Request inputs do not match the model ({'; '.join(parts)}): "
                              f"the model takes {want}")


def to_tensor(value: Any, spec: TensorSpec, limits: DecodeLimits = DEFAULT_LIMITS, *,
              text_bytes: int | None = None, strings: bool = True) -> Array:
    """Turn parsed JSON (or an array) into an array of ``spec``'s dtype and shape.

    ``text_bytes``: the length of the JSON text ``value`` was parsed from (it
    bounds how many values and how long a string ``value`` can hold), None when
    unknown; ``strings``: False when that text is known to hold no string values.
    """
    arr = (value if isinstance(value, np.ndarray)
           else json_array(value, spec, limits, text_bytes, strings))
    if spec.shape is not None and arr.ndim == len(spec.shape) - 1:
        arr = _promote_single_instance(arr, spec)
    arr = coerce(arr, spec)
    _check_shape(arr, spec)
    return arr


def json_array(value: Any, spec: TensorSpec, limits: DecodeLimits,
               text_bytes: int | None = None, strings: bool = True) -> Array:
    """``value`` as an array, never allocating past the bound (``spec``: what it feeds).

    ``text_bytes`` and ``strings`` as for :func:`to_tensor`. Text up to
    ``limits.small_json_bytes`` cannot go past the bound whatever it holds;
    for longer text the values are counted (O(depth)) and, only when a string
    could make numpy's worst case exceed the bound, looked at (one C-level pass
    per nesting level) before numpy sees them.
    """
    if spec.dtype.kind in "OUS":
        return _string_array(value, spec, limits)
    if text_bytes is None or text_bytes > limits.small_json_bytes:
        n = count_values(value)
        if n * TEXT_ITEM_BYTES > limits.max_decoded_bytes:  # no message built unless over
            raise too_large(f'Input "{spec.name}" ({n} values)', n * TEXT_ITEM_BYTES, limits)
        longest = limits.max_decoded_bytes if text_bytes is None else text_bytes
        if (strings and n * 4 * max(longest, 64) > limits.max_decoded_bytes
                and _holds_strings(value)):
            # A string makes numpy give every value its width: refuse it as it is
            # (strings are wrong for a number input anyway) without building it.
            raise ValidationError(f'Input "{spec.name}" expects shape {spec.describe()}, '
                                  "got strings")
    try:
        return np.array(value)
    except (ValueError, TypeError, RecursionError):
        if _depth(value) > _MAX_DIMS:
            raise ValidationError(f'Input "{spec.name}" is nested more than {_MAX_DIMS} levels '
                                  f"deep: expected {spec.describe()}") from None
        raise _not_rectangular(spec) from None


def _depth(value: Any) -> int:
    """How deep nested lists go, judged by the first element of every level."""
    depth = 0
    while type(value) is list:
        depth += 1
        if not value:
            break
        value = value[0]
    return depth


class NotRectangular(ValidationError):
    """Nested lists numpy cannot make one array of (rows of different lengths)."""


def _not_rectangular(spec: TensorSpec) -> NotRectangular:
    return NotRectangular(f'Input "{spec.name}" is not a rectangular array: every row needs '
                          f"the same length; expected {spec.describe()}")


def _holds_strings(value: Any) -> bool:
    """Whether nested lists hold a string anywhere: one C-level pass per nesting level."""
    level: list[Any] = [value]
    while level:
        kinds = set(map(type, level))
        if str in kinds:
            return True
        if list not in kinds:
            return False
        level = list(chain.from_iterable(v for v in level if type(v) is list))
    return False


def _string_array(value: Any, spec: TensorSpec, limits: DecodeLimits) -> Array:
    """Strings for a string input: an object array of ``str`` (what onnxruntime takes).

    Built as objects from the start (a pointer per value: their text is the
    body's), never as a fixed-width string array.
    """
    n = count_values(value)
    if n * TEXT_ITEM_BYTES > limits.max_decoded_bytes:
        raise too_large(f'Input "{spec.name}" ({n} values)', n * TEXT_ITEM_BYTES, limits)
    try:
        arr = np.array(value, dtype=object)
    except (ValueError, TypeError, RecursionError):
        raise _not_rectangular(spec) from None
    if arr.ndim != _depth(value):
        raise _not_rectangular(spec)
    if not all(type(v) is str for v in arr.flat):
        raise ValidationError(f'Input "{spec.name}" expects shape {spec.describe()}, got '
                              f"{list(arr.shape)} with values that are not strings")
    return arr


def _promote_single_instance(arr: Array, spec: TensorSpec) -> Array:
    # One instance without its batch dimension ([5.1, 3.5, 1.4, 0.2] for an
    # [N, 4] input) is unambiguous: treat it as a batch of one.
    s = spec.shape
    if s is not None and len(s) >= 1 and s[0] is None and arr.ndim == len(s) - 1 and all(
        d is None or d == g for d, g in zip(s[1:], arr.shape, strict=True)
    ):
        return arr[np.newaxis, ...]
    return arr


def mismatch(arr: Array, spec: TensorSpec) -> ValidationError:
    """The 400 for an array of the wrong shape or type: its shape and kind, not its values."""
    got = str(list(arr.shape))
    if arr.dtype != spec.dtype:  # the type is worth naming only when it is part of the problem
        got += " " + {"U": "string", "S": "bytes", "O": "mixed/null values"}.get(
            arr.dtype.kind, arr.dtype.name)
    return ValidationError(f'Input "{spec.name}" expects shape {spec.describe()}, got {got}')


def coerce(arr: Array, spec: TensorSpec) -> Array:
    """Cast to the model's dtype when no value changes meaning; else a 400."""
    target = spec.dtype
    if arr.dtype is target or arr.dtype == target:  # `is`: builtin dtypes are singletons
        return arr
    kind, tk = arr.dtype.kind, target.kind
    if tk == "f":
        ok = kind in "biuf"
    elif tk in "iu":
        ok = kind in "biu" or (kind == "f" and bool(np.all(np.mod(arr, 1) == 0)))
        if ok and arr.size and kind != "b":
            info = np.iinfo(target)
            if kind == "f":
                # Floats (CSV values, JSON numbers past 64 bits) hold every integer only
                # below 2^53: from there a value may have been rounded on reading
                # (9223372036854775807 is read as 2^63, which a cast wraps to -2^63), so
                # it is refused, not guessed.
                # Python floats: compared with Python ints exactly (numpy rounds the int).
                low, high = float(arr.min()), float(arr.max())
                if max(-low, high) >= _FLOAT_EXACT and info.max > _FLOAT_EXACT:
                    raise ValidationError(
                        f'Input "{spec.name}" expects shape {spec.describe()}, got values '
                        "of 2^53 or more read as floats (CSV, JSON decimals, or JSON integers "
                        "past 64 bits), which may have been rounded: send JSON integers "
                        f"within {target.name}'s range")
                ok = info.min <= low and high <= info.max
            else:
                ok = info.min <= arr.min() and arr.max() <= info.max
    elif tk == "b":
        ok = kind == "b" or (kind in "iu" and bool(np.all((arr == 0) | (arr == 1))))
    elif tk in "OUS":
        # String inputs: onnxruntime wants object arrays of str.
        ok = kind in "USO"
        target = np.dtype(object)
    else:
        ok = False
    if not ok:
        raise mismatch(arr, spec)
    return arr.astype(target)


def _check_shape(arr: Array, spec: TensorSpec) -> None:
    s = spec.shape
    if s is None:
        return
    shape = arr.shape
    tail = spec.batch_tail
    if tail is not None:
        # The usual [N, static...] input: one tuple comparison per request.
        if len(shape) == len(s) and shape[1:] == tail:
            return
        raise mismatch(arr, spec)
    if len(shape) != len(s):
        raise mismatch(arr, spec)
    for d, g in zip(s, shape, strict=True):
        if d is not None and d != g:
            raise mismatch(arr, spec)
