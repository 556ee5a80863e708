"""The onnxruntime candidates: the baseline, its saved optimised graph, dynamic INT8.

* fp32 (the baseline): the model as given, on the same ``OnnxBackend`` the
  model server uses, all graph optimisations, the configured threads.
* optimised: onnxruntime applies its graph optimisations offline and saves the
  result (``SessionOptions.optimized_model_filepath``). Saved at the
  "extended" level: the "all" level adds layout rewrites tied to this CPU,
  which onnxruntime's documentation says not to save for other machines; the
  server applies them at load anyway.
* INT8 (only when quantization is allowed): ``quantize_dynamic`` with int8
  weights; activations are quantized per call. Judged by top-1 agreement.

Each function writes one ONNX file; they raise ``CompileError`` with
onnxruntime's message when it refuses the model.
"""

from __future__ import annotations

import logging
from pathlib import Path

from kubeinfer_runtime.compile.errors import CompileError


def optimize(src: Path, dest: Path) -> Path:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        ort.InferenceSession(str(src), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's pybind errors
        raise CompileError(f"onnxruntime could not optimise the model: {_short(e)}") from None
    return dest


def quantize(src: Path, dest: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dest.parent.mkdir(parents=True, exist_ok=True)
    # quantize_dynamic warns on the root logger about optional pre-processing.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quantize_dynamic(str(src), str(dest), weight_type=QuantType.QInt8)
    except Exception as e:
        raise CompileError(f"onnxruntime could not quantize the model: {_short(e)}") from None
    finally:
        root.setLevel(level)
    return dest


def _short(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:300]
