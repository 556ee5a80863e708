"""What the model takes and returns, and the inputs every candidate is checked on.

Read from the ONNX graph (inputs that are not initializers, outputs, every
node's op including those in subgraphs). TVM builds one library per static
shape, so a model qualifies when its inputs' only dynamic dimension is the
leading (batch) one; a fully static model compiles at its one shape. Test
inputs are generated from the signature with a fixed seed (normal floats, small
integers) at each batch size, plus an uncompiled odd size that exercises the
serving path's split-and-pad, plus the calibration rows when given (``.npz``
with one array per input, or ``.npy`` for a one-input model).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kubeinfer_runtime.compile.errors import BadInput
from kubeinfer_runtime.models.base import Tensors, TensorSpec

#: Rows taken from a calibration set at most (the gate needs a sample, not all).
MAX_CALIBRATION_ROWS = 4096
#: Stand-in for dynamic dimensions other than the batch when generating inputs.
FREE_DIM = 8


@dataclass(frozen=True)
class ModelInfo:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    #: (domain, op_type) of every node, subgraphs included.
    ops: tuple[tuple[str, str], ...]

    @property
    def batched(self) -> bool:
        """Every input has a dynamic leading dimension (the batch)."""
        return all(t.shape is not None and t.shape and t.shape[0] is None for t in self.inputs)

    def static_problem(self) -> str:
        """Why TVM cannot build this model at static shapes ("" when it can)."""
        for t in self.inputs:
            if t.shape is None:
                return f"input {t.name} declares no shape"
            rest = t.shape[1:] if self.batched else t.shape
            if any(d is None for d in rest):
                return (f"input {t.name} {t.describe()} has dynamic dimensions besides the "
                        "batch: export the model with static shapes")
        return ""

    def shapes(self, batch: int | None) -> dict[str, tuple[int, ...]]:
        """Concrete input shapes at ``batch`` rows (None: the model's own static shapes)."""
        out = {}
        for t in self.inputs:
            dims = list(t.shape or ())
            if self.batched and batch is not None:
                dims[0] = batch
            out[t.name] = tuple(FREE_DIM if d is None else d for d in dims)
        return out


def _dims(value_info: Any) -> tuple[int | None, ...] | None:
    tt = value_info.type.tensor_type
    if not tt.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                 for d in tt.shape.dim)


def _spec(value_info: Any) -> TensorSpec:
    from onnx import helper

    if value_info.type.WhichOneof("value") != "tensor_type":
        raise BadInput(f"Model input or output {value_info.name!r} is not a tensor: only "
                       "tensor models can be compiled")
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(value_info.type.tensor_type.elem_type))
    return TensorSpec(value_info.name, dtype, _dims(value_info))


def _nodes(graph: Any) -> Iterator[tuple[str, str]]:
    from onnx import AttributeProto

    for node in graph.node:
        yield node.domain, node.op_type
        for attr in node.attribute:
            if attr.type == AttributeProto.GRAPH:
                yield from _nodes(attr.g)
            elif attr.type == AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _nodes(g)


def read_model(path: Path) -> tuple[Any, ModelInfo]:
    """The ONNX ModelProto at ``path`` and its signature; BadInput when it is not ONNX."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(str(path))
    except (DecodeError, ValueError, OSError) as e:
        raise BadInput(f"Model {path.name} is not an ONNX model ({type(e).__name__}): give a "
                       ".onnx file") from None
    except onnx.checker.ValidationError:
        # onnx refuses external data outside the model's folder, absolute or through a link.
        raise BadInput(f"Model {path.name} names external data that is not a plain file in "
                       "its own folder (a '..' or absolute path, or a symbolic link): save "
                       "the model with its weights inside it, or beside it") from None
    if not model.graph.node:
        raise BadInput(f"Model {path.name} has no graph nodes: give a .onnx model")
    inits = {i.name for i in model.graph.initializer}
    inputs = tuple(_spec(v) for v in model.graph.input if v.name not in inits)
    outputs = tuple(_spec(v) for v in model.graph.output)
    return model, ModelInfo(inputs, outputs, tuple(_nodes(model.graph)))


def generated(info: ModelInfo, batch: int | None, seed: int) -> Tensors:
    """Inputs at ``batch`` rows from the signature: normal floats, small ints, random bools."""
    rng = np.random.default_rng(seed)
    out: Tensors = {}
    for t in info.inputs:
        shape = info.shapes(batch)[t.name]
        kind = t.dtype.kind
        if kind == "f":
            out[t.name] = rng.standard_normal(shape).astype(t.dtype)
        elif kind in "iu":
            out[t.name] = rng.integers(0, 4, size=shape).astype(t.dtype)
        elif kind == "b":
            out[t.name] = rng.integers(0, 2, size=shape).astype(np.bool_)
        else:
            raise BadInput(f"Input {t.name} is {t.describe()}: only numeric inputs can be "
                           "generated; give a calibration set")
    return out


def load_calibration(path: Path, info: ModelInfo) -> Tensors:
    """The calibration rows (at most MAX_CALIBRATION_ROWS), checked against the signature."""
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise BadInput(f"Calibration file {path.name} is not a .npy or .npz file ({e}): save "
                       "it with numpy.save or numpy.savez") from None
    if isinstance(data, np.ndarray):
        if len(info.inputs) != 1:
            raise BadInput(f"Calibration file {path.name} holds one array but the model has "
                           f"{len(info.inputs)} inputs: save an .npz keyed by input name")
        arrays = {info.inputs[0].name: data}
    else:
        with data:
            missing = [t.name for t in info.inputs if t.name not in data.files]
            if missing:
                raise BadInput(f"Calibration file {path.name} lacks inputs "
                               f"{', '.join(missing)}: save an .npz keyed by input name")
            arrays = {t.name: data[t.name] for t in info.inputs}
    for t in info.inputs:
        a = arrays[t.name]
        want = info.shapes(None)[t.name]
        ok = (a.ndim == len(want) and a.shape[1:] == want[1:]) if info.batched else \
            a.shape == want
        if not ok:
            raise BadInput(f"Calibration input {t.name} has shape {list(a.shape)}, the model "
                           f"takes {t.describe()}: fix the calibration set")
        arrays[t.name] = a.astype(t.dtype, copy=False)
    if info.batched:
        arrays = {k: v[:MAX_CALIBRATION_ROWS] for k, v in arrays.items()}
    return arrays


def batches(rows: Tensors, size: int) -> list[Tensors]:
    """``rows`` cut into batches of exactly ``size`` (a short last one dropped)."""
    n = min(a.shape[0] for a in rows.values()) if rows else 0
    return [{k: np.ascontiguousarray(v[i:i + size]) for k, v in rows.items()}
            for i in range(0, n - size + 1, size)]
