"""``type: Async`` from spec to plan to manifests, and the operator's backlog scaling."""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from kubeinfer_operator.api.endpoint import Endpoint, format_validation_error
from kubeinfer_operator.render import k8s_meta as meta
from kubeinfer_operator.render.k8s import Owner, render_endpoint
from kubeinfer_operator.render.plan import plan_endpoint
from kubeinfer_operator.scaling.cluster import ClusterScaler
from kubeinfer_operator.settings import OperatorSettings
from kubeinfer_runtime.contract import AsyncBacklog, AsyncWorkerSettings, RouteTable
from tests.support.kube_schema import schema_errors

REPO = Path(__file__).resolve().parents[2]
OWNER = Owner(name="iris-async", namespace="ml", uid="u-1")


@pytest.fixture
def doc() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((REPO / "examples" / "async-endpoint.yaml")
                                            .read_text())
    loaded["metadata"]["namespace"] = "ml"
    return loaded


def _errors(doc: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as info:
        Endpoint.model_validate(doc)
    return format_validation_error(info.value)


def test_example_parses_with_the_async_alias(doc: dict[str, Any]) -> None:
    e = Endpoint.model_validate(doc)
    assert e.spec.async_ is not None
    assert e.spec.async_.scaling.minReplicas == 0
    dumped = e.spec.model_dump(by_alias=True, exclude_none=True)
    assert "async" in dumped and "async_" not in dumped


def test_async_needs_its_block_and_one_variant(doc: dict[str, Any]) -> None:
    no_block = copy.deepcopy(doc)
    del no_block["spec"]["async"]
    assert "spec.async is required for type Async" in _errors(no_block)
    two = copy.deepcopy(doc)
    two["spec"]["variants"].append({"name": "b", "model": {"uri": "file:///m.onnx"}})
    assert "exactly one variant (got 2)" in _errors(two)
    realtime = copy.deepcopy(doc)
    realtime["spec"]["type"] = "RealTime"
    assert "spec.async applies to type Async only" in _errors(realtime)


@pytest.mark.parametrize("serving", [
    {"containers": [{"name": "m", "model": {"uri": "file:///m.onnx"}}]},
    {"multiModel": {"prefix": "file:///models/"}},
])
def test_async_workers_serve_one_model(doc: dict[str, Any], serving: dict[str, Any]) -> None:
    # The worker loads one model; a pipeline used to start, then fail to load "URI ''".
    other = copy.deepcopy(doc)
    variant = other["spec"]["variants"][0]
    del variant["model"]
    variant.update(serving)
    assert "an Async endpoint's workers serve one model: set model" in _errors(other)


@pytest.mark.parametrize(("path", "value", "fragment"), [
    (("outputPath",), "http://x/out", "String should match pattern"),
    (("outputPath",), "s3://b/a/../b", "contains '..'"),
    (("maxRetries",), -1, "greater than or equal to 0"),
    (("requestTTL",), 30, "greater than or equal to 60"),
    (("notification", "successUrl"), "ftp://x", "String should match pattern"),
    (("scaling", "minReplicas"), 9, "minReplicas 9 exceeds maxReplicas 4"),
    (("scaling", "targetBacklogPerReplica"), 0, "greater than or equal to 0.1"),
    (("queueName",), "x", "unknown field"),
    (("maxQueuedRequests",), 0, "greater than or equal to 1"),
    (("maxQueuedRequests",), 10**8, "less than or equal to 10000000"),
])
def test_bad_async_fields_name_the_field(doc: dict[str, Any], path: tuple[str, ...],
                                         value: object, fragment: str) -> None:
    bad = copy.deepcopy(doc)
    target = bad["spec"]["async"]
    for key in path[:-1]:
        target = target.setdefault(key, {})
    target[path[-1]] = value
    message = _errors(bad)
    assert message.startswith("spec.async")
    assert fragment in message


def test_plan_route_and_worker_env(doc: dict[str, Any]) -> None:
    plan = plan_endpoint(Endpoint.model_validate(doc), generation=2)
    assert plan.async_config is not None
    assert plan.async_config.queue == "ml.iris-async"
    assert plan.variants[0].replicas == 1  # spec replicas inside [0, 4]
    route = plan.route_table({}).endpoints["iris-async"]
    assert route.type == "Async" and route.async_config is not None
    assert route.async_config.output_path == "file:///tmp/kubeinfer-async/out"
    assert route.async_config.request_ttl_s == 3600
    assert route.async_config.redis_url is None  # the gateway's own setting on Kubernetes
    assert route.async_config.max_queued == 100_000  # the default bound
    bounded = copy.deepcopy(doc)
    bounded["spec"]["async"]["maxQueuedRequests"] = 7
    table = plan_endpoint(Endpoint.model_validate(bounded), generation=2).route_table({})
    assert table.endpoints["iris-async"].async_config.max_queued == 7  # type: ignore[union-attr]
    # Written only when set: a gateway on an older image (a staged upgrade) reads the
    # table of an endpoint that leaves it at its default.
    assert "max_queued" not in plan.route_table({}).to_json()
    assert '"max_queued": 7' in table.to_json()
    assert RouteTable.from_json(plan.route_table({}).to_json()) == plan.route_table({})
    env = {**plan.variants[0].server_env("iris-async"),
           **plan.async_config.worker_env("redis://r:6379/0")}
    settings = AsyncWorkerSettings.model_validate(
        {k.removeprefix("KUBEINFER_").lower(): v for k, v in env.items()})
    assert settings.redis_url == "redis://r:6379/0"
    assert settings.max_retries == 3 and settings.visibility_timeout_s == 60
    assert settings.success_url is None  # commented out in the example


def test_worker_deployment_renders_valid_async_workers(doc: dict[str, Any]) -> None:
    plan = plan_endpoint(Endpoint.model_validate(doc), generation=2)
    settings = OperatorSettings(redis_url="redis://redis.infra:6379/0")
    manifests = render_endpoint(plan, OWNER, settings)
    for m in manifests:
        assert schema_errors(m) == [], m["kind"]
    by_name = {(m["kind"], m["metadata"]["name"]): m for m in manifests}
    worker = by_name[("Deployment", meta.variant_object_name("iris-async", "main"))]
    [container] = worker["spec"]["template"]["spec"]["containers"]
    assert container["args"] == ["serve", "--role", "async-worker"]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    # The URL (it may carry a password) comes from the namespace's runtime Secret.
    redis_ref = {"secretKeyRef": {"name": "kubeinfer-runtime", "key": "redis-url",
                                  "optional": True}}
    assert env["KUBEINFER_REDIS_URL"] == redis_ref
    assert env["KUBEINFER_QUEUE"] == "ml.iris-async"
    assert env["KUBEINFER_INPUT_PATHS"] == "file:///tmp/kubeinfer-async/"
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    gateway = by_name[("Deployment", meta.gateway_name("iris-async"))]
    genv = {e["name"]: e.get("value", e.get("valueFrom")) for e in
            gateway["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert genv["KUBEINFER_REDIS_URL"] == redis_ref


def test_operator_scales_workers_on_the_backlog(doc: dict[str, Any]) -> None:
    plan = plan_endpoint(Endpoint.model_validate(doc))
    clock = [100.0]
    scaler = ClusterScaler(monotonic=lambda: clock[0])
    backlog = {"now": AsyncBacklog(queued=12, in_flight=0)}

    async def read(queue: str) -> AsyncBacklog:
        assert queue == "ml.iris-async"
        return backlog["now"]

    scaler.read_backlog = read

    async def run() -> None:
        out = await scaler.evaluate_backlog(plan, "ml", {"main": 0})
        assert out == ["Variant main: backlog 12 (target 5 per worker), no worker runs: "
                       "scaling out to 3"]
        scaled = scaler.replicas_for(plan, "ml", {})
        assert scaled.variants[0].replicas == 3
        backlog["now"] = AsyncBacklog()
        clock[0] = 150.0
        assert await scaler.evaluate_backlog(plan, "ml", {"main": 3}) == []
        clock[0] = 300.0
        out = await scaler.evaluate_backlog(plan, "ml", {"main": 3})
        assert out and "scaling in to 0" in out[0]
        assert scaler.replicas_for(plan, "ml", {}).variants[0].replicas == 0

        async def broken(queue: str) -> AsyncBacklog:
            raise ConnectionError("refused")

        scaler.read_backlog = broken
        assert await scaler.evaluate_backlog(plan, "ml", {"main": 0}) == []

    asyncio.run(run())


def test_workers_get_the_operators_outbound_allow_list(doc: dict[str, Any]) -> None:
    """Webhooks the operator admitted with an allow-list are not refused by the workers."""
    plan = plan_endpoint(Endpoint.model_validate(doc))

    def worker_env(settings: OperatorSettings) -> dict[str, str]:
        by_name = {(m["kind"], m["metadata"]["name"]): m
                   for m in render_endpoint(plan, OWNER, settings)}
        worker = by_name[("Deployment", meta.variant_object_name("iris-async", "main"))]
        [container] = worker["spec"]["template"]["spec"]["containers"]
        return {e["name"]: e.get("value") for e in container["env"]}

    # Rendered even empty: the operator's (empty) allow-list is the workers', whatever else
    # might name the variable.
    assert worker_env(OperatorSettings())["KUBEINFER_OUTBOUND_ALLOW"] == ""
    allowed = worker_env(OperatorSettings(outbound_allow="169.254.170.2/32"))
    assert allowed["KUBEINFER_OUTBOUND_ALLOW"] == "169.254.170.2/32"
