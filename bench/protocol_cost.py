"""Per-request Python cost of serving through uvicorn's HTTP protocol, in-process.

Drives each app through uvicorn's real httptools protocol with an in-memory
transport (no sockets, no load generator), so what remains is the Python work
per request: parsing, ASGI (or the inline path), decode, predict, encode,
metrics. The minimum over batches is reported: this VM's speed drifts, and
the minimum is the run least disturbed by it.

    .venv/bin/python bench/protocol_cost.py [--model sklearn|mlp] [--requests 2000]
                                            [--batches 30]

Rows: the bare ASGI app (bench/baselines/bare_asgi.py) through uvicorn's
protocol, our model server through uvicorn's protocol (the ASGI path), and
our model server through ``InlineHttpProtocol`` (the inline path); then the
same inference through Open Inference Protocol V2 (``POST /v2/models/m/infer``,
JSON tensors, and binary tensors as ``tritonclient`` sends them) on both paths. Run it
under ``valgrind --tool=callgrind`` with ``--batches 1`` to count
instructions instead of time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import uvloop
from rich.console import Console
from rich.table import Table
from uvicorn.config import Config
from uvicorn.lifespan.on import LifespanOn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from examples.build_models import build_mlp, build_sklearn


class MemoryTransport(asyncio.Transport):
    """Collects what the protocol writes; wakes the driver when a response is complete."""

    def __init__(self) -> None:
        super().__init__()
        self.buffer = bytearray()
        self.expected = 0
        self.done: asyncio.Future[None] | None = None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 50000),
                "sockname": ("127.0.0.1", 8080)}.get(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.buffer += data
        if self.done is not None and len(self.buffer) >= self.expected:
            self.done.set_result(None)
            self.done = None

    def get_write_buffer_size(self) -> int:
        return 0  # everything written is taken at once

    def is_closing(self) -> bool:
        return False

    def close(self) -> None: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


async def measure(app: Any, protocol_class: type[HttpToolsProtocol], request: bytes,
                  requests: int, batches: int) -> tuple[float, bytes]:
    """(best µs per request, one response) driving ``app`` through ``protocol_class``."""
    loop = asyncio.get_running_loop()
    config = Config(app, http=protocol_class, lifespan="off", access_log=False,
                    log_level="warning")
    config.load()
    protocol = protocol_class(config=config, server_state=ServerState(), app_state={},
                              _loop=loop)
    transport = MemoryTransport()
    protocol.connection_made(transport)

    async def one() -> None:
        transport.buffer.clear()
        done = transport.done = loop.create_future()
        protocol.data_received(request)
        await done

    # The response's size, to know when the next one is complete.
    transport.expected = 1 << 30
    transport.done = loop.create_future()
    protocol.data_received(request)
    await asyncio.sleep(0.05)
    sample = bytes(transport.buffer)
    transport.done = None
    transport.expected = len(sample)
    for _ in range(500):
        await one()
    best = float("inf")
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(requests):
            await one()
        best = min(best, (time.perf_counter() - t0) / requests)
    return best * 1e6, sample


async def ours(model: Path) -> tuple[Any, LifespanOn]:
    os.environ.update({"KUBEINFER_MODEL_URI": f"file://{model}", "KUBEINFER_MODEL_NAME": "m",
                       "KUBEINFER_ENDPOINT_NAME": "bench", "KUBEINFER_VARIANT_NAME": "primary",
                       "KUBEINFER_LOG_LEVEL": "warning"})
    from kubeinfer_runtime.server.app import create_app

    app = create_app()
    lifespan = LifespanOn(Config(app, log_level="warning"))
    await lifespan.startup()
    for _ in range(500):  # the model loads in the background
        if app.service.slot.model is not None:  # type: ignore[attr-defined]
            return app, lifespan
        await asyncio.sleep(0.01)
    raise RuntimeError("the model did not load")


def _post(target: bytes, body: bytes, extra: bytes = b"") -> bytes:
    return (b"POST %s HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n%s"
            b"Content-Length: %d\r\n\r\n%s" % (target, extra, len(body), body))


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("sklearn", "mlp"), default="sklearn")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--batches", type=int, default=30)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    if args.model == "sklearn":
        path, x = build_sklearn(tmp / "m.onnx"), np.full((1, 4), 5.0, np.float32)
    else:
        path = build_mlp(tmp / "m.onnx")
        x = np.random.default_rng(0).standard_normal((1, 256)).astype(np.float32)
    body = orjson.dumps({"instances": x.tolist()})
    request = _post(b"/invocations", body)
    name = "X" if args.model == "sklearn" else "input"
    v2 = {"name": name, "shape": list(x.shape), "datatype": "FP32"}
    v2_json = _post(b"/v2/models/m/infer",
                    orjson.dumps({"inputs": [{**v2, "data": x.reshape(-1).tolist()}]}))
    header = orjson.dumps({"inputs": [{**v2, "parameters": {"binary_data_size": x.nbytes}}],
                           "parameters": {"binary_data_output": True}})
    v2_binary = _post(b"/v2/models/m/infer", header + x.tobytes(),
                      b"Inference-Header-Content-Length: %d\r\n" % len(header))

    os.environ["BENCH_MODEL"] = str(path)
    from bench.baselines import bare_asgi
    from kubeinfer_runtime.inline_http import InlineHttpProtocol

    model_server, lifespan = await ours(path)
    rows = [
        ("bare ASGI app, uvicorn protocol", bare_asgi.app, HttpToolsProtocol, request),
        ("kubeinfer model server, ASGI path", model_server, HttpToolsProtocol, request),
        ("kubeinfer model server, inline path", model_server, InlineHttpProtocol, request),
        ("model server, V2 JSON, ASGI path", model_server, HttpToolsProtocol, v2_json),
        ("model server, V2 JSON, inline path", model_server, InlineHttpProtocol, v2_json),
        ("model server, V2 binary, ASGI path", model_server, HttpToolsProtocol, v2_binary),
        ("model server, V2 binary, inline path", model_server, InlineHttpProtocol, v2_binary),
    ]
    table = Table(title=f"Python cost per request through uvicorn's protocol ({args.model}; "
                        f"best of {args.batches} x {args.requests})")
    table.add_column("app")
    table.add_column("µs / request", justify="right")
    for label, app, protocol_class, raw in rows:
        us, sample = await measure(app, protocol_class, raw, args.requests, args.batches)
        if not sample.startswith(b"HTTP/1.1 200 OK"):
            raise RuntimeError(f"{label} answered {sample[:200]!r}")
        table.add_row(label, f"{us:.1f}")
    await lifespan.shutdown()
    Console().print(table)


if __name__ == "__main__":
    uvloop.run(main())
