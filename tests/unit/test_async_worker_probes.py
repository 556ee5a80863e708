"""The async worker's probes fail when its consuming loop ended though nobody stopped it.

The loop outlasts every outage (``Worker.run``); if it ever ended anyway, the
process would take no work while looking healthy. Real app, real lifespan,
the real iris model; ``Worker.run`` replaced by a loop that ends and by one
that runs until stopped (the control: the probes must tell them apart).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from kubeinfer_runtime.contract import AsyncWorkerSettings
from kubeinfer_runtime.queue import app as queue_app
from kubeinfer_runtime.queue.worker import Worker
from tests.support.ports import wait_until


def _settings(models_dir: Path, tmp_path: Path) -> AsyncWorkerSettings:
    return AsyncWorkerSettings.given({
        "model_uri": f"file://{models_dir / 'iris.onnx'}",
        # Never reached: the replaced loops do not use it.
        "redis_url": "redis://127.0.0.1:9/0", "queue": "probes",
        "output_path": f"file://{tmp_path}/out", "failure_path": f"file://{tmp_path}/failed",
        "model_cache_dir": str(tmp_path / "cache")})


@pytest.mark.parametrize("ends", [True, False])
def test_the_probes_fail_once_the_loop_ends(models_dir: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch, ends: bool) -> None:
    async def run(self: Worker) -> None:
        if ends:
            raise RuntimeError("a bug in the loop")
        await self.stopping.wait()

    monkeypatch.setattr(Worker, "run", run)
    with TestClient(queue_app.create_app(_settings(models_dir, tmp_path))) as client:
        if ends:
            wait_until(lambda: client.get("/v2/health/live").status_code == 503, 10,
                       "liveness to fail")
            ping = client.get("/ping")
            assert ping.status_code == 503
            assert "stopped consuming its queue" in ping.text
        else:
            assert client.get("/v2/health/live").status_code == 200
            ping = client.get("/ping")
            # Not ready for another reason (no Redis at that address), never this one.
            assert "stopped consuming" not in ping.text
