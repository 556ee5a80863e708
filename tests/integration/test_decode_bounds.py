"""Decode bombs against a real model server: refused quickly, and its memory stays put.

The reported incidents, replayed over HTTP at a real ``kubeinfer-runtime serve``
process with a real ONNX model: a 0.5 MB .npz of 512 MB of deflated zeros
(once answered 200 after the server grew from 94 MB to 6 GB RSS) and a 144-byte
.npy whose header claims shape (10**12, 4) (once a 500). The server's peak
resident memory (``VmHWM`` in /proc, which also catches memory that was
allocated and freed again) must grow by less than 100 MB over all of them.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from tests.support.decode_bombs import MIB, npy_header_bomb, npz_bomb, with_declared_size
from tests.support.procs import RuntimeProcess, start_runtime

ROWS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]


@pytest.fixture(scope="module")
def server(models_dir: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[RuntimeProcess]:
    logs = tmp_path_factory.mktemp("decode-bounds-logs")
    proc = start_runtime("model-server", {
        "KUBEINFER_MODEL_URI": f"file://{models_dir / 'iris.onnx'}",
        "KUBEINFER_MODEL_NAME": "iris",
        "KUBEINFER_MODEL_CACHE_DIR": str(tmp_path_factory.mktemp("cache")),
    }, logs)
    yield proc
    proc.stop()


def _memory_kib(pid: int, field: str) -> int:
    """``field`` (VmRSS, VmHWM) of ``pid`` and its child processes, KiB."""
    total = 0
    pids = [pid]
    with contextlib.suppress(OSError):
        pids += [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    for p in pids:
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                total += int(line.split()[1])
    return total


def _post(client: httpx.Client, server: RuntimeProcess, path: str, body: bytes,
          content_type: str) -> tuple[httpx.Response, float]:
    t0 = time.perf_counter()
    r = client.post(server.url + path, content=body, headers={"content-type": content_type})
    return r, time.perf_counter() - t0


def test_bombs_are_refused_quickly_with_bounded_memory(server: RuntimeProcess) -> None:
    npz = npz_bomb()  # built before measuring: 512 MB of zeros, deflated
    assert len(npz) < MIB
    pid = server.proc.pid
    with httpx.Client(timeout=30) as client:
        # Warm every path the bombs take, so what follows measures only the bombs.
        assert client.post(server.url + "/invocations", json=ROWS).status_code == 200
        r, _ = _post(client, server, "/invocations", npy_header_bomb(), "application/x-npy")
        before_rss = _memory_kib(pid, "VmRSS")
        before_peak = _memory_kib(pid, "VmHWM")

        for _ in range(3):
            r, elapsed = _post(client, server, "/invocations", npz, "application/x-npz")
            assert r.status_code == 413, r.text[:300]
            assert "KUBEINFER_MAX_DECODED_BYTES" in r.json()["Message"]
            assert r.headers["x-amzn-errortype"] == "ValidationError:"
            assert elapsed < 2.0

            r, elapsed = _post(client, server, "/invocations", npy_header_bomb(),
                               "application/x-npy")
            assert r.status_code == 413, r.text[:300]
            assert "16000000000000 bytes" in r.json()["Message"]
            assert elapsed < 2.0

            lying = with_declared_size(npz, MIB)  # inflates past what it declares
            r, elapsed = _post(client, server, "/invocations", lying, "application/x-npz")
            assert r.status_code == 400, r.text[:300]
            assert 'member "X" is corrupt' in r.json()["Message"]
            assert elapsed < 2.0

            v2 = orjson.dumps({"inputs": [{"name": "X", "shape": [10**12, 4],
                                           "datatype": "FP32", "data": [1, 2, 3, 4]}]})
            r, elapsed = _post(client, server, "/v2/models/iris/infer", v2, "application/json")
            assert r.status_code == 413, r.text[:300]
            assert elapsed < 2.0

        grown_rss = (_memory_kib(pid, "VmRSS") - before_rss) / 1024
        grown_peak = (_memory_kib(pid, "VmHWM") - before_peak) / 1024
        assert grown_peak < 100, f"peak RSS grew by {grown_peak:.0f} MB"
        assert grown_rss < 100, f"RSS grew by {grown_rss:.0f} MB"
        # And it still serves.
        r = client.post(server.url + "/invocations", json=ROWS)
        assert r.status_code == 200 and len(r.json()["predictions"]["label"]) == 2
