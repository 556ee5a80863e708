"""An async Endpoint on a cluster needs a queue and object-store locations; local mode does not."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from kubeinfer_operator.api.endpoint import Endpoint
from kubeinfer_operator.reconcile.async_validate import async_cluster_problems
from kubeinfer_operator.render.plan import EndpointPlan, plan_endpoint

REPO = Path(__file__).resolve().parents[2]
EXAMPLE: dict[str, Any] = yaml.safe_load((REPO / "examples" / "async-endpoint.yaml").read_text())
REDIS = "redis://redis.queues.svc:6379/0"


def _plan(**async_changes: Any) -> EndpointPlan:
    doc = copy.deepcopy(EXAMPLE)
    doc["metadata"]["namespace"] = "ml"
    doc["spec"]["async"].update(async_changes)
    doc["spec"]["async"] = {k: v for k, v in doc["spec"]["async"].items() if v is not None}
    return plan_endpoint(Endpoint.model_validate(doc))


def test_object_store_locations_and_a_queue_pass() -> None:
    plan = _plan(outputPath="s3://b/out", failurePath="s3://b/failed")
    assert async_cluster_problems(plan, redis_url=REDIS) == []


def test_no_queue_names_the_chart_value() -> None:
    plan = _plan(outputPath="s3://b/out", failurePath="s3://b/failed")
    (problem,) = async_cluster_problems(plan, redis_url=None)
    assert problem.startswith("spec.async: no queue is configured")
    assert "runtime.redis.url" in problem and "runtime.redis.existingSecret" in problem


def test_file_locations_are_named_once_each() -> None:
    # The example as shipped (file:// output and failure paths): the output is named; the
    # failure path and the default input folder follow from it and add nothing.
    assert [p.split(":")[0] for p in async_cluster_problems(_plan(), redis_url=REDIS)] == [
        "spec.async.outputPath"]
    # failurePath defaulted from a file:// output: still one problem.
    assert len(async_cluster_problems(_plan(failurePath=None), redis_url=REDIS)) == 1
    problems = async_cluster_problems(
        _plan(outputPath="s3://b/out", failurePath="file:///tmp/f",
              inputPath=["s3://b/in/", "file:///data/in/"]), redis_url=None)
    assert [p.split(":")[0] for p in problems] == [
        "spec.async", "spec.async.failurePath", "spec.async.inputPath[1]"]
    assert all("use s3://bucket/prefix (file:// works in local mode only)" in p
               for p in problems[1:])


def test_other_endpoint_types_are_not_concerned() -> None:
    doc = copy.deepcopy(EXAMPLE)
    doc["spec"].pop("async")
    doc["spec"]["type"] = "RealTime"
    assert async_cluster_problems(plan_endpoint(Endpoint.model_validate(doc)),
                                  redis_url=None) == []
