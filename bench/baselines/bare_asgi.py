"""Baseline: a bare ASGI app (no framework) serving one ONNX model.

The issue's target: our model server at c=64 reaches >= 90% of this app's
throughput. It does the minimum a real server must: read the body, parse JSON
with orjson, run onnxruntime, answer JSON. Run with uvicorn, uvloop, httptools,
one worker: ``BENCH_MODEL=m.onnx uvicorn bench.baselines.bare_asgi:app``.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import onnxruntime as ort
import orjson

_opts = ort.SessionOptions()
_opts.intra_op_num_threads = 1
_sess = ort.InferenceSession(os.environ["BENCH_MODEL"], _opts, providers=["CPUExecutionProvider"])
_inp = _sess.get_inputs()[0].name
_out = [o.name for o in _sess.get_outputs()]
_HEADERS = [(b"content-type", b"application/json")]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    if scope["method"] == "GET":  # readiness probe
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
        return
    body = b""
    more = True
    while more:
        msg = await receive()
        body += msg.get("body", b"")
        more = msg.get("more_body", False)
    data = orjson.loads(body)["instances"]
    outs = _sess.run(_out, {_inp: np.asarray(data, dtype=np.float32)})
    # The same response our model server gives: one output as a list, several by name.
    pred = outs[0] if len(outs) == 1 else dict(zip(_out, outs, strict=True))
    payload = orjson.dumps({"predictions": pred}, option=orjson.OPT_SERIALIZE_NUMPY)
    await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
    await send({"type": "http.response.body", "body": payload})
