"""Peer: Seldon's MLServer serving one ONNX model through a custom runtime.

Run by bench/peers.py as ``mlserver start DIR`` with the python of
``.venv-peers/mlserver``: DIR holds ``settings.json`` (ports) and
``model-settings.json`` naming this runtime (``bench.baselines.mlserver_runtime.OnnxRuntime``)
and the model file in ``parameters.uri``. MLServer has no onnxruntime runtime of its
own; this one is what its docs show for custom runtimes (``MLModel``, its numpy codecs),
onnxruntime with one thread as every server in the comparison. Everything else is
MLServer's defaults (it speaks V2 only).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class OnnxRuntime(MLModel):
    async def load(self) -> bool:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        self.session = ort.InferenceSession(self.settings.parameters.uri, opts,
                                            providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32)
        results = self.session.run(self.output_names, {self.input_name: x})
        return InferenceResponse(
            model_name=self.name, id=payload.id,
            outputs=[NumpyCodec.encode_output(name, arr)
                     for name, arr in zip(self.output_names, results, strict=True)])
