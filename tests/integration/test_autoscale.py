"""Auto scaling in local mode: a load ramp scales a variant out and back in.

Real supervisor, gateway and model servers; the policy sees the gateway's own
``/metrics`` (InvocationsPerReplica). Cooldowns are checked on the recorded
events' timestamps, not on timing assertions about speed.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from bench.local_autoscale import StepLoad, autoscaled_endpoint, scale_events

from tests.integration.test_local import Local, local
from tests.integration.test_serverless import pids, read_state
from tests.support.ports import wait_until

__all__ = ["local"]

OUT_COOLDOWN = 2.0
IN_COOLDOWN = 4.0
#: Load clients: several, so a slow response on a loaded machine does not
#: lower the total rate the policy sees.
CLIENTS = 4


def ready(local: Local) -> int:
    count: int = read_state(local, "auto")["variants"][0]["ready"]
    return count


def test_load_ramp_scales_out_and_back_in(local: Local, models_dir: Path) -> None:
    local.env["KUBEINFER_AUTOSCALE_INTERVAL_S"] = "0.5"
    local.env["KUBEINFER_AUTOSCALE_WINDOW_S"] = "2"
    spec = local.write("auto.yaml", autoscaled_endpoint("auto", models_dir / "iris.onnx", {
        "minReplicas": 1,
        "maxReplicas": 3,
        "targetTracking": [{"metric": "InvocationsPerReplica", "target": 300}],
        "scaleOutCooldown": OUT_COOLDOWN,
        "scaleInCooldown": IN_COOLDOWN,
    }))
    result = local.run("up", "-d", "-f", str(spec), "--timeout", "60")
    assert result.returncode == 0, result.stdout + result.stderr
    state: dict[str, Any] = read_state(local, "auto")
    assert state["variants"][0]["replicas"] == 1
    url = state["url"]

    # The ramp: 8 requests/s = 480 per minute (2 replicas' worth at target 300),
    # then 20/s = 1200 per minute (4 replicas' worth, capped at maxReplicas 3).
    with StepLoad(url, "auto", rate=8.0, clients=CLIENTS) as load:
        wait_until(lambda: ready(local) == 2, 40, "scale out to 2 replicas")
        load.rate = 20.0
        wait_until(lambda: ready(local) == 3, 40, "scale out to maxReplicas 3")
    assert {"main-0", "main-1", "main-2"} <= set(pids(local, "auto"))

    # No load: back to minReplicas, after the scale-in cooldown.
    wait_until(lambda: set(pids(local, "auto")) == {"gateway", "main-0"}, 40,
               "scale in to minReplicas 1")
    timeline = scale_events(local.home, "auto")
    outs = [t for t, m in timeline if m.startswith("Variant main: Scaled out")]
    ins = [t for t, m in timeline if m.startswith("Variant main: Scaled in")]
    assert len(outs) >= 2 and ins, timeline
    assert "InvocationsPerReplica" in timeline[0][1]
    for a, b in itertools.pairwise(outs):
        assert b - a >= OUT_COOLDOWN, timeline
    last_out = max(outs)
    assert min(ins) - last_out >= IN_COOLDOWN, timeline
    for a, b in itertools.pairwise(ins):
        assert b - a >= IN_COOLDOWN, timeline
    assert all(t > max(outs) for t in ins), timeline
