"""A gateway with ``discovery: dns`` resolves the upstream host and routes per address.

On Kubernetes the host is a headless Service; here it is ``localhost``, which
resolves through the same getaddrinfo path to 127.0.0.1 (and maybe ::1, where
no server listens: that address must fall out of rotation, not fail requests).
"""

from __future__ import annotations

from pathlib import Path

import httpx

from kubeinfer_runtime.contract import EndpointRoute, RouteTable, VariantRoute
from tests.support.ports import wait_until
from tests.support.procs import start_runtime


def test_dns_upstream_is_resolved_to_addresses_and_served(models_dir: Path,
                                                          tmp_path: Path) -> None:
    server = start_runtime("model-server", {"KUBEINFER_MODEL_URI": f"file://{models_dir}/iris.onnx",
                                            "KUBEINFER_MODEL_NAME": "primary"}, tmp_path / "logs")
    routes = tmp_path / "routes.json"
    service_url = f"http://localhost:{server.port}"
    RouteTable(revision=1, endpoints={"iris": EndpointRoute(name="iris", variants=[
        VariantRoute(name="primary", weight=1, upstreams=[service_url], discovery="dns"),
    ])}).write_atomic(routes)
    gateway = start_runtime("gateway", {"KUBEINFER_ROUTE_TABLE_PATH": str(routes),
                                        "KUBEINFER_ROUTE_RELOAD_INTERVAL_S": "0.1",
                                        "KUBEINFER_HEALTH_INTERVAL_S": "0.2"},
                            tmp_path / "logs")
    try:
        pod = f"http://127.0.0.1:{server.port}"

        def resolved() -> bool:
            pods = httpx.get(gateway.url + "/routes", timeout=5).json()["pods"]
            return pod in pods.get(service_url, [])

        wait_until(resolved, 10, "the gateway to resolve localhost")
        for _ in range(20):
            r = httpx.post(gateway.url + "/endpoints/iris/invocations",
                           json={"instances": [[5.0, 3.4, 1.5, 0.2]]}, timeout=10)
            assert r.status_code == 200, r.text
            assert r.headers["x-amzn-invoked-production-variant"] == "primary"
            assert r.json()["predictions"]["label"] == [0]
        state = httpx.get(gateway.url + "/routes", timeout=5).json()
        # Per-address health: only the address nothing listens on may be down.
        assert pod not in state["down"]
        assert set(state["down"]) <= {f"http://[::1]:{server.port}"}
    finally:
        gateway.stop()
        server.stop()
