"""A Custom (PromQL) scaling metric answered by a real Prometheus scraping our gateway.

Debian's ``prometheus`` (installed by ``scripts/setup test``) scrapes the
local endpoint's gateway ``/metrics`` every second; a step policy on
``sum(kubeinfer_gateway_invocations_total{endpoint="prom"})`` adds a replica
once Prometheus has seen 10 invocations.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from bench.local_autoscale import autoscaled_endpoint

from tests.integration.test_local import BODY, Local, local
from tests.integration.test_serverless import read_state
from tests.support.ports import free_port, wait_until

__all__ = ["local"]

QUERY = 'sum(kubeinfer_gateway_invocations_total{endpoint="prom"})'


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[tuple[int, int]]:
    """(Prometheus port, the gateway port it scrapes)."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus is not installed: run scripts/setup test")
    prom_port, gateway_port = free_port(), free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(json.dumps({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "kubeinfer-gateway",
                            "static_configs": [{"targets": [f"127.0.0.1:{gateway_port}"]}]}],
    }))
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prom_port}"], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: _ready(prom_port), 20, "Prometheus to serve")
        yield prom_port, gateway_port
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


def _ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/-/ready", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_custom_prometheus_query_scales_out(local: Local, models_dir: Path,
                                            prometheus: tuple[int, int]) -> None:
    prom_port, gateway_port = prometheus
    local.env["KUBEINFER_AUTOSCALE_INTERVAL_S"] = "0.5"
    spec = local.write("prom.yaml", autoscaled_endpoint("prom", models_dir / "iris.onnx", {
        "minReplicas": 1,
        "maxReplicas": 2,
        "stepScaling": [{"metric": "Custom", "query": QUERY,
                         "steps": [{"lowerBound": 10, "change": 1}]}],
        "scaleOutCooldown": 0,
        "prometheusUrl": f"http://127.0.0.1:{prom_port}",
    }))
    result = local.run("up", "-d", "-f", str(spec), "--port", str(gateway_port),
                       "--timeout", "60")
    assert result.returncode == 0, result.stdout + result.stderr
    url = f"http://127.0.0.1:{gateway_port}"
    # Prometheus scrapes the gateway; no invocation yet: the query has no
    # series, so the policy abstains.
    wait_until(lambda: _value(prom_port, 'up{job="kubeinfer-gateway"}') == 1.0, 15,
               "Prometheus to scrape the gateway")
    assert _value(prom_port, QUERY) is None
    assert read_state(local, "prom")["variants"][0]["replicas"] == 1
    with httpx.Client(timeout=10) as client:
        for _ in range(12):
            r = client.post(f"{url}/endpoints/prom/invocations", content=BODY,
                            headers={"Content-Type": "application/json"})
            assert r.status_code == 200
    wait_until(lambda: read_state(local, "prom")["variants"][0]["ready"] == 2, 20,
               "the Custom metric to scale out")
    events = [json.loads(line)["message"] for line in
              (local.home / "local" / "prom" / "events.jsonl").read_text().splitlines()]
    [scaled] = [e for e in events if "Scaled out" in e]
    # The value the policy read: 12, or 10 or 11 when Prometheus scraped the gateway
    # while the last requests were still being sent (a 1 s scrape can fall there).
    cited = re.search(re.escape(f"custom:{QUERY} ") + r"(\d+) is in step \[10, \+inf\) "
                      r"change \+1", scaled)
    assert cited and 10 <= int(cited.group(1)) <= 12, scaled


def _value(port: int, query: str) -> float | None:
    try:
        result = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": query},
                           timeout=2).json()["data"]["result"]
    except (httpx.HTTPError, KeyError, ValueError):
        return None
    return float(result[0]["value"][1]) if result else None
