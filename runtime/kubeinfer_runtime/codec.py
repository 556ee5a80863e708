"""Request decoding and response encoding for the model server: PURE, no I/O.

Two wire protocols meet one backend interface here:

* the SageMaker container contract (``POST /invocations``): the body's
  Content-Type picks the decoder (JSON, CSV, .npy/.npz) and Accept picks the
  encoder;
* the Open Inference Protocol V2 (``POST /v2/models/{m}/infer``): JSON tensors
  with explicit name, shape and datatype.

Every decoded tensor is coerced to the dtype the model declares and checked
against its rank and static dimensions, so a bad request is answered with a 400
naming the input and what was expected instead of an opaque backend failure.
orjson (with numpy support) does all JSON work: tensors never go through
pydantic, which would cost more than the model on small requests.
"""

from __future__ import annotations

import csv
import io
import math
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache
from typing import Any

import numpy as np
import orjson

from kubeinfer_runtime.errors import ValidationError
from kubeinfer_runtime.models.base import (
    Array,
    ModelMetadata,
    Tensors,
    TensorSpec,
    numpy_dtype,
    v2_datatype,
)

JSON = "application/json"
CSV = "text/csv"
NPY = "application/x-npy"
NPZ = "application/x-npz"

_DECODABLE = f"{JSON}, {CSV}, {NPY} or {NPZ}"
_ENCODABLE = f"{JSON}, {CSV} or {NPY}"
# Non-str keys: scikit-learn ZipMap outputs are dicts keyed by class label.
_OPT = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


class Encoding(Enum):
    """How a response body is written; chosen from Accept before the model runs."""

    JSON = JSON
    CSV = CSV
    NPY = NPY

    def __init__(self, mime: str) -> None:
        #: The response Content-Type header value (a plain attribute: read per request).
        self.content_type = mime.encode()


@lru_cache(maxsize=256)
def media_type(header: str | None) -> str:
    """``"Application/JSON; charset=utf-8"`` -> ``"application/json"``; None -> ``""``.

    Cached: clients send the same few header values on every request.
    """
    if not header:
        return ""
    return header.split(";", 1)[0].strip().lower()


# --------------------------------------------------------------------------- decode


def decode_request(body: bytes, content_type: str | None,
                   inputs: Sequence[TensorSpec]) -> Tensors:
    """Decode an ``/invocations`` body into checked tensors keyed by input name.

    A missing Content-Type is read as JSON, as most SageMaker clients send JSON.
    """
    mt = media_type(content_type)
    if mt in ("", JSON):
        if len(inputs) == 1:
            spec = inputs[0]
            if spec.dtype.kind == "f" and spec.batch_tail is not None:
                arr = fast_float_json(body, spec, spec.batch_tail)
                if arr is not None:
                    return {spec.name: arr}
        return _decode_json(body, inputs)
    if mt == CSV:
        return _decode_csv(body, inputs)
    if mt in (NPY, NPZ):
        return _decode_numpy(body, inputs)
    if mt == "application/octet-stream":
        # What some clients send when no type was given: tell by the magic bytes.
        if body.startswith((b"\x93NUMPY", b"PK\x03\x04")):
            return _decode_numpy(body, inputs)
        return _decode_json(body, inputs)
    raise ValidationError(
        f"Content-Type {content_type!r} is not supported: send {_DECODABLE}"
    )


def fast_float_json(body: bytes, spec: TensorSpec, tail: tuple[int, ...]) -> Array | None:
    """The common request in as few steps as possible, or None to take the full path.

    One float input of shape [N, static...], a list of numbers or {"instances":
    [...]}: parse, check kind and shape, cast. Python-level steps cost more than
    they seem next to a 6 µs model (they evict the model's code from the CPU
    caches), so this lane does only what the full path would conclude anyway.
    Anything unusual (bad JSON, nulls, strings, another shape) returns None and
    the full path decodes it again and explains the problem.
    """
    try:
        doc = orjson.loads(body)
        value = doc.get("instances") if type(doc) is dict else doc
        arr = np.array(value)
    except (orjson.JSONDecodeError, ValueError, TypeError):
        return None
    if arr.dtype.kind not in "fiu" or arr.shape[1:] != tail or arr.ndim != len(tail) + 1:
        return None
    return arr.astype(spec.dtype)


def _loads(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise ValidationError(f"Request body is not valid JSON: {e}") from None


def _decode_json(body: bytes, inputs: Sequence[TensorSpec]) -> Tensors:
    doc = _loads(body)
    if isinstance(doc, list):
        return _single(doc, inputs)
    if isinstance(doc, dict):
        if "instances" in doc:
            instances = doc["instances"]
            if len(inputs) == 1 and not (instances and isinstance(instances, list)
                                         and isinstance(instances[0], dict)):
                # The common case, without detours: one input, a list of instances.
                spec = inputs[0]
                return {spec.name: to_tensor(instances, spec)}
            return _decode_instances(instances, inputs)
        if "inputs" in doc:
            named = doc["inputs"]
            if isinstance(named, dict):
                return _named(named, inputs)
            if isinstance(named, list) and named and all(
                isinstance(t, dict) and "datatype" in t for t in named
            ):
                # A V2 request sent to /invocations: accept it as such.
                return _decode_v2_inputs(named, inputs)
            return _single(named, inputs)
    raise ValidationError(
        'JSON body must be {"instances": [...]}, {"inputs": {"<input>": [...]}} or a list '
        f"of instances, got {type(doc).__name__}"
    )


def _decode_instances(instances: Any, inputs: Sequence[TensorSpec]) -> Tensors:
    if isinstance(instances, list) and instances and isinstance(instances[0], dict):
        # Row-oriented multi-input form: [{"a": ..., "b": ...}, ...].
        if not all(isinstance(r, dict) for r in instances):
            raise ValidationError('"instances" mixes objects and other values: send every '
                                  'instance as {"<input>": ...}')
        names = {k for r in instances for k in r}
        columns = {n: [r.get(n) for r in instances] for n in names}
        return _named(columns, inputs)
    return _single(instances, inputs)


def _single(value: Any, inputs: Sequence[TensorSpec]) -> Tensors:
    if len(inputs) != 1:
        names = ", ".join(f'"{t.name}"' for t in inputs)
        raise ValidationError(
            f"Model has {len(inputs)} inputs ({names}): send "
            '{"inputs": {"<input>": [...], ...}} naming each one'
        )
    spec = inputs[0]
    return {spec.name: to_tensor(value, spec)}


def _named(named: dict[str, Any], inputs: Sequence[TensorSpec]) -> Tensors:
    _check_names(set(named), inputs)
    return {spec.name: to_tensor(named[spec.name], spec) for spec in inputs}


def _check_names(given: set[str], inputs: Sequence[TensorSpec]) -> None:
    expected = [t.name for t in inputs]
    unknown = sorted(given - set(expected))
    missing = [n for n in expected if n not in given]
    if unknown or missing:
        parts = []
        if missing:
            parts.append("missing " + ", ".join(f'"{n}"' for n in missing))
        if unknown:
            parts.append("unknown " + ", ".join(f'"{n}"' for n in unknown))
        want = ", ".join(f'"{n}"' for n in expected)
        raise ValidationError(f"Request inputs do not match the model ({'; '.join(parts)}): "
                              f"the model takes {want}")


def _decode_csv(body: bytes, inputs: Sequence[TensorSpec]) -> Tensors:
    if len(inputs) != 1:
        raise ValidationError(
            f"Content-Type {CSV} needs a model with one input, this one has {len(inputs)}: "
            f"send {JSON} naming each input"
        )
    spec = inputs[0]
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValidationError(f"CSV body is not UTF-8: {e}") from None
    rows = [line for line in text.splitlines() if line.strip()]
    if not rows:
        raise ValidationError("CSV body is empty: send one row of comma-separated numbers "
                              "per instance")
    width = rows[0].count(",") + 1
    data: list[list[float]] = []
    for i, line in enumerate(rows, 1):
        cells = line.split(",")
        if len(cells) != width:
            raise ValidationError(f"CSV row {i} has {len(cells)} columns, row 1 has {width}: "
                                  "every row needs the same number of values")
        try:
            data.append([float(c) for c in cells])
        except ValueError:
            j, cell = next((j, c) for j, c in enumerate(cells, 1) if not _is_float(c))
            raise ValidationError(
                f"CSV row {i} column {j} is not a number: {cell.strip()!r} "
                "(send numbers only, without a header row)"
            ) from None
    arr = np.array(data, dtype=np.float64)
    if spec.shape is not None and len(spec.shape) == 1 and arr.shape[1] == 1:
        arr = arr[:, 0]  # one column per row feeds a 1-D input
    return {spec.name: to_tensor(arr, spec)}


def _is_float(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _decode_numpy(body: bytes, inputs: Sequence[TensorSpec]) -> Tensors:
    try:
        loaded = np.load(io.BytesIO(body), allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise ValidationError(
            f"Request body is not a .npy or .npz array ({e}): save it with numpy.save, "
            "without pickled objects"
        ) from None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            named = {k: loaded[k] for k in loaded.files}
        return _named(named, inputs)
    return _single(loaded, inputs)


# --------------------------------------------------------------------------- tensors


def to_tensor(value: Any, spec: TensorSpec) -> Array:
    """Turn decoded JSON (or an array) into an array of ``spec``'s dtype and shape."""
    if isinstance(value, np.ndarray):
        arr = value
    else:
        try:
            arr = np.array(value)
        except (ValueError, TypeError):
            raise ValidationError(
                f'Input "{spec.name}" is not a rectangular array: every row needs the same '
                f"length; expected {spec.describe()}"
            ) from None
    if spec.shape is not None and arr.ndim == len(spec.shape) - 1:
        arr = _promote_single_instance(arr, spec)
    arr = _coerce(arr, spec)
    _check_shape(arr, spec)
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


def _mismatch(arr: Array, spec: TensorSpec) -> ValidationError:
    got = str(list(arr.shape))
    if arr.dtype != spec.dtype:  # the type is worth naming only when it is part of the problem
        got += " " + {"U": "string", "S": "bytes", "O": "mixed/null values"}.get(
            arr.dtype.kind, arr.dtype.name)
    return ValidationError(f'Input "{spec.name}" expects shape {spec.describe()}, got {got}')


def _coerce(arr: Array, spec: TensorSpec) -> Array:
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
            ok = info.min <= arr.min() and arr.max() <= info.max
    elif tk == "b":
        ok = kind == "b" or (kind in "iu" and bool(np.all((arr == 0) | (arr == 1))))
    elif tk in "OUS":
        # String inputs: onnxruntime wants object arrays of str.
        ok = kind in "US"
        target = np.dtype(object)
    else:
        ok = False
    if not ok:
        raise _mismatch(arr, spec)
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
        raise _mismatch(arr, spec)
    if len(shape) != len(s):
        raise _mismatch(arr, spec)
    for d, g in zip(s, shape, strict=True):
        if d is not None and d != g:
            raise _mismatch(arr, spec)


# --------------------------------------------------------------------------- encode


@lru_cache(maxsize=256)
def negotiate(accept: str | None) -> Encoding:
    """Pick the response encoding from Accept; JSON when absent or anything goes.

    The first supported type listed wins (clients of this API send one type;
    quality values are not worth parsing on the hot path).
    """
    if not accept:
        return Encoding.JSON
    for part in accept.split(","):
        mt = media_type(part)
        if mt in (JSON, "*/*", "application/*"):
            return Encoding.JSON
        if mt in (CSV, "text/*"):
            return Encoding.CSV
        if mt == NPY:
            return Encoding.NPY
    raise ValidationError(f"Accept {accept!r} is not supported: ask for {_ENCODABLE}")


def encode_response(outputs: Tensors, encoding: Encoding) -> bytes:
    """Encode model outputs for ``/invocations``.

    JSON: ``{"predictions": <output>}`` for one output, ``{"predictions":
    {name: output, ...}}`` for several. CSV and .npy carry the first output
    (the prediction, by the converters' convention).
    """
    if encoding is Encoding.JSON:
        if len(outputs) == 1:
            preds: Any = next(iter(outputs.values()))
        else:
            preds = outputs
        return dumps({"predictions": preds})
    first = next(iter(outputs.values()))
    if encoding is Encoding.CSV:
        return _to_csv(first)
    return _to_npy(first)


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
        if arr.ndim == 1:
            return js[1:-1].replace(b",", b"\n") + b"\n"
        return js[2:-2].replace(b"],[", b"\n") + b"\n"
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    rows = arr.tolist()
    writer.writerows(rows if arr.ndim == 2 else [[v] for v in rows])
    return buf.getvalue().encode()


def _to_npy(arr: Array) -> bytes:
    if arr.dtype.kind == "O":
        arr = arr.astype(str)
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


# --------------------------------------------------------------------------- V2


@dataclass(frozen=True)
class V2Request:
    inputs: Tensors
    #: Requested outputs, or None for all of them.
    output_names: list[str] | None
    id: str | None


def decode_v2(body: bytes, meta: ModelMetadata) -> V2Request:
    """Decode a V2 ``infer`` request and check it against the model's metadata."""
    doc = _loads(body)
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list) or not doc["inputs"]:
        raise ValidationError('V2 request must be a JSON object with a non-empty "inputs" list '
                              'of {"name", "shape", "datatype", "data"}')
    inputs = _decode_v2_inputs(doc["inputs"], meta.inputs)
    output_names: list[str] | None = None
    if doc.get("outputs") is not None:
        outs = doc["outputs"]
        if not isinstance(outs, list) or not all(
            isinstance(o, dict) and isinstance(o.get("name"), str) for o in outs
        ):
            raise ValidationError('V2 "outputs" must be a list of {"name": "<output>"}')
        output_names = [o["name"] for o in outs]
        known = [t.name for t in meta.outputs]
        unknown = [n for n in output_names if n not in known]
        if unknown:
            raise ValidationError(
                "Requested outputs " + ", ".join(f'"{n}"' for n in unknown)
                + " are not outputs of the model: it has " + ", ".join(f'"{n}"' for n in known)
            )
    rid = doc.get("id")
    return V2Request(inputs, output_names, None if rid is None else str(rid))


def _decode_v2_inputs(items: list[Any], inputs: Sequence[TensorSpec]) -> Tensors:
    raw: dict[str, Array] = {}
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ValidationError(f'V2 input {i} must be an object with a "name"')
        name = item["name"]
        if name in raw:
            raise ValidationError(f'V2 input "{name}" is given twice: send each input once')
        raw[name] = _v2_tensor(name, item)
    _check_names(set(raw), inputs)
    return {spec.name: to_tensor(raw[spec.name], spec) for spec in inputs}


def _v2_tensor(name: str, item: dict[str, Any]) -> Array:
    shape, datatype, data = item.get("shape"), item.get("datatype"), item.get("data")
    params = item.get("parameters") or {}
    if isinstance(params, dict) and "binary_data_size" in params:
        raise ValidationError(f'V2 input "{name}" uses the binary data extension, which is '
                              'not supported: send the values in "data"')
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ValidationError(f'V2 input "{name}" needs "shape": a list of non-negative ints')
    dtype = numpy_dtype(datatype) if isinstance(datatype, str) else None
    if dtype is None:
        raise ValidationError(f'V2 input "{name}" has unknown "datatype" {datatype!r}: use '
                              "BOOL, INT8..INT64, UINT8..UINT64, FP16, FP32, FP64 or BYTES")
    if data is None:
        raise ValidationError(f'V2 input "{name}" needs "data"')
    declared = TensorSpec(name, dtype, None)
    try:
        arr = np.array(data, dtype=object) if dtype.kind == "O" else np.array(data)
    except (ValueError, TypeError):
        raise ValidationError(f'V2 input "{name}" "data" is not a rectangular array') from None
    if arr.dtype.kind == "O" and dtype.kind != "O":
        raise _mismatch(arr, declared)
    arr = _coerce(arr, declared) if dtype.kind != "O" else arr
    expected = math.prod(shape)
    if arr.size != expected:
        raise ValidationError(f'V2 input "{name}" has {arr.size} values in "data" but '
                              f'"shape" {shape} needs {expected}')
    return arr.reshape(shape)


def encode_v2(outputs: Tensors, model_name: str, model_version: str | None,
              request_id: str | None) -> bytes:
    doc: dict[str, Any] = {"model_name": model_name}
    if model_version is not None:
        doc["model_version"] = model_version
    if request_id is not None:
        doc["id"] = request_id
    doc["outputs"] = [
        {"name": name, "shape": list(arr.shape), "datatype": v2_datatype(arr.dtype),
         "data": arr.reshape(-1)}
        for name, arr in outputs.items()
    ]
    return dumps(doc)
