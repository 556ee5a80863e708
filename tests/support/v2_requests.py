"""Generated Open Inference Protocol V2 ``infer`` requests (hypothesis), clean and not.

Shared by the tests that hold the V2 lane to the general decoder
(tests/unit/test_v2_lane.py) and the inline HTTP path to the ASGI path
(tests/integration/test_inline_http.py). Half the requests are clean (what
stock clients send: JSON or binary tensors, ids, requested outputs, in any key
order and spacing); the rest carry mistakes a client makes: other datatypes,
shapes to promote or wrong, floats and bools in shapes, nulls, strings and
ragged rows in data, counts and binary sizes that do not add up, duplicate,
unknown and missing inputs.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from hypothesis import strategies as st

from kubeinfer_runtime.models.base import ModelMetadata, numpy_dtype, v2_datatype

DATATYPES = ["FP32", "FP64", "FP16", "INT64", "INT32", "UINT8", "BOOL", "BYTES", "fp32", "??"]


def _values(draw: st.DrawFn, dtype: np.dtype[Any], count: int) -> np.ndarray:
    kind = dtype.kind
    if kind == "b":
        return np.array(draw(st.lists(st.booleans(), min_size=count, max_size=count)), dtype)
    if kind in "iu":
        return np.array(draw(st.lists(st.integers(0, 100), min_size=count, max_size=count)),
                        dtype)
    floats = st.floats(-6e4, 6e4, allow_nan=False, width=32)  # within FP16 too
    return np.array(draw(st.lists(floats, min_size=count, max_size=count)), dtype)


def _data(draw: st.DrawFn, arr: np.ndarray, messy: bool) -> Any:
    """``arr`` as V2 ``data``: flat or nested, now and then spoilt."""
    data: Any = arr.reshape(-1).tolist() if draw(st.booleans()) else arr.tolist()
    spoil = draw(st.integers(0, 9)) if messy else -1
    flat = arr.reshape(-1).tolist()
    if spoil == 0 and flat:
        flat[draw(st.integers(0, len(flat) - 1))] = draw(
            st.sampled_from([None, "1", [1], {"a": 1}, 1.5, True, -1, 2**70, 1e300]))
        return flat
    if spoil == 1:
        return [*flat, 1]  # one value too many
    if spoil == 2 and flat:
        return flat[:-1]
    if spoil == 3 and arr.ndim >= 2 and arr.shape[0] >= 2 and arr.shape[1] >= 1:
        nested = arr.tolist()
        nested[0] = nested[0][:-1]  # ragged
        return nested
    if spoil == 4:
        return [int(v) for v in flat] if arr.dtype.kind in "fb" else [float(v) for v in flat]
    if spoil == 5:
        return flat[0] if flat else 0  # a scalar
    return data


@st.composite
def requests(draw: st.DrawFn, meta: ModelMetadata) -> tuple[bytes, int | None]:
    """A V2 request body for a model of ``meta`` (and its Inference-Header-Content-Length)."""
    binary = draw(st.integers(0, 2)) == 0
    # Half the requests are clean (the lane must take them); the rest have mistakes.
    messy = draw(st.booleans())

    def rare(n: int) -> bool:
        return messy and draw(st.integers(0, n)) == 0

    specs = list(meta.inputs)
    if draw(st.integers(0, 9)) == 0:
        specs = draw(st.permutations(specs))
    items: list[dict[str, Any]] = []
    raws: list[bytes] = []
    n = draw(st.integers(0, 3))
    for spec in specs:
        tail = [d if d is not None else draw(st.integers(0, 2)) for d in (spec.shape or ())[1:]]
        shape: list[Any] = [n, *tail]
        mistake = draw(st.integers(0, 9)) if messy else -1
        if mistake == 0 and tail:
            shape = tail  # one instance without its batch dimension: promoted
        elif mistake == 1 and tail:
            shape = [n, tail[0] + 1, *tail[1:]]
        elif mistake == 2:
            shape = [float(d) for d in shape]
        elif mistake == 3:
            shape = [*shape, 1]
        elif mistake == 4:
            shape = [-1, *tail]
        elif mistake == 5:
            shape = [True, *tail]
        ok = all(isinstance(d, (int, float)) and d >= 0 for d in shape)
        dims = [int(d) for d in shape] if ok else [0]
        count = int(np.prod(dims))
        datatype = v2_datatype(spec.dtype)
        if rare(4):
            datatype = draw(st.sampled_from(DATATYPES))
        dtype = codec_dtype(datatype) or spec.dtype
        arr = _values(draw, dtype, count).reshape(dims) if count else np.zeros(dims, dtype)
        name = draw(st.sampled_from(["", "zz", "X "])) if rare(9) else spec.name
        item: dict[str, Any] = {"name": name, "shape": shape, "datatype": datatype}
        if binary and not rare(5):
            raw = arr.astype(dtype.newbyteorder("<")).tobytes() if dtype.kind != "O" else b""
            size = len(raw) + (draw(st.sampled_from([-1, 1])) if rare(4) else 0)
            item["parameters"] = {"binary_data_size": max(size, 0)}
            raws.append(raw)
        else:
            item["data"] = _data(draw, arr, messy)
            if rare(9):
                item["parameters"] = {"binary_data_size": 4}
        items.append(item)
    if rare(9):
        items = items + items[:1]  # an input twice
    if rare(9):
        items = items[1:]
    doc: dict[str, Any] = {}
    if draw(st.booleans()):
        doc["id"] = draw(st.one_of(st.text(max_size=8), st.integers(), st.floats(),
                                   st.none(), st.just({"a": 1}), st.booleans()))
    doc["inputs"] = items
    if draw(st.integers(0, 4)) == 0:
        names = [t.name for t in meta.outputs] + ["nope"]
        doc["outputs"] = [
            {"name": o, **({"parameters": {"binary_data": draw(st.booleans())}}
                           if draw(st.booleans()) else {})}
            for o in draw(st.lists(st.sampled_from(names), max_size=3, unique=True))]
    if draw(st.integers(0, 4)) == 0:
        doc["parameters"] = {"binary_data_output": draw(st.booleans())}
    if rare(5):
        doc = {"extra": [1, {"data": [2]}], **doc}
    style = draw(st.integers(0, 3))
    head = json.dumps(doc, indent=1 if style == 2 else None,
                      separators=(",", ":") if style < 2 else None).encode()
    if not binary:
        return head, None
    body = head + b"".join(raws)
    header_length = len(head) + (draw(st.sampled_from([-1, 1, len(body)])) if rare(4) else 0)
    return body, header_length


def codec_dtype(datatype: str) -> np.dtype[Any] | None:
    dtype = numpy_dtype(datatype)
    return None if dtype is None or dtype.kind == "O" else dtype
