"""ONNX → TVM Relax → a shared library for one target and one static batch size.

The recipe FACTS.md verified for TVM 0.27: ``from_onnx`` with every input's
static shape and dtype; the passes of TVM's static-shape tuning pipeline
(``DecomposeOpsForInference``, ``CanonicalizeBindings``, the ``zero`` pipeline)
under the target, so that tuning extracts exactly the kernels this build
compiles; tuning records applied when a database is given
(``MetaScheduleApplyDatabase``); ``tvm.compile``; ``export_library`` with the
target's cross compiler. Targets are dicts: TVM 0.27 refuses string targets,
and ``mcpu`` is the host CPU's LLVM name for ``native`` (``mcpu=native`` is
ignored). ``num-cores`` is the thread count the kernels are scheduled for, the
same as the measured and served ``TVM_NUM_THREADS``.

TVM is imported only here and in ``tuning`` (it takes seconds and ~200 MB);
``TVM_NUM_THREADS`` is set before the import so the runtime's thread pool
starts with it.
"""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from kubeinfer_runtime.compile.signature import ModelInfo
from kubeinfer_runtime.compile.targets import TargetSpec


def load_tvm(threads: int) -> Any:
    """The full TVM (compiler included); raises ImportError when it is not installed."""
    if "tvm" not in sys.modules:
        os.environ["TVM_NUM_THREADS"] = str(threads)
        os.environ.pop("TVM_USE_RUNTIME_LIB", None)
    import tvm
    from tvm.relax.frontend.onnx import from_onnx  # noqa: F401 - fails early when incomplete

    return tvm


def host_cpu(tvm: Any) -> str:
    return str(tvm.target.codegen.llvm_get_system_cpu())


def supported_ops() -> frozenset[str]:
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    return frozenset(_get_convert_map())


def tvm_target(tvm: Any, spec: TargetSpec, threads: int) -> Any:
    return tvm.target.Target({**spec.llvm(), "num-cores": threads})


def llvm_features(tvm: Any, spec: TargetSpec) -> set[str]:
    """The CPU features LLVM enables for ``spec`` (empty when LLVM cannot say)."""
    try:
        return set(tvm.target.codegen.llvm_get_cpu_features(tvm.target.Target(spec.llvm())))
    except Exception:  # an LLVM build without the target's backend
        return set()


def prepare(tvm: Any, model: Any, info: ModelInfo, batch: int | None, target: Any) -> Any:
    """The Relax module of ``model`` at ``batch`` rows, lowered as far as tuning starts."""
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    shapes = {k: list(v) for k, v in info.shapes(batch).items()}
    dtypes = {t.name: t.dtype.name for t in info.inputs}
    mod = from_onnx(model, shape_dict=shapes, dtype_dict=dtypes)
    with target:
        return tvm.transform.Sequential([
            relax.transform.DecomposeOpsForInference(),
            relax.transform.CanonicalizeBindings(),
            relax.get_pipeline("zero"),
        ])(mod)


def build(tvm: Any, mod: Any, target: Any, spec: TargetSpec, out: Path,
          database_dir: Path | None = None) -> None:
    """Compile ``mod`` (tuning records from ``database_dir`` applied) to the library ``out``."""
    from tvm import relax

    if database_dir is not None:
        from tvm.s_tir import meta_schedule as ms

        # The database opened here, not by the pass: the pass warns when it opens one.
        database = ms.database.JSONDatabase(work_dir=str(database_dir))
        with target, database:
            mod = relax.transform.MetaScheduleApplyDatabase()(mod)
    executable = tvm.compile(mod, target=target)
    out.parent.mkdir(parents=True, exist_ok=True)
    # -Bsymbolic: a library's references to its own symbols bind inside it, whatever
    # else is loaded: the libraries of one model (one per batch size) share names.
    kwargs: dict[str, Any] = {"options": ["-Wl,-Bsymbolic"]}
    if spec.cc:
        kwargs["cc"] = spec.cc
    executable.export_library(str(out), **kwargs)


def versions() -> dict[str, str]:
    """Versions recorded in the manifest and in the tuning cache key."""
    out = {"python": platform.python_version()}
    for dist, key in (("apache-tvm", "tvm"), ("apache-tvm-ffi", "tvm_ffi"),
                      ("onnxruntime", "onnxruntime"), ("onnx", "onnx"),
                      ("kubeinfer", "kubeinfer")):
        try:
            out[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out
