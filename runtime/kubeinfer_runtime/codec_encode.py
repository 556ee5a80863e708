"""Response encoding for the model server: PURE, no I/O.

The other half of ``codec`` (which decodes requests and re-exports all of
this): which encoding a request asks for (``Accept``, and for answers that
carry one output, which output: ``CustomAttributes`` ``output=<name>``), and
the encoders themselves, for ``/invocations`` (JSON, CSV, .npy, .npz) and for
V2 ``infer`` (JSON, or a JSON header and binary tensors). Its own module
because decoding alone fills ``codec``. orjson (with numpy support) does all
JSON work: tensors never go through pydantic.
"""

from __future__ import annotations

import csv
import io
import sys
import zipfile
from collections.abc import Sequence
from enum import Enum
from functools import lru_cache
from typing import Any
from urllib.parse import unquote

import numpy as np
import orjson
from numpy.lib import format as npy_format

from kubeinfer_runtime.codec_limits import header_value
from kubeinfer_runtime.codec_v2_binary import tensor_bytes
from kubeinfer_runtime.errors import ValidationError
from kubeinfer_runtime.models.base import Array, Tensors, TensorSpec, v2_datatype

JSON = "application/json"
CSV = "text/csv"
NPY = "application/x-npy"
NPZ = "application/x-npz"

_ENCODABLE = f"{JSON}, {CSV}, {NPY} or {NPZ}"
# Non-str keys: scikit-learn ZipMap outputs are dicts keyed by class label.
_OPT = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS
#: The CustomAttributes key that picks the output of a CSV or .npy answer.
OUTPUT_ATTRIBUTE = "output"
#: SageMaker's limit on the CustomAttributes header; longer values are not read further.
_MAX_CUSTOM_ATTRIBUTES = 1024


class Encoding(Enum):
    """How a response body is written; chosen from Accept before the model runs."""

    JSON = JSON
    CSV = CSV
    NPY = NPY
    #: Every output, by name, in one .npz archive.
    NPZ = NPZ

    def __init__(self, mime: str) -> None:
        #: The response Content-Type header value (a plain attribute: read per request).
        self.content_type = mime.encode()
        #: True for CSV and .npy, which carry one output (see :func:`chosen_output`).
        self.one_output = mime in (CSV, NPY)
        #: An answer's headers but Content-Length, when they name no output (per request).
        self.headers = ((b"content-type", self.content_type),)


@lru_cache(maxsize=256)
def media_type(header: str | None) -> str:
    """``"Application/JSON; charset=utf-8"`` -> ``"application/json"``; None -> ``""``.

    Cached: clients send the same few header values on every request.
    """
    if not header:
        return ""
    return header.split(";", 1)[0].strip().lower()


#: Accept's media types (and wildcards) this server answers in.
_ACCEPTED = {JSON: Encoding.JSON, "*/*": Encoding.JSON, "application/*": Encoding.JSON,
             CSV: Encoding.CSV, "text/*": Encoding.CSV, NPY: Encoding.NPY, NPZ: Encoding.NPZ}


@lru_cache(maxsize=256)
def negotiate(accept: str | None) -> Encoding:
    """Pick the response encoding from Accept; JSON when absent or anything goes.

    The supported type of the highest quality (``q``) wins, the first listed among
    equals; ``q=0`` means "not this one" (RFC 9110). Cached: the parsing is done once
    per distinct header value, not per request.
    """
    if not accept:
        return Encoding.JSON
    best: Encoding | None = None
    best_q = 0.0
    for part in accept.split(","):
        encoding = _ACCEPTED.get(media_type(part))
        if encoding is None:
            continue
        q = _quality(part)
        if q > best_q:
            best, best_q = encoding, q
    if best is not None:
        return best
    raise ValidationError(f"Accept {header_value(accept)} is not supported: ask for "
                          f"{_ENCODABLE}")


def _quality(part: str) -> float:
    """The ``q`` parameter of one Accept element: 1 when absent, 0 when not a number."""
    for param in part.split(";")[1:]:
        name, _, value = param.partition("=")
        if name.strip().lower() == "q":
            try:
                q = float(value.strip())
            except ValueError:
                return 0.0
            return q if 0.0 <= q <= 1.0 else 0.0
    return 1.0


def custom_attribute(header: str | None, key: str) -> str | None:
    """The value of ``key`` in a CustomAttributes header (``k=v`` pairs split by ``;`` or ``,``).

    Keys compare case-insensitively; the first occurrence wins; None when absent.
    """
    if not header:
        return None
    for pair in header[:_MAX_CUSTOM_ATTRIBUTES].replace(",", ";").split(";"):
        k, sep, v = pair.partition("=")
        if sep and k.strip().lower() == key:
            return v.strip()
    return None


def chosen_output(custom_attributes: str | None, outputs: Sequence[TensorSpec]) -> str | None:
    """The output a CSV or .npy answer carries: ``output=<name>``, else the first.

    None for a model of one output when the request names none (the answer
    is that output, as it always was). An ``output`` the model does not have
    is a 400 listing the ones it has (the request's value is never quoted).
    """
    names = [t.name for t in outputs]
    wanted = custom_attribute(custom_attributes, OUTPUT_ATTRIBUTE)
    if wanted is None:
        return names[0] if len(names) > 1 else None
    if wanted not in names and "%" in wanted:
        # Percent-encoded, as answers write a name that is not printable ASCII (and
        # CustomAttributes is ASCII only): what a client read back names the output.
        wanted = unquote(wanted, errors="replace")
    if wanted not in names:
        have = ", ".join(f'"{n}"' for n in names)
        raise ValidationError(f"CustomAttributes output= names no output of the model: it has "
                              f"{have}; send output=<one of them>, or Accept: {NPZ} for all")
    return wanted


def encode_response(outputs: Tensors, encoding: Encoding, output: str | None = None) -> bytes:
    """Encode model outputs for ``/invocations``.

    JSON: ``{"predictions": <output>}`` for one output, ``{"predictions":
    {name: output, ...}}`` for several. .npz: every output, by name. CSV and
    .npy carry one output: ``output`` (see :func:`chosen_output`), else the
    first (the prediction, by the converters' convention).
    """
    if encoding is Encoding.JSON:
        if len(outputs) == 1:
            preds: Any = next(iter(outputs.values()))
        else:
            preds = outputs
        return dumps({"predictions": preds})
    if encoding is Encoding.NPZ:
        return _to_npz(outputs)
    one = outputs[output] if output is not None else next(iter(outputs.values()))
    if encoding is Encoding.CSV:
        return _to_csv(one)
    return _to_npy(one)


def dumps(doc: Any) -> bytes:
    """orjson with numpy arrays; non-contiguous or string arrays fall back to lists."""
    return orjson.dumps(doc, default=_default, option=_OPT)


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind in "biuf" and not obj.flags.c_contiguous:
            return np.ascontiguousarray(obj)
        return obj.tolist()
    if isinstance(obj, bytes):
        return obj.decode("utf-8", "replace")
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot encode {type(obj).__name__} as JSON")


def _to_csv(arr: Array) -> bytes:
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim > 2:
        arr = arr.reshape(arr.shape[0], -1)
    if arr.dtype.kind in "biuf" and arr.size:
        # orjson prints floats in their shortest round-trip form (float32 stays
        # 0.1, not 0.10000000149011612), so reuse its output and swap the brackets.
        js = dumps(np.ascontiguousarray(arr))
        if b"n" in js and arr.dtype.kind == "f":
            # orjson writes NaN and infinities as null, which no CSV reader takes back.
            return _non_finite_csv(arr)
        if arr.ndim == 1:
            return js[1:-1].replace(b",", b"\n") + b"\n"
        return js[2:-2].replace(b"],[", b"\n") + b"\n"
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    rows = arr.tolist()
    writer.writerows(rows if arr.ndim == 2 else [[v] for v in rows])
    return buf.getvalue().encode()


def _non_finite_csv(arr: Array) -> bytes:
    """CSV of floats some of which are NaN or infinite: written ``nan``, ``inf``, ``-inf``
    (what Python's ``str`` writes, and what ``float`` and numpy read back), the others
    as orjson writes them (shortest round-trip form)."""
    rows = arr if arr.ndim == 2 else arr.reshape(-1, 1)
    lines = []
    for row in rows:
        cells = [orjson.dumps(v, option=_OPT).decode() if np.isfinite(v) else str(float(v))
                 for v in row]
        lines.append(",".join(cells))
    return ("\n".join(lines) + "\n").encode()


def _storable(arr: Array) -> Array:
    # Object arrays (strings from a model) become fixed-width text: never a pickle.
    return arr.astype(str) if arr.dtype.kind == "O" else arr


def _to_npy(arr: Array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, _storable(arr), allow_pickle=False)
    return buf.getvalue()


def _to_npz(outputs: Tensors) -> bytes:
    # What numpy.savez writes (stored, one "<name>.npy" per output), without its
    # keyword arguments, which an output named "file" or "allow_pickle" would hit.
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, arr in outputs.items():
            with zf.open(f"{name}.npy", "w") as member:
                npy_format.write_array(member, _storable(arr), allow_pickle=False)
    return buf.getvalue()


# --------------------------------------------------------------------------- V2


def encode_v2(outputs: Tensors, model_name: str, model_version: str | None,
              request_id: str | None) -> bytes:
    """A V2 JSON answer: what ``dumps`` writes for ``{"model_name", "model_version", "id",
    "outputs": [{"name", "shape", "datatype", "data"}, ...]}``, flat ``data``.

    Written from pieces (the constant ones cached) rather than from that
    document: building the dicts cost more than serializing them, on every
    answer to a small model. tests/unit/test_v2_lane.py checks the bytes
    against the document's.
    """
    parts = _v2_parts(model_name, model_version, request_id)
    sep = b""
    for name, arr in outputs.items():
        name_part, type_part = _v2_output_head(name, arr.dtype)
        # ravel: flat, a view when it can be (any order serializes alike: dumps copies).
        parts += (sep, name_part, orjson.dumps(arr.shape), type_part, b',"data":',
                  dumps(arr.ravel()), b"}")
        sep = b","
    parts.append(b"]}")
    return b"".join(parts)


def encode_v2_binary(outputs: Tensors, model_name: str, model_version: str | None,
                     request_id: str | None, binary: frozenset[str]) -> tuple[bytes, int]:
    """(body, JSON header length): the outputs in ``binary`` as raw bytes after the header.

    The binary data extension's answer: each such output has
    ``parameters.binary_data_size`` instead of ``data``, its bytes following
    the JSON in the order of ``outputs``; the others keep ``data``. The header
    is written from pieces, as by :func:`encode_v2`.
    """
    key: tuple[Any, ...] | None = None
    if request_id is None:
        # dtype.num, not the dtype: an int hashes at once, and (for the numeric
        # dtypes a cached header holds) names the datatype, byte order aside,
        # which is checked below.
        key = (model_name, model_version, binary,
               *[(name, arr.shape, arr.dtype.num) for name, arr in outputs.items()])
        header = _BINARY_HEADERS.get(key)
        if header is not None:
            parts = [header]
            for arr in outputs.values():
                if not arr.dtype.isnative:
                    break  # no V2 datatype: the general steps below explain it
                # Numeric (the header says so) and native: on a little-endian
                # machine the bytes as they are, tensor_bytes' checks not needed.
                parts.append(arr.tobytes() if _NATIVE_LITTLE else tensor_bytes(arr))
            else:
                return b"".join(parts), len(header)
    parts = _v2_parts(model_name, model_version, request_id)
    raws: list[bytes] = []
    sep = b""
    fixed = True  # every output binary and numeric: the header is a function of the key
    for name, arr in outputs.items():
        name_part, type_part = _v2_output_head(name, arr.dtype)
        parts += (sep, name_part, orjson.dumps(arr.shape), type_part)
        if name in binary:
            raw = tensor_bytes(arr)
            raws.append(raw)
            fixed = fixed and arr.dtype.kind in "biuf"
            parts += (b',"parameters":{"binary_data_size":', str(len(raw)).encode(), b"}}")
        else:
            fixed = False
            parts += (b',"data":', dumps(arr.ravel()), b"}")
        sep = b","
    parts.append(b"]}")
    header = b"".join(parts)
    if key is not None and fixed:
        if len(_BINARY_HEADERS) >= _BINARY_HEADERS_MAX:
            _BINARY_HEADERS.clear()  # shapes vary by batch size; a client has few
        _BINARY_HEADERS[key] = header
    return b"".join([header, *raws]), len(header)


#: JSON headers of binary answers whose outputs are all binary and numeric, by what they
#: are made of (names, shapes, dtypes: the sizes follow): a client sending the same
#: request shape gets the same header every time, so it is written once, not per answer.
_BINARY_HEADERS: dict[tuple[Any, ...], bytes] = {}
_NATIVE_LITTLE = sys.byteorder == "little"
_BINARY_HEADERS_MAX = 256


def _v2_parts(model_name: str, model_version: str | None, request_id: str | None) -> list[bytes]:
    """A V2 answer's start, up to its first output: ``{"model_name":...,"outputs":[``."""
    parts = [_v2_head(model_name, model_version)]
    if request_id is not None:
        parts += (b',"id":', orjson.dumps(request_id))
    parts.append(b',"outputs":[')
    return parts


@lru_cache(maxsize=256)
def _v2_head(model_name: str, model_version: str | None) -> bytes:
    """``{"model_name":...,"model_version":...`` (unclosed)."""
    doc = {"model_name": model_name}
    if model_version is not None:
        doc["model_version"] = model_version
    return orjson.dumps(doc)[:-1]


@lru_cache(maxsize=1024)
def _v2_output_head(name: str, dtype: np.dtype[Any]) -> tuple[bytes, bytes]:
    """An output's ``{"name":...,"shape":`` and ``,"datatype":...``."""
    return (b'{"name":' + orjson.dumps(name) + b',"shape":',
            b',"datatype":' + orjson.dumps(v2_datatype(dtype)))
