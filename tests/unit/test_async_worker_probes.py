"""The async worker's probes fail when its consuming loop ended though nobody stopped it.

The loop outlasts every outage (``Worker.run``); if it ever ended anyway, the
process would take no work while looking healthy. Real app, real lifespan,
the real iris model; ``Worker.run`` replaced by a loop that ends and by one
that runs until stopped (the control: the probes must tell them apart).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from uvicorn.config import Config
from uvicorn.lifespan.on import LifespanOn

from kubeinfer_runtime.contract import AsyncWorkerSettings
from kubeinfer_runtime.queue import app as queue_app
from kubeinfer_runtime.queue.worker import Worker


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
    app = queue_app.create_app(_settings(models_dir, tmp_path))

    async def probe() -> None:
        lifespan = LifespanOn(Config(app, log_level="warning"))
        await lifespan.startup()
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app),
                                         base_url="http://worker") as client:
                if ends:
                    for _ in range(200):  # the loop's task ends on its first step
                        if (await client.get("/v2/health/live")).status_code == 503:
                            break
                        await asyncio.sleep(0.05)
                    ping = await client.get("/ping")
                    assert ping.status_code == 503
                    assert "stopped consuming its queue" in ping.text
                    assert (await client.get("/v2/health/live")).status_code == 503
                else:
                    assert (await client.get("/v2/health/live")).status_code == 200
                    ping = await client.get("/ping")
                    # Not ready for another reason (no Redis there), never this one.
                    assert "stopped consuming" not in ping.text
        finally:
            await lifespan.shutdown()

    asyncio.run(probe())
