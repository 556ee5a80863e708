"""Pods of an Endpoint stop without losing accepted work (audit of graceful shutdown).

On a rolling update or scale-down the kubelet runs the preStop hook, sends SIGTERM and
SIGKILLs at terminationGracePeriodSeconds. A gateway or model server must keep serving
until its Service stops routing to it (preStop), and the grace period must outlast
everything the role does after SIGTERM within its own bounds, or the SIGKILL cuts it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from kubeinfer_operator.api.endpoint import Endpoint
from kubeinfer_operator.render import k8s_meta as meta
from kubeinfer_operator.render.k8s import Owner, render_endpoint
from kubeinfer_operator.render.k8s_workloads import PRESTOP_SLEEP_S
from kubeinfer_operator.render.plan import plan_endpoint
from kubeinfer_operator.settings import OperatorSettings
from kubeinfer_runtime.contract import GRACEFUL_SHUTDOWN_S, AsyncWorkerSettings, GatewaySettings
from tests.support.kube_schema import schema_errors

REPO = Path(__file__).resolve().parents[2]
OWNER = Owner(name="iris", namespace="ml", uid="0b6c2a3e-1111-4222-8333-944455556666")


def _example(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((REPO / "examples" / name).read_text())
    return doc


def _deployments(example: str | dict[str, Any]) -> dict[str, dict[str, Any]]:
    doc = _example(example) if isinstance(example, str) else example
    plan = plan_endpoint(Endpoint.model_validate(doc), generation=1)
    manifests = render_endpoint(plan, OWNER, OperatorSettings(), ())
    for m in manifests:
        assert schema_errors(m) == [], m["metadata"]["name"]
    return {m["metadata"]["name"]: m for m in manifests if m["kind"] == "Deployment"}


def _pod(dep: dict[str, Any]) -> dict[str, Any]:
    pod: dict[str, Any] = dep["spec"]["template"]["spec"]
    return pod


def _prestop_s(container: dict[str, Any]) -> float:
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    return float(command[1])


def test_gateway_keeps_serving_until_unrouted_and_has_time_to_flush_captures() -> None:
    pod = _pod(_deployments("capture-endpoint.yaml")[meta.gateway_name(OWNER.name)])
    container = pod["containers"][0]
    prestop = _prestop_s(container)
    assert prestop >= PRESTOP_SLEEP_S > 0
    capture_s = GatewaySettings.model_fields["capture_shutdown_timeout_s"].default
    # preStop, then uvicorn's drain of in-flight requests, then the capture flush.
    assert pod["terminationGracePeriodSeconds"] > prestop + GRACEFUL_SHUTDOWN_S + capture_s


def test_model_server_keeps_serving_until_unrouted_and_drains() -> None:
    deps = _deployments("realtime-endpoint.yaml")
    servers = [d for name, d in deps.items() if name != meta.gateway_name(OWNER.name)]
    assert servers
    for dep in servers:
        pod = _pod(dep)
        prestop = _prestop_s(pod["containers"][0])
        assert pod["terminationGracePeriodSeconds"] > prestop + GRACEFUL_SHUTDOWN_S


def test_async_worker_outlasts_its_queue_drain() -> None:
    deps = _deployments("async-endpoint.yaml")
    workers = [d for name, d in deps.items() if name != meta.gateway_name(OWNER.name)]
    assert workers
    drain_s = AsyncWorkerSettings.model_fields["drain_timeout_s"].default
    for dep in workers:
        pod = _pod(dep)
        # Nothing routes requests to a worker: no preStop delay before its drain.
        assert "lifecycle" not in pod["containers"][0]
        assert pod["terminationGracePeriodSeconds"] > drain_s


def test_image_steps_outlive_the_runtime_containers_prestop() -> None:
    doc = _example("serial-pipeline.yaml")
    doc["spec"]["variants"][0]["containers"][0] = {"name": "pre", "image": "example.com/pre:1"}
    deps = _deployments(doc)
    checked = 0
    for name, dep in deps.items():
        if name == meta.gateway_name(OWNER.name):
            continue
        pod = _pod(dep)
        containers = pod["containers"]
        runtime = _prestop_s(containers[0])
        for step in containers[1:]:
            # Alive through the runtime container's preStop and its drain, which need it,
            # and stopped (SIGTERM) before the pod's grace period ends.
            step_s = _prestop_s(step)
            assert runtime + GRACEFUL_SHUTDOWN_S <= step_s < pod["terminationGracePeriodSeconds"]
            checked += 1
    assert checked == 1
