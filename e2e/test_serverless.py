"""examples/serverless-endpoint.yaml on kind: Ready at zero, cold start, 429, back to zero.

The example is applied with two settings changed (written to a temporary
copy): ``idleTimeout`` 20 s instead of 60 s, so the test does not sit idle a
minute, and ``coldStartTimeout`` 150 s, so a slow CI node starting the first
pod is not mistaken for a failure. The path under test is the real one: the
gateway holds requests for the variant at zero replicas and POSTs a scale
request to the operator's scaler Service (the chart's KUBEINFER_SCALER_URL);
the operator sets the variant Deployment to 1 and posts a ``Scaled`` Event;
the held requests are answered once the pod is ready; with no traffic for
idleTimeout the scaler takes the Deployment back to 0.

maxConcurrency is checked deterministically: ``maxConcurrency`` requests are
sent while the variant is cold, the gateway's in-flight gauge shows them all
held, and one more must get 429 ThrottlingException. A held request can only
be released once a pod of the variant is Ready (the gateway routes to ready
pods only), so if no pod is Ready after the extra request was answered, none
was released before it and 429 is the only right answer. If a pod did become
ready in those milliseconds the check is inconclusive and says so (a warning)
instead of failing.
"""

from __future__ import annotations

import json
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from e2e.cluster import (
    FULLNAME,
    GC_TIMEOUT_S,
    READY_TIMEOUT_S,
    RELEASE_NAMESPACE,
    STATUS_INTERVAL_S,
    apply_and_wait_ready,
    caller_keys,
    condition,
    delete_endpoint,
    deployment_replicas,
    diagnosed,
    endpoint_events,
    gateway_of,
    get_endpoint,
    kubectl_json,
    load_example,
    port_forward,
    requires_cluster,
    variant_pods,
    wait_for,
    write_manifest,
)
from e2e.inference import (
    assert_predictions,
    error_of,
    gateway_metric,
    gateway_pods,
    invoke,
    invoke_raw,
    local_model,
    sagemaker_runtime,
    sample_and_expected,
)

pytestmark = requires_cluster

EXAMPLE = "serverless-endpoint.yaml"
IDLE_TIMEOUT_S = 20
COLD_START_TIMEOUT_S = 150
#: A held request waits up to coldStartTimeout in the gateway, then is answered.
HELD_READ_TIMEOUT_S = COLD_START_TIMEOUT_S + 30
#: The scaler sees the last request at its next round and scales down at the
#: first round idleTimeout after that: two rounds, with a margin.
SCALE_DOWN_WITHIN_S = IDLE_TIMEOUT_S + 3 * STATUS_INTERVAL_S + 60
#: Pod start-up is not timed; these only bound the waits.
POD_GONE_WITHIN_S = 120
EVENT_WITHIN_S = 60
JSON = "application/json"
COLD_START = "cold start"  # in the scaler's reason for a scale-up from zero


def _assert_scaler_wired(namespace: str, name: str) -> None:
    """The gateway knows where to ask for replicas: the chart's scaler Service."""
    gateway = kubectl_json("-n", namespace, "get", f"deployment/{name}-gateway")
    (container,) = gateway["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    url = env.get("KUBEINFER_SCALER_URL") or ""
    assert url.startswith(f"http://{FULLNAME}-scaler.{RELEASE_NAMESPACE}.svc:"), (
        f"deployment/{name}-gateway: KUBEINFER_SCALER_URL is {url!r}: the chart must set the "
        "operator's KUBEINFER_SCALER_URL to its scaler Service")
    assert env.get("KUBEINFER_NAMESPACE") == namespace, env


def _scaled(namespace: str, name: str, needle: str) -> list[str]:
    return [m for m in endpoint_events(namespace, name, "Scaled") if needle in m]


def _burst_from_zero(port: int, namespace: str, name: str, variant: str, body: bytes,
                     limit: int) -> tuple[list[dict[str, Any]], Any, bool]:
    """``limit`` requests the cold gateway holds, then one more.

    Returns the held requests' answers, the extra request's outcome (its answer
    or its ClientError), and whether the throttling check is conclusive (all
    ``limit`` were held and no pod was ready when the extra one was answered).
    """
    from botocore.exceptions import ClientError  # type: ignore[import-untyped]

    clients = [sagemaker_runtime(port, caller_keys(namespace), read_timeout=HELD_READ_TIMEOUT_S)
               for _ in range(limit + 1)]

    def call(client: Any) -> dict[str, Any]:
        # patience 0: a 503 here is a failed cold start, never retried.
        return invoke_raw(client, 0, EndpointName=name, ContentType=JSON, Accept=JSON,
                          Body=body)

    with ThreadPoolExecutor(limit) as pool:
        held: list[Future[dict[str, Any]]] = [pool.submit(call, c) for c in clients[:limit]]

        def all_held() -> str | None:
            if any(f.done() for f in held):
                return "a held request was answered first"
            value = gateway_metric(port, "kubeinfer_gateway_in_flight_requests", endpoint=name)
            return "all held" if value is not None and value >= limit else None

        state = wait_for(all_held, 90, f"the gateway to hold {limit} requests "
                         "(kubeinfer_gateway_in_flight_requests)", interval=0.2)
        extra: Any
        try:
            extra = call(clients[limit])
        except ClientError as exc:
            extra = exc
        conclusive = state == "all held" and not variant_pods(namespace, name, variant,
                                                              ready_only=True)
        answers = [f.result(timeout=HELD_READ_TIMEOUT_S + 30) for f in held]
    return answers, extra, conclusive


@pytest.mark.timeout(READY_TIMEOUT_S + 2 * HELD_READ_TIMEOUT_S + SCALE_DOWN_WITHIN_S
                     + POD_GONE_WITHIN_S + GC_TIMEOUT_S + 400)
def test_serverless_endpoint_scales_from_zero_and_back(namespace: str, models_dir: Path,
                                                       tmp_path: Path) -> None:
    from botocore.exceptions import ClientError

    doc = load_example(EXAMPLE)
    name = doc["metadata"]["name"]
    serverless = doc["spec"]["serverless"]
    serverless["idleTimeout"] = IDLE_TIMEOUT_S
    serverless["coldStartTimeout"] = COLD_START_TIMEOUT_S
    assert serverless.get("provisionedConcurrency", 0) == 0, "the example must start at zero"
    limit = int(serverless["maxConcurrency"])
    (variant,) = doc["spec"]["variants"]
    deployment = f"{name}-{variant['name']}"
    model = local_model(variant["model"]["uri"], models_dir)
    assert model is not None, f"{variant['model']['uri']}: not a model the image bakes"
    body, expected = sample_and_expected(model)
    manifest = write_manifest(doc, tmp_path)

    with diagnosed(namespace, name):
        # Ready with no model server at all.
        obj = apply_and_wait_ready(namespace, manifest, name)
        assert deployment_replicas(namespace, deployment) == 0
        assert variant_pods(namespace, name, variant["name"]) == []
        (status_variant,) = obj["status"]["variants"]
        assert status_variant["desiredReplicas"] == 0, status_variant
        _assert_scaler_wired(namespace, name)

        service, service_port = gateway_of(obj)
        with port_forward(namespace, service, service_port) as port:
            # Cold start: every held request is answered, by the model.
            answers, extra, conclusive = _burst_from_zero(port, namespace, name,
                                                          variant["name"], body, limit)
            for i, answer in enumerate(answers):
                assert answer["variant"] == variant["name"]
                assert_predictions(json.loads(answer["body"]), expected,
                                   f"{name}: held request {i}")
            # maxConcurrency: held requests count; one more is throttled.
            if conclusive:
                assert isinstance(extra, ClientError), (
                    f"request {limit + 1} was answered while {limit} were held: "
                    f"maxConcurrency {limit} is not enforced")
                code, status, message = error_of(extra)
                assert (code, status) == ("ThrottlingException", 429), message
                assert "maxConcurrency" in message, message
            else:
                warnings.warn(f"{name}: a replica became ready while request {limit + 1} was "
                              "sent; the 429 check is inconclusive this run", stacklevel=1)

            # The scaler did it: one replica, a Scaled Event, the reason in status.
            wait_for(lambda: deployment_replicas(namespace, deployment) == 1, 30,
                     f"deployment/{deployment} at 1 replica")
            wait_for(lambda: _scaled(namespace, name, COLD_START), EVENT_WITHIN_S,
                     f"a Scaled Event on {name} saying {COLD_START!r}")
            wait_for(lambda: COLD_START in (get_endpoint(namespace, name)["status"]
                                            ["variants"][0].get("lastScaling") or ""),
                     EVENT_WITHIN_S, "status.variants[0].lastScaling to give the reason")

            # No traffic for idleTimeout: back to zero, still Ready.
            wait_for(lambda: deployment_replicas(namespace, deployment) == 0,
                     SCALE_DOWN_WITHIN_S,
                     f"deployment/{deployment} back to 0 after {IDLE_TIMEOUT_S}s idle")
            wait_for(lambda: _scaled(namespace, name, "idleTimeout"), EVENT_WITHIN_S,
                     f"a Scaled Event on {name} for the scale-down")
            wait_for(lambda: not variant_pods(namespace, name, variant["name"]),
                     POD_GONE_WITHIN_S, f"the pods of {deployment} to terminate")
            wait_for(lambda: not any(gateway_pods(port).values()), 30,
                     "the gateway to drop the stopped pod from its routes", interval=1)
            wait_for(lambda: (condition(get_endpoint(namespace, name), "Ready") or {})
                     .get("status") == "True", EVENT_WITHIN_S, f"{name} Ready at 0 replicas")

            # And from zero again.
            cold_starts = len(_scaled(namespace, name, COLD_START))
            client = sagemaker_runtime(port, caller_keys(namespace),
                                       read_timeout=HELD_READ_TIMEOUT_S)
            invoked, got = invoke(client, name, body, patience_s=0)
            assert invoked == variant["name"]
            assert_predictions(got, expected, f"{name}: second cold start")
            wait_for(lambda: len(_scaled(namespace, name, COLD_START)) > cold_starts,
                     EVENT_WITHIN_S, f"a new {COLD_START!r} Scaled Event on {name}")

        delete_endpoint(namespace, name, obj["metadata"]["uid"])
