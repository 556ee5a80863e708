"""The operator carries an async endpoint's former output paths from the workers it runs
(``reconcile.async_paths``): rendered, read back, rendered again.

Why it matters and how the workers use the pairs: ``contract.async_paths``; the worker's
side is in tests/unit/test_async_confinement.py and, with real processes,
tests/integration/test_async_security.py; the operator on the emulator in
tests/integration/test_operator_async.py.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from kubeinfer_operator.api.endpoint import Endpoint
from kubeinfer_operator.reconcile.async_paths import with_former_paths
from kubeinfer_operator.render.k8s import Owner, render_endpoint
from kubeinfer_operator.render.plan import EndpointPlan, plan_endpoint
from kubeinfer_operator.settings import OperatorSettings
from kubeinfer_runtime.contract.async_paths import FORMER_PATHS_GRACE_S, parse_former_paths

REPO = Path(__file__).resolve().parents[2]
OWNER = Owner(name="iris-async", namespace="ml", uid="0b6c2a3e-1111-4222-8333-944455556666")
NOW = 1_800_000_000.0


def _plan(output: str, failure: str) -> EndpointPlan:
    doc: dict[str, Any] = copy.deepcopy(
        yaml.safe_load((REPO / "examples" / "async-endpoint.yaml").read_text()))
    doc["metadata"]["namespace"] = "ml"
    doc["spec"]["async"]["outputPath"] = output
    doc["spec"]["async"]["failurePath"] = failure
    return plan_endpoint(Endpoint.model_validate(doc))


def _workers(plan: EndpointPlan) -> list[dict[str, Any]]:
    return [m for m in render_endpoint(plan, OWNER, OperatorSettings())
            if m["kind"] == "Deployment"]


def _env(deployments: list[dict[str, Any]]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for d in deployments
            for c in d["spec"]["template"]["spec"]["containers"] if c["name"] == "async-worker"
            for e in c["env"]}


def _carried(plan: EndpointPlan, running: list[dict[str, Any]], now: float) -> EndpointPlan:
    assert plan.async_config is not None
    return replace(plan, async_config=with_former_paths(plan.async_config, running, now))


def test_the_replaced_pair_is_carried_and_rendering_again_changes_nothing() -> None:
    first = _carried(_plan("s3://a/out", "s3://a/failed"), [], NOW)
    running = _workers(first)
    assert "KUBEINFER_FORMER_PATHS" not in _env(running)
    # The same spec again: nothing to carry.
    assert _workers(_carried(_plan("s3://a/out", "s3://a/failed"), running, NOW + 5)) == running
    moved = _workers(_carried(_plan("s3://b/out", "s3://b/failed"), running, NOW + 10))
    env = _env(moved)
    assert env["KUBEINFER_OUTPUT_PATH"] == "s3://b/out"
    [pair] = parse_former_paths(env["KUBEINFER_FORMER_PATHS"])
    assert (pair.outputPath, pair.failurePath, pair.until) == (
        "s3://a/out", "s3://a/failed", NOW + 10 + FORMER_PATHS_GRACE_S)
    # Reconciled again later with the workers as rendered: the same manifests, so no roll.
    later = _workers(_carried(_plan("s3://b/out", "s3://b/failed"), moved, NOW + 3600))
    assert later == moved
    # Back to the first paths: they are current again, the second pair is carried.
    back = _env(_workers(_carried(_plan("s3://a/out", "s3://a/failed"), moved, NOW + 7200)))
    assert [(p.outputPath, p.until) for p in parse_former_paths(
        back["KUBEINFER_FORMER_PATHS"])] == [("s3://b/out", NOW + 7200 + FORMER_PATHS_GRACE_S)]


def test_workers_whose_former_env_was_edited_into_garbage_lose_only_that() -> None:
    running = _workers(_carried(_plan("s3://a/out", "s3://a/failed"), [], NOW))
    for container in running[0]["spec"]["template"]["spec"]["containers"]:
        container["env"].append({"name": "KUBEINFER_FORMER_PATHS", "value": "{not json"})
    env = _env(_workers(_carried(_plan("s3://b/out", "s3://b/failed"), running, NOW)))
    assert [p.outputPath for p in parse_former_paths(env["KUBEINFER_FORMER_PATHS"])] == [
        "s3://a/out"]
