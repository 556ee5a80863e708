"""The TVM backend: Relax VM libraries compiled for static batch sizes, called zero-copy.

TVM's tuned kernels need static shapes, so a compiled model is one library per
batch size (``libraries``). A request of any other size is served by running
compiled sizes in turn (:class:`SplitPlanner` picks the cheapest cover from the
measured latency of each size) and padding the last chunk with zeros; rows are
independent in the models this applies to, which the compiler checks (its
accuracy gate runs an uncompiled size through the same path).

Tensors cross between numpy and TVM through DLPack without copies
(``tvm_ffi.from_dlpack`` in, ``np.from_dlpack`` out): copying doubled TVM's
batch-1 latency. The one exception is an input not aligned to 64 bytes: TVM's
kernels assume that alignment (a misaligned convolution input segfaults), so
such an input is copied into an aligned buffer first.

``import tvm`` is lazy and loads only the TVM runtime
(``TVM_USE_RUNTIME_LIB``), so a model server serving ONNX never pays for it,
and ``TVM_NUM_THREADS`` is set from the same intra-op thread count as the
onnx backend's before TVM starts its thread pool. A Relax VM keeps call state,
so each thread calling ``predict`` gets its own VM over the shared library.
"""

from __future__ import annotations

import gc
import os
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kubeinfer_runtime.errors import ModelError, ValidationError
from kubeinfer_runtime.models.base import (
    Array,
    Backend,
    ModelLoadError,
    ModelMetadata,
    Tensors,
    TensorSpec,
)


@dataclass(frozen=True)
class TvmLibrary:
    """One compiled library: the file (relative to the artifact) and its static batch size."""

    file: str
    #: None: the model has no batch dimension (one fixed shape).
    batch_size: int | None


def import_tvm(threads: int) -> Any:
    """``tvm``, imported once per process with ``threads`` worker threads (runtime only
    when the compiler is not already loaded)."""
    if "tvm" not in sys.modules:
        os.environ.setdefault("TVM_NUM_THREADS", str(threads))
        os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")
    import tvm

    return tvm


class SplitPlanner:
    """Pure: how to run a request of any row count on libraries of fixed batch sizes.

    ``latency`` maps each compiled batch size to its measured latency. A plan
    is a list of (rows taken, batch size run) calls, the last one possibly padded
    (rows taken < batch size). Whole calls of the size cheapest per row come
    first; the remainder gets the cheapest cover (dynamic programming over at
    most the largest batch size, computed once).
    """

    def __init__(self, latency: dict[int, float]) -> None:
        if not latency or any(b < 1 for b in latency):
            raise ValueError("batch sizes must be >= 1")
        self._cost = dict(latency)
        self._best = min(latency, key=lambda b: (latency[b] / b, -b))
        top = max(latency)
        # table[x]: (total cost, batch size of the first call) to cover x rows.
        table: list[tuple[float, int]] = [(0.0, 0)]
        for x in range(1, top + 1):
            table.append(min((c + table[max(0, x - b)][0], b) for b, c in latency.items()))
        self._table = table

    def plan(self, rows: int) -> list[tuple[int, int]]:
        if rows <= 0:
            return []
        best = self._best
        full = max(0, (rows - 1) // best)
        out = [(best, best)] * full
        left = rows - full * best
        while left > 0:
            size = self._table[left][1]
            take = min(size, left)
            out.append((take, size))
            left -= take
        return out

    def cost(self, plan: list[tuple[int, int]]) -> float:
        return sum(self._cost[b] for _, b in plan)


class TvmBackend(Backend):
    """Serves TVM libraries (one per static batch size) of one model."""

    def __init__(self, *, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                 libraries: Sequence[TvmLibrary], latency_s: dict[int, float] | None = None,
                 intra_op_threads: int = 1) -> None:
        if not libraries:
            raise ValueError("a TVM model needs at least one library")
        self._inputs = tuple(inputs)
        self._outputs = tuple(outputs)
        self._libraries = tuple(libraries)
        self._threads = intra_op_threads
        batched = [lib.batch_size for lib in libraries if lib.batch_size is not None]
        self._batched = bool(batched)
        lat = latency_s or {}
        # Unmeasured sizes: assume a per-call overhead plus a cost per row.
        self._planner = (SplitPlanner({b: lat.get(b, 1.0 + b / 8) for b in batched})
                         if batched else None)
        self._modules: dict[int | None, Any] = {}
        self._local = threading.local()
        self._meta: ModelMetadata | None = None
        self._tvm: Any = None
        self._vm: Any = None
        self._from_dlpack: Any = None

    def load(self, path: Path) -> None:
        """Load every library under the artifact directory ``path``."""
        tvm = import_tvm(self._threads)
        import tvm_ffi
        from tvm.runtime.vm import VirtualMachine

        modules: dict[int | None, Any] = {}
        for lib in self._libraries:
            file = path / lib.file
            try:
                modules[lib.batch_size] = tvm.runtime.load_module(str(file))
            except Exception as e:  # TVM raises its own error classes
                raise ModelLoadError(f"TVM cannot load {file.name} ({_first_line(e)}): "
                                     "recompile the model for this host") from None
        self._tvm = tvm
        self._vm = VirtualMachine
        self._from_dlpack = tvm_ffi.from_dlpack
        self._modules = modules
        self._local = threading.local()
        batch: list[int | None] = [None]
        self._meta = ModelMetadata(
            inputs=tuple(self._spec(t, batch) for t in self._inputs),
            outputs=tuple(self._spec(t, batch) for t in self._outputs),
            platform="tvm",
        )

    def _spec(self, t: TensorSpec, batch: list[int | None]) -> TensorSpec:
        if not self._batched or t.shape is None or not t.shape:
            return t
        return TensorSpec(t.name, t.dtype, (batch[0], *t.shape[1:]))

    def _mains(self) -> dict[int | None, Any]:
        """This thread's VM entry points, one per library (created on first use)."""
        mains: dict[int | None, Any] | None = getattr(self._local, "mains", None)
        if mains is None:
            cpu = self._tvm.cpu()
            # The VMs must outlive their functions: ``vm["main"]`` does not keep its VM
            # (and the VM's constants, the weights) alive.
            self._local.vms = {b: self._vm(m, cpu) for b, m in self._modules.items()}
            mains = {b: vm["main"] for b, vm in self._local.vms.items()}
            self._local.mains = mains
        return mains

    def predict(self, inputs: Tensors,
                output_names: Sequence[str] | None = None) -> Tensors:
        if self._meta is None:
            raise ModelError("Model is not loaded: wait until /ping answers 200")
        mains = self._mains()
        arrays = [np.ascontiguousarray(inputs[t.name]) for t in self._inputs]
        if not self._batched:
            outs = self._run(mains[None], arrays)
        else:
            rows = {a.shape[0] if a.ndim else -1 for a in arrays}
            if len(rows) != 1 or -1 in rows:
                raise ValidationError("Every input must have the same number of rows "
                                      f"(got {sorted(rows)}): send one batch")
            outs = self._run_batched(mains, arrays, rows.pop())
        out = dict(zip((t.name for t in self._outputs), outs, strict=True))
        if output_names is None:
            return out
        return {n: out[n] for n in output_names}

    def _run(self, main: Any, arrays: list[Array]) -> list[Array]:
        try:
            result = main(*(self._from_dlpack(aligned(a)) for a in arrays))
        except Exception as e:
            raise ModelError(f"Model failed: {_first_line(e)}") from None
        if isinstance(result, self._tvm.runtime.Tensor):
            return [np.from_dlpack(result)]
        return [np.from_dlpack(r) for r in result]

    def _run_batched(self, mains: dict[int | None, Any], arrays: list[Array],
                     rows: int) -> list[Array]:
        if rows == 0:
            raise ValidationError("The request holds no rows: send at least one")
        parts: list[list[Array]] = []
        start = 0
        assert self._planner is not None
        for take, size in self._planner.plan(rows):
            chunk = [a[start:start + take] for a in arrays]
            if take < size:
                chunk = [_pad(a, size) for a in chunk]
            outs = self._run(mains[size], chunk)
            parts.append([o[:take] if take < size else o for o in outs])
            start += take
        if len(parts) == 1:
            return parts[0]
        return [np.concatenate(cols) for cols in zip(*parts, strict=True)]

    def unload(self) -> None:
        self._modules = {}
        self._local = threading.local()
        self._meta = None
        gc.collect()

    def metadata(self) -> ModelMetadata:
        if self._meta is None:
            raise ModelError("Model is not loaded")
        return self._meta


#: TVM's kernels assume their buffers start on this boundary (``kAllocAlignment``) and
#: use aligned vector loads: a misaligned input does not fail cleanly, it crashes.
ALIGNMENT = 64


def aligned(a: Array) -> Array:
    """``a`` itself when its data starts on ``ALIGNMENT`` bytes (zero copy), else an
    aligned copy (numpy's small arrays are only 16-byte aligned)."""
    if a.ctypes.data % ALIGNMENT == 0:
        return a
    raw = np.empty(a.nbytes + ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    out = raw[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def _pad(a: Array, rows: int) -> Array:
    out = np.zeros((rows, *a.shape[1:]), a.dtype)
    out[:a.shape[0]] = a
    return out


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]
