"""Which backend serves which model format.

The server asks the registry for a backend by the ``ModelFormat`` it was
configured with; a new format is one entry here (``compiled``: an artifact of
``kubeinfer compile``, served by the TVM or the onnx backend its manifest
names). Backends are imported lazily so a process only pays for the runtime it
uses.
"""

from __future__ import annotations

from kubeinfer_runtime.models.base import Backend
from kubeinfer_runtime.wire import ModelFormat


def create_backend(fmt: ModelFormat, *, intra_op_threads: int = 1) -> Backend:
    """A fresh, unloaded backend for ``fmt``."""
    if fmt is ModelFormat.ONNX:
        from kubeinfer_runtime.models.onnx import OnnxBackend

        return OnnxBackend(intra_op_threads=intra_op_threads)
    if fmt is ModelFormat.COMPILED:
        from kubeinfer_runtime.models.compiled import CompiledBackend

        return CompiledBackend(intra_op_threads=intra_op_threads)
    raise ValueError(f"Model format {fmt.value!r} has no backend: supported formats are "
                     + ", ".join(f.value for f in ModelFormat))
