"""What the Open Inference Protocol says about a model: PURE documents for the V2 routes.

``GET /v2/models/{m}`` (metadata, the protocol's own), and the two Triton
extensions stock clients call (``tritonclient``'s ``get_model_config`` and
``get_inference_statistics``): ``/config`` and ``/stats``. Built from what the
server already has (the model's metadata, the loop metrics), so they cost
nothing on the inference path. Shared by the single- and multi-model servers.
"""

from __future__ import annotations

from typing import Any

from kubeinfer_runtime import __version__
from kubeinfer_runtime.metrics import ModelServerMetrics
from kubeinfer_runtime.models.base import TensorSpec
from kubeinfer_runtime.server.state import LoadedModel

#: What ``GET /v2`` lists: the protocol extensions this server implements.
EXTENSIONS = ("binary_tensor_data", "model_configuration", "statistics")

#: Triton's config names the V2 BYTES type TYPE_STRING; the others are TYPE_<datatype>.
_TRITON_TYPES = {"BYTES": "TYPE_STRING"}


def server_metadata(*extra: str) -> dict[str, Any]:
    """``GET /v2``: name, version and extensions (``extra``: the server's own, e.g. repository)."""
    return {"name": "kubeinfer", "version": __version__, "extensions": [*EXTENSIONS, *extra]}


def metadata(name: str, model: LoadedModel) -> dict[str, Any]:
    """``GET /v2/models/{m}``: the protocol's model metadata."""
    return {
        "name": name,
        "versions": [model.version],
        "platform": model.meta.platform,
        "inputs": [t.v2() for t in model.meta.inputs],
        "outputs": [t.v2() for t in model.meta.outputs],
    }


def _triton_tensor(spec: TensorSpec) -> dict[str, Any]:
    v2 = spec.v2()
    return {"name": v2["name"],
            "data_type": _TRITON_TYPES.get(v2["datatype"], "TYPE_" + v2["datatype"]),
            "dims": v2["shape"]}


def config(name: str, model: LoadedModel) -> dict[str, Any]:
    """``GET /v2/models/{m}/config``: Triton's model configuration, as far as it applies.

    ``max_batch_size`` 0: the batch dimension, when the model has one, is part
    of ``dims`` (as -1), which is how Triton describes models it does not batch.
    """
    return {
        "name": name,
        "platform": model.meta.platform,
        "versions": [model.version],
        "max_batch_size": 0,
        "input": [_triton_tensor(t) for t in model.meta.inputs],
        "output": [_triton_tensor(t) for t in model.meta.outputs],
    }


def _duration(count: int, seconds: float) -> dict[str, int]:
    return {"count": count, "ns": round(seconds * 1e9)}


def statistics(name: str, model: LoadedModel, metrics: ModelServerMetrics) -> dict[str, Any]:
    """``GET /v2/models/{m}/stats``: Triton's statistics, from the server's loop metrics.

    They count every inference request to the model, SageMaker's and V2's
    alike, since the process started (per uvicorn worker, as ``/metrics``).
    Requests, not batch items: ``inference_count`` is the successful requests.
    ``success.ns`` is their whole time in the server, ``compute_infer.ns`` the
    model's share; failures are counted, not timed.
    """
    ok = metrics.model_latency.count
    model_s = metrics.model_latency.sum
    return {"model_stats": [{
        "name": name,
        "version": model.version,
        "inference_count": ok,
        "execution_count": ok,
        "inference_stats": {
            "success": _duration(ok, model_s + metrics.overhead_latency.sum),
            "fail": _duration(metrics.errors_total(), 0.0),
            "compute_infer": _duration(ok, model_s),
        },
        "batch_stats": [],
    }]}
