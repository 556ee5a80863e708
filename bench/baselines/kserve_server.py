"""Peer: KServe's Python model server (``kserve.ModelServer``) serving one ONNX model.

Run by bench/peers.py with the python of ``.venv-peers/kserve`` (KServe pins its own
FastAPI, uvicorn and pydantic): ``BENCH_MODEL=m.onnx python kserve_server.py PORT
GRPC_PORT``. A custom ``kserve.Model`` as KServe's docs write one: onnxruntime with one
thread, as every server in the comparison; V2 requests through KServe's own
``InferRequest``/``InferResponse`` (``/v2/models/m/infer``), and V1
(``/v1/models/m:predict``, ``{"instances": ...}``). Everything else is KServe's defaults.
"""

from __future__ import annotations

import os
import sys
import uuid
from typing import Any

import numpy as np
import onnxruntime as ort
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer


class OnnxModel(Model):
    def __init__(self, name: str, path: str) -> None:
        super().__init__(name)
        self.path = path
        self.load()

    def load(self) -> bool:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        self.session = ort.InferenceSession(self.path, opts,
                                            providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.ready = True
        return True

    def predict(self, payload: Any, headers: dict[str, str] | None = None,
                response_headers: dict[str, str] | None = None) -> Any:
        if isinstance(payload, InferRequest):
            x = payload.inputs[0].as_numpy().astype(np.float32)
            results = self.session.run(self.outputs, {self.input: x})
            outputs = []
            for name, arr in zip(self.outputs, results, strict=True):
                out = InferOutput(name, list(arr.shape), "INT64" if arr.dtype == np.int64
                                  else "FP32")
                out.set_data_from_numpy(arr, binary_data=False)
                outputs.append(out)
            # KServe requires an id: the request's, else a new one (as its own servers do).
            return InferResponse(payload.id or uuid.uuid4().hex, self.name, outputs)
        x = np.asarray(payload["instances"], dtype=np.float32)
        results = self.session.run(self.outputs, {self.input: x})
        preds = (results[0] if len(results) == 1
                 else dict(zip(self.outputs, results, strict=True)))
        return {"predictions": preds if isinstance(preds, dict) else preds.tolist()}


if __name__ == "__main__":
    http_port, grpc_port = int(sys.argv[1]), int(sys.argv[2])
    model = OnnxModel("m", os.environ["BENCH_MODEL"])
    ModelServer(http_port=http_port, grpc_port=grpc_port).start([model])
