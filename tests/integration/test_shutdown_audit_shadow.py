"""A gateway stopped by SIGTERM drops the shadow copies it has not finished, and says so.

Copies to a shadow may be dropped (production never waits for them), but never silently:
on shutdown the ones still queued or waiting for the shadow's answer are counted as
dropped and, since the process's metrics end with it, logged with their number.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kubeinfer_runtime.contract import EndpointRoute, RouteTable, VariantRoute
from kubeinfer_runtime.contract.shadow import ShadowRoute
from tests.support.label_upstream import start_label_upstream
from tests.support.procs import RuntimeProcess, start_runtime

#: Copies sent to a shadow that answers only after the test is over.
COPIES = 6


@pytest.fixture
def upstreams(tmp_path: Path) -> Iterator[dict[str, RuntimeProcess]]:
    procs: dict[str, RuntimeProcess] = {}
    try:
        procs["production"] = start_label_upstream("production", tmp_path / "up")
        procs["stuck"] = start_label_upstream("stuck", tmp_path / "up", SLEEP_S="600")
        yield procs
    finally:
        for proc in procs.values():
            proc.stop()


def test_unfinished_shadow_copies_are_counted_and_logged_at_shutdown(
        tmp_path: Path, upstreams: dict[str, RuntimeProcess]) -> None:
    routes = tmp_path / "routes.json"
    RouteTable(revision=1, endpoints={"iris": EndpointRoute(
        name="iris", variants=[VariantRoute(name="primary", weight=1,
                                            upstreams=[upstreams["production"].url])],
        # Two workers: two copies wait for the shadow's answer, the rest in the queue.
        shadows=[ShadowRoute(name="stuck", sampling_percentage=100, timeout_s=600,
                             concurrency=2, upstreams=[upstreams["stuck"].url])])},
    ).write_atomic(routes)
    gateway = start_runtime("gateway", {"KUBEINFER_ROUTE_TABLE_PATH": str(routes)},
                            tmp_path / "logs")
    try:
        with httpx.Client(timeout=10) as client:
            for i in range(COPIES):
                r = client.post(f"{gateway.url}/endpoints/iris/invocations",
                                content=f"{i},5.1\n".encode(),
                                headers={"Content-Type": "text/csv"})
                assert r.status_code == 200
        # Each copy was queued before its production answer went out: all are unfinished.
        gateway.proc.terminate()
        try:
            gateway.proc.wait(timeout=30)  # uvicorn re-raises SIGTERM once it is done
        except subprocess.TimeoutExpired:
            pytest.fail(f"the gateway did not stop on SIGTERM:\n{gateway.log()}")
        assert "Application shutdown complete" in gateway.log(), gateway.log()
    finally:
        gateway.stop()
    found = re.findall(r"Endpoint iris: (\d+) cop(?:y|ies) to stuck dropped at shutdown",
                       gateway.log())
    assert found == [str(COPIES)], gateway.log()
