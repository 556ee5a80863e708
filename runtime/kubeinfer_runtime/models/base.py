"""The one interface every model backend implements, and the tensor metadata it reports.

The server, the codec and (later) the multi-model cache only ever talk to
:class:`Backend`, so adding a backend (TVM, ...) never touches them. Tensor
metadata is plain numpy dtypes and tuples: cheap to compare on every request.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

#: Any numpy array; tensors travel as dicts of these keyed by tensor name.
Array = npt.NDArray[Any]
Tensors = dict[str, Array]

#: A tensor shape as models declare it: ``None`` marks a dynamic dimension.
Shape = tuple[int | None, ...]

# V2 (Open Inference Protocol) datatype names <-> numpy dtypes. Strings are
# object arrays in numpy and onnxruntime, BYTES in V2.
_V2_TO_NUMPY: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}
_NUMPY_TO_V2: dict[np.dtype[Any], str] = {v: k for k, v in _V2_TO_NUMPY.items()}


def v2_datatype(dtype: np.dtype[Any]) -> str:
    """The V2 datatype name of a numpy dtype (unicode/bytes strings are BYTES)."""
    if dtype.kind in "USO":
        return "BYTES"
    try:
        return _NUMPY_TO_V2[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} has no V2 datatype") from None


def numpy_dtype(v2: str) -> np.dtype[Any] | None:
    """The numpy dtype of a V2 datatype name, or None when it is not one."""
    return _V2_TO_NUMPY.get(v2)


def dtype_name(dtype: np.dtype[Any]) -> str:
    """Short human name used in error messages: float32, int64, string."""
    return "string" if dtype.kind in "USO" else dtype.name


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output as the model declares it."""

    name: str
    dtype: np.dtype[Any]
    #: None when the model does not declare a rank at all.
    shape: Shape | None

    @cached_property
    def batch_tail(self) -> tuple[int, ...] | None:
        """The static dims after a dynamic batch dim (``(4,)`` for [N, 4]), else None.

        Lets the codec check the usual input shape with one tuple comparison.
        """
        s = self.shape
        if s is None or not s or s[0] is not None or any(d is None for d in s[1:]):
            return None
        return tuple(d for d in s[1:] if d is not None)

    def describe(self) -> str:
        """``[N, 4] float32``: the form error messages use."""
        if self.shape is None:
            dims = "any shape"
        else:
            dims = "[" + ", ".join("N" if d is None else str(d) for d in self.shape) + "]"
        return f"{dims} {dtype_name(self.dtype)}"

    def v2(self) -> dict[str, Any]:
        """V2 tensor metadata: dynamic dimensions are -1."""
        shape = [] if self.shape is None else [-1 if d is None else d for d in self.shape]
        return {"name": self.name, "datatype": v2_datatype(self.dtype), "shape": shape}


@dataclass(frozen=True)
class ModelMetadata:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    #: V2 platform string, e.g. ``onnxruntime_onnx``.
    platform: str

    def input(self, name: str) -> TensorSpec | None:
        return next((t for t in self.inputs if t.name == name), None)

    def output(self, name: str) -> TensorSpec | None:
        return next((t for t in self.outputs if t.name == name), None)


class ModelLoadError(Exception):
    """The model file could not be loaded (corrupt, unsupported, wrong format)."""


class Backend(ABC):
    """A loaded model: ``load`` once, ``predict`` many times (thread-safe), ``unload``."""

    @abstractmethod
    def load(self, path: Path) -> None:
        """Load the model file at ``path``; raise :class:`ModelLoadError` when it cannot."""

    @abstractmethod
    def predict(self, inputs: Tensors,
                output_names: Sequence[str] | None = None) -> Tensors:
        """Run the model. ``inputs`` are already checked against :meth:`metadata`.

        Raises :class:`~kubeinfer_runtime.errors.ValidationError` when the backend
        rejects the input, :class:`~kubeinfer_runtime.errors.ModelError` when the
        model fails.
        """

    @abstractmethod
    def unload(self) -> None:
        """Release the model's memory; the backend may be loaded again afterwards."""

    @abstractmethod
    def metadata(self) -> ModelMetadata:
        """Inputs and outputs of the loaded model."""
