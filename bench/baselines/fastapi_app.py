"""Baseline: the minimal hand-written FastAPI + onnxruntime app most teams start with.

Run: ``BENCH_MODEL=m.onnx uvicorn bench.baselines.fastapi_app:app``.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, Request
from fastapi.responses import ORJSONResponse

_opts = ort.SessionOptions()
_opts.intra_op_num_threads = 1
_sess = ort.InferenceSession(os.environ["BENCH_MODEL"], _opts, providers=["CPUExecutionProvider"])
_inp = _sess.get_inputs()[0].name
_out = [o.name for o in _sess.get_outputs()]

app = FastAPI()


@app.post("/invocations")
async def invocations(request: Request) -> Any:
    data = (await request.json())["instances"]
    outs = _sess.run(_out, {_inp: np.asarray(data, dtype=np.float32)})
    # The same response our model server gives: one output as a list, several by name.
    if len(outs) == 1:
        return ORJSONResponse({"predictions": outs[0].tolist()})
    return ORJSONResponse({"predictions": {n: o.tolist() for n, o in zip(_out, outs, strict=True)}})
