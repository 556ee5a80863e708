"""The onnxruntime backend: CPU execution provider, all graph optimisations.

onnxruntime releases the GIL while it runs, so one session serves concurrent
requests from a thread pool; ``InferenceSession.run`` is thread-safe.

A model is untrusted bytes, and an ONNX model may keep its weights in "external
data" files it names (``location``). onnxruntime before 1.24.1 read whatever file
that names (``../../var/run/secrets/...``, an absolute path, a symbolic link), so
a crafted model returned any file the model server can read, its mounted
credentials included, as predictions. 1.24.1 and later refuse a location outside
the model's folder (after resolving links); on an older onnxruntime this backend
loads nothing (:func:`external_data_problem` says why) rather than rely on it.
"""

from __future__ import annotations

import gc
import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

from kubeinfer_runtime.errors import ModelError, ValidationError
from kubeinfer_runtime.models.base import (
    Backend,
    ModelLoadError,
    ModelMetadata,
    Shape,
    Tensors,
    TensorSpec,
)

#: onnxruntime's type strings ("tensor(float)") -> numpy dtypes.
_ORT_DTYPES: dict[str, np.dtype[Any]] = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(double)": np.dtype(np.float64),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(int8)": np.dtype(np.int8),
    "tensor(int16)": np.dtype(np.int16),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(uint8)": np.dtype(np.uint8),
    "tensor(uint16)": np.dtype(np.uint16),
    "tensor(uint32)": np.dtype(np.uint32),
    "tensor(uint64)": np.dtype(np.uint64),
    "tensor(bool)": np.dtype(np.bool_),
    "tensor(string)": np.dtype(object),
}


#: The first onnxruntime that refuses external data outside the model's folder.
SAFE_ORT_VERSION = (1, 24, 1)


def external_data_problem(version: str) -> str | None:
    """Pure: why onnxruntime ``version`` must not load untrusted models, or None."""
    parts: list[int] = []
    for piece in version.split(".")[:3]:
        digits = "".join(itertools.takewhile(str.isdigit, piece))
        parts.append(int(digits) if digits else 0)
    if tuple(parts) >= SAFE_ORT_VERSION:
        return None
    wanted = ".".join(map(str, SAFE_ORT_VERSION))
    return (f"onnxruntime {version} reads a model's external data from any file the model "
            "names (paths outside the model's folder, symbolic links), so a crafted model "
            "could return files of this server as predictions: this model server loads no "
            f"ONNX model until onnxruntime>={wanted} is installed")


_ORT_PROBLEM = external_data_problem(ort.__version__)


def _spec(arg: Any) -> TensorSpec:
    # Non-tensor values (sequences, maps: scikit-learn's ZipMap) are objects of
    # unknown shape.
    dtype = _ORT_DTYPES.get(arg.type, np.dtype(object))
    shape: Shape | None = None
    if arg.type.startswith("tensor(") and arg.shape is not None:
        # Symbolic ("N", "batch") and missing dimensions are dynamic.
        shape = tuple(d if isinstance(d, int) and d >= 0 else None for d in arg.shape)
    return TensorSpec(arg.name, dtype, shape)


class OnnxBackend(Backend):
    def __init__(self, *, intra_op_threads: int = 1) -> None:
        self._intra_op_threads = intra_op_threads
        self._session: ort.InferenceSession | None = None
        self._run: Any = None
        self._all_tensors = True
        self._meta: ModelMetadata | None = None
        self._output_names: list[str] = []

    def load(self, path: Path) -> None:
        if _ORT_PROBLEM is not None:
            raise ModelLoadError(_ORT_PROBLEM)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self._intra_op_threads
        # One request runs one graph; inter-op parallelism only adds threads.
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            session = ort.InferenceSession(str(path), sess_options=opts,
                                           providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own pybind classes
            raise ModelLoadError(_load_failure(path, str(e))) from None
        self._session = session
        # The pybind session's run, without the Python wrapper's per-call checks
        # (input names, OrtValue ownership, EP fallback): the codec has already
        # checked every input against the metadata, and the wrapper's checks
        # cost about as much as a small model. Falls back to the public API.
        inner = getattr(session, "_sess", None)
        self._run = inner.run if inner is not None and hasattr(inner, "run") else session.run
        self._meta = ModelMetadata(
            inputs=tuple(_spec(a) for a in session.get_inputs()),
            outputs=tuple(_spec(a) for a in session.get_outputs()),
            platform="onnxruntime_onnx",
        )
        self._output_names = [t.name for t in self._meta.outputs]
        # Sequence/map outputs (scikit-learn's ZipMap) come back as lists.
        self._all_tensors = all(a.type.startswith("tensor(") for a in session.get_outputs())

    def predict(self, inputs: Tensors,
                output_names: Sequence[str] | None = None) -> Tensors:
        run = self._run
        if run is None:
            raise ModelError("Model is not loaded: wait until /ping answers 200")
        names = self._output_names if output_names is None else list(output_names)
        try:
            values = run(names, inputs, None)
        except InvalidArgument as e:
            raise ValidationError(f"Model rejected the input: {_clean(e)}") from None
        except Exception as e:
            raise ModelError(f"Model failed: {_clean(e)}") from None
        out = dict(zip(names, values, strict=True))
        if not self._all_tensors:
            for n, v in out.items():
                if not isinstance(v, np.ndarray):
                    out[n] = np.asarray(v, dtype=object)
        return out

    def unload(self) -> None:
        self._session = None
        self._run = None
        self._meta = None
        gc.collect()

    def metadata(self) -> ModelMetadata:
        if self._meta is None:
            raise ModelError("Model is not loaded")
        return self._meta


def _load_failure(path: Path, message: str) -> str:
    """Pure: the message of a refused load, from onnxruntime's. An external-data refusal
    is described, not quoted: onnxruntime's text holds the paths the model names and
    where they resolve to."""
    if "external data" in message.lower():
        return (f"ONNX Runtime cannot load {path}: the model names external data (weights "
                "in other files) that is missing, outside the model's own folder, an "
                "absolute path or a symbolic link; external data must be plain files beside "
                "the model, and a model downloaded from s3:// is that one object only: save "
                "the model with its weights inside it, or serve it from a file:// folder")
    return (f"ONNX Runtime cannot load {path} ({_clean_text(message)}): check that the file "
            "is an ONNX model and the format is onnx")


def _clean(e: Exception) -> str:
    """onnxruntime messages start with ``[ONNXRuntimeError] : 2 : INVALID_ARGUMENT :``."""
    return _clean_text(str(e)) or type(e).__name__


def _clean_text(msg: str) -> str:
    msg = msg.strip()
    if msg.startswith("[ONNXRuntimeError]"):
        msg = msg.split(" : ", 3)[-1]
    return msg.rstrip(".")
