"""Serverless on Kubernetes: the real kopf operator, its scaler, and the emulator.

The operator renders a serverless variant at 0 replicas (Ready: the gateway
holds requests), the gateway is told where the scaler is, a scale request
(what the activator POSTs) raises the variant Deployment to 1 with the reason
in status and in a ``Scaled`` Event, and after idleTimeout it goes back to 0.
Nothing runs pods here: the test plays the Deployment controller.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from kubeinfer_operator.render.k8s_secrets import scaler_token
from kubeinfer_operator.settings import OperatorSettings
from kubeinfer_runtime.contract import RouteTable, ScaleRequest
from tests.support.kube_harness import (
    EmulatorThread,
    Kube,
    operator_on_emulator,
    wait_for,
)
from tests.support.ports import free_port

NS = "sl"
SIGNING_KEY = "test-scaler-signing-key"


def token_for(namespace: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {scaler_token(SIGNING_KEY.encode(), namespace)}"}
IDLE_S = 6
ENDPOINT: dict[str, Any] = {
    "apiVersion": "kubeinfer.io/v1alpha1", "kind": "Endpoint", "metadata": {"name": "cold"},
    "spec": {"type": "Serverless",
             # Long enough for the cold start's reason and replica to reach status before
             # the idle variant goes back to zero (at 1 s a loaded runner raced it).
             "serverless": {"maxConcurrency": 3, "idleTimeout": IDLE_S, "memory": "1Gi"},
             "variants": [{"name": "main", "model": {"uri": "s3://b/iris.onnx"}}]},
}


#: The module's emulator (its request log), for the tests that count API requests.
EMULATORS: dict[str, EmulatorThread] = {}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Kube, str]]:
    port = free_port()
    scaler_url = f"http://127.0.0.1:{port}/scale"
    settings = OperatorSettings(standalone=True, status_interval_s=0.3, namespaces=[],
                                runtime_image="example.test/runtime:1", scaler_port=port,
                                scaler_url=scaler_url, scaler_signing_key=SIGNING_KEY)
    with operator_on_emulator(settings, tmp_path_factory.mktemp("kube")) as (kube, emulator):
        EMULATORS["cluster"] = emulator
        yield kube, scaler_url
        EMULATORS.clear()


def replicas(kube: Kube) -> int | None:
    dep = kube.get("Deployment", NS, "cold-main")
    return None if dep is None else int(dep["spec"]["replicas"])


def env_of(dep: dict[str, Any]) -> dict[str, Any]:
    [container] = dep["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def routes(kube: Kube) -> RouteTable:
    cm = kube.get("ConfigMap", NS, "cold-routes")
    assert cm is not None
    return RouteTable.from_json(cm["data"]["routes.json"])


def scaled_events(kube: Kube) -> list[str]:
    return [e["message"] for e in kube.list("Event", NS) if e.get("reason") == "Scaled"]


def test_scale_from_zero_and_back(cluster: tuple[Kube, str]) -> None:
    kube, scaler_url = cluster
    kube.create_namespace(NS)
    assert kube.create(ENDPOINT, NS).status_code == 201

    # Rendered at zero replicas; the gateway knows its namespace and the scaler.
    wait_for(lambda: replicas(kube) == 0, what="variant Deployment at 0 replicas")
    # The operator creates the gateway last (after the variants): wait for it too.
    gateway = wait_for(lambda: kube.get("Deployment", NS, "cold-gateway"),
                       what="gateway Deployment")
    env = env_of(gateway)
    assert env["KUBEINFER_SCALER_URL"] == scaler_url and env["KUBEINFER_NAMESPACE"] == NS
    # The gateway's scaler token comes from the namespace's runtime Secret.
    assert env["KUBEINFER_SCALER_TOKEN"] == {"secretKeyRef": {
        "name": "kubeinfer-runtime", "key": "scaler-token", "optional": True}}
    secret = kube.get("Secret", NS, "kubeinfer-runtime")
    assert secret is not None
    import base64

    assert base64.b64decode(secret["data"]["scaler-token"]).decode() == scaler_token(
        SIGNING_KEY.encode(), NS)
    assert [r["name"] for r in secret["metadata"]["ownerReferences"]] == ["cold"]
    dep = kube.get("Deployment", NS, "cold-main")
    assert dep is not None
    [server] = dep["spec"]["template"]["spec"]["containers"]
    assert server["resources"]["limits"]["memory"] == "1Gi"
    kube.make_available(NS, "cold-gateway")

    def ready() -> bool:
        ep = kube.get("Endpoint", NS, "cold") or {}
        conds = {c["type"]: c for c in (ep.get("status") or {}).get("conditions", [])}
        return conds.get("Ready", {}).get("status") == "True"

    wait_for(ready, what="Ready with the variant scaled to zero")
    route = routes(kube).endpoints["cold"]
    # Listed even at zero replicas: the gateway finds the first pod through the
    # headless Service's DNS as soon as it is ready (no ConfigMap refresh wait).
    [upstream] = route.variants[0].upstreams
    assert route.type == "Serverless" and "cold-main" in upstream
    assert route.serverless is not None and route.serverless.max_concurrency == 3

    # What the activator sends when it holds a request; bad requests are refused.
    bad = httpx.post(scaler_url, content=b"{}", headers=token_for(NS), timeout=5)
    assert bad.status_code == 400
    no_ns = httpx.post(scaler_url, content=ScaleRequest(endpoint="cold", variant="main")
                       .model_dump_json(), headers=token_for(NS), timeout=5)
    assert no_ns.status_code == 400 and "KUBEINFER_NAMESPACE" in no_ns.json()["message"]
    # Several gateways (or one repeating itself while it holds requests) ask at
    # once: one scale-out, one Event.
    request = ScaleRequest(endpoint="cold", variant="main", namespace=NS).model_dump_json()
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: httpx.post(scaler_url, content=request,
                                                     headers=token_for(NS), timeout=5),
                                range(4)))
    assert [r.status_code for r in answers] == [202] * 4
    wait_for(lambda: replicas(kube) == 1, what="scale-up to 1 replica")
    time.sleep(1)  # time for a duplicate evaluation to show, were there one
    assert sum("Scaled out from 0 to 1" in m and "cold start" in m
               for m in scaled_events(kube)) == 1, scaled_events(kube)

    def reason() -> str:
        ep = kube.get("Endpoint", NS, "cold") or {}
        variants = (ep.get("status") or {}).get("variants") or [{}]
        return str(variants[0].get("lastScaling") or "")

    wait_for(lambda: "cold start" in reason(), what="status.variants[].lastScaling")
    kube.make_available(NS, "cold-main")
    # One status write carries both (Ready needs the replica rolled out); the scaler may
    # take the idle variant back to zero right after, so they are not read apart.
    wait_for(lambda: '"readyReplicas": 1' in json.dumps(
        (kube.get("Endpoint", NS, "cold") or {}).get("status")), what="the replica in status")

    # No traffic for idleTimeout: back to zero, with the reason recorded.
    wait_for(lambda: replicas(kube) == 0, timeout=IDLE_S + 15, what="scale to zero")
    assert any("Scaled in from 1 to 0" in m for m in scaled_events(kube))
    # Ready again once the Deployment controller (played here) has seen the scale-in.
    kube.make_available(NS, "cold-main")
    wait_for(ready, what="Ready with the variant back at zero")
    assert json.dumps(scaled_events(kube))  # Events are plain JSON objects


def test_scaled_endpoint_keeps_its_replicas_on_spec_change(cluster: tuple[Kube, str]) -> None:
    kube, _ = cluster
    ns = "auto"
    kube.create_namespace(ns)
    ep = json.loads(json.dumps(ENDPOINT))
    ep["metadata"]["name"] = "auto"
    ep["spec"] = {"variants": [{"name": "main", "model": {"uri": "s3://b/iris.onnx"},
                                "replicas": 2,
                                "autoscaling": {"minReplicas": 1, "maxReplicas": 3}}]}
    assert kube.create(ep, ns).status_code == 201
    wait_for(lambda: (kube.get("Deployment", ns, "auto-main") or {}).get("spec", {})
             .get("replicas") == 2, what="initial replicas inside the bounds")
    # The Deployment runs 3 (scaled); a spec edit, even of replicas (now only the
    # starting count), re-renders the Deployment but must keep the 3.
    kube.patch("Deployment", ns, "auto-main", {"spec": {"replicas": 3}})
    before = applied_hash(kube, ns)
    kube.patch("Endpoint", ns, "auto", {"spec": {"variants": [
        {"name": "main", "model": {"uri": "s3://b/iris.onnx"}, "replicas": 1,
         "env": [{"name": "X", "value": "1"}],
         "autoscaling": {"minReplicas": 1, "maxReplicas": 3}}]}})
    wait_for(lambda: applied_hash(kube, ns) != before, what="the Deployment re-rendered")
    dep = kube.get("Deployment", ns, "auto-main")
    assert dep is not None and dep["spec"]["replicas"] == 3


def applied_hash(kube: Kube, ns: str) -> str:
    dep = kube.get("Deployment", ns, "auto-main") or {}
    return str((dep.get("metadata") or {}).get("annotations", {}).get(
        "kubeinfer.io/applied-hash"))



def test_scale_requests_must_prove_their_namespace(cluster: tuple[Kube, str]) -> None:
    """Unauthenticated, cross-namespace and made-up scale requests: refused at once, no
    scale-up, no Event."""
    kube, scaler_url = cluster
    ns = "guarded"
    kube.create_namespace(ns)
    ep = json.loads(json.dumps(ENDPOINT))
    ep["metadata"]["name"] = "quiet"
    assert kube.create(ep, ns).status_code == 201
    wait_for(lambda: (kube.get("Deployment", ns, "quiet-main") or {}).get("spec", {})
             .get("replicas") == 0, what="the variant at zero")
    # The first reconcile's Created Event is posted after its Deployments exist.
    wait_for(lambda: any(e["reason"] == "Created" for e in kube.list("Event", ns)),
             what="the Created Event")
    events_before = len(kube.list("Event", ns))

    def post(body: ScaleRequest, headers: dict[str, str]) -> httpx.Response:
        return httpx.post(scaler_url, content=body.model_dump_json(), headers=headers,
                          timeout=5)

    real = ScaleRequest(endpoint="quiet", variant="main", namespace=ns)
    assert post(real, {}).status_code == 401
    assert post(real, {"Authorization": "Bearer not-a-token"}).status_code == 403
    # A gateway of another namespace (its own valid token) cannot scale this one.
    assert post(real, token_for(NS)).status_code == 403
    system = ScaleRequest(endpoint="coredns", variant="main", namespace="kube-system")
    assert post(system, token_for(NS)).status_code == 403
    assert post(system, token_for("kube-system")).status_code == 404  # no such Endpoint
    made_up = ScaleRequest(endpoint="nope", variant="main", namespace=ns)
    assert post(made_up, token_for(ns)).status_code == 404
    other_variant = ScaleRequest(endpoint="quiet", variant="ghost", namespace=ns)
    assert post(other_variant, token_for(ns)).status_code == 404
    with ThreadPoolExecutor(8) as pool:
        codes = set(pool.map(lambda _: post(real, {}).status_code, range(400)))
    assert codes == {401}
    time.sleep(1)  # a reconcile triggered by any of them would show by now
    dep = kube.get("Deployment", ns, "quiet-main")
    assert dep is not None and dep["spec"]["replicas"] == 0
    assert len(kube.list("Event", ns)) == events_before
    # The namespace's own token works.
    assert post(real, token_for(ns)).status_code == 202
    wait_for(lambda: (kube.get("Deployment", ns, "quiet-main") or {}).get("spec", {})
             .get("replicas") == 1, what="the authenticated scale-up")


def test_a_flood_of_valid_scale_requests_costs_a_round_a_second(
        cluster: tuple[Kube, str]) -> None:
    """Whoever reads a namespace's scaler token (its Secret) may ask for scale-ups as
    often as they like: the rounds they cause start at most once a second per Endpoint.
    Before, they ran back to back: ~30 rounds (over 200 API requests) a second."""
    kube, scaler_url = cluster
    ns = "flood"
    kube.create_namespace(ns)
    ep = json.loads(json.dumps(ENDPOINT))
    ep["metadata"]["name"] = "busy"
    ep["spec"]["serverless"]["idleTimeout"] = 600
    assert kube.create(ep, ns).status_code == 201
    wait_for(lambda: (kube.get("Deployment", ns, "busy-main") or {}).get("spec", {})
             .get("replicas") == 0, what="the variant at zero")
    emulator = EMULATORS["cluster"].emulator
    assert emulator is not None
    # A round reads the Endpoint once; so does each status refresh (every 0.3 s here).
    endpoint_path = f"/apis/kubeinfer.io/v1alpha1/namespaces/{ns}/endpoints/busy"

    def reads_since(mark: int) -> int:
        return sum(1 for method, path, _ in emulator.requests[mark:]
                   if method == "GET" and path.split("?")[0] == endpoint_path)

    mark, started = len(emulator.requests), time.monotonic()
    time.sleep(3)
    quiet_rate = reads_since(mark) / (time.monotonic() - started)
    body = ScaleRequest(endpoint="busy", variant="main", namespace=ns).model_dump_json()
    flood_s = 3.0
    mark, started = len(emulator.requests), time.monotonic()
    stop = started + flood_s

    def flood(_: int) -> int:
        sent = 0
        with httpx.Client(timeout=5) as client:
            while time.monotonic() < stop:
                assert client.post(scaler_url, content=body,
                                   headers=token_for(ns)).status_code == 202
                sent += 1
        return sent

    with ThreadPoolExecutor(4) as pool:
        sent = sum(pool.map(flood, range(4)))
    time.sleep(1.5)  # the round the last requests asked for
    rounds = reads_since(mark) - quiet_rate * (time.monotonic() - started)
    assert sent > 100, sent  # a flood: hundreds of requests
    # One a second and one for the last requests, give or take the refreshes' jitter.
    assert rounds <= flood_s + 4, (rounds, quiet_rate)
    wait_for(lambda: (kube.get("Deployment", ns, "busy-main") or {}).get("spec", {})
             .get("replicas") == 1, what="the scale-up the requests asked for")


#: A container's own words (model URI, load error): never in the scaler's answer.
POD_SECRET = "s3://private-bucket/model.onnx?X-Amz-Signature=deadbeef: no such key"


def _container_status(name: str, state: dict[str, Any], *, ready: bool = False,
                      restarts: int = 0, last: dict[str, Any] | None = None
                      ) -> dict[str, Any]:
    status = {"name": name, "ready": ready, "restartCount": restarts,
              "image": "example.test/runtime:1", "imageID": "", "state": state}
    if last is not None:
        status["lastState"] = last
    return status


def test_a_variant_whose_pods_fail_to_start_is_answered_503_at_once(
        cluster: tuple[Kube, str]) -> None:
    """Local mode's scaler answers a scale request for a variant whose start failed 503
    with a ``StartFailed`` body, so the gateway answers its held requests at once; the
    operator's scaler does the same from the variant's pods (crash loop, image pull),
    keeps the variant scaled up, and answers as usual again once a pod is Ready."""
    from kubeinfer_operator.reconcile import start_failure as sf
    from kubeinfer_runtime.contract.scale import START_FAILED_STATUS
    from kubeinfer_runtime.gateway.activator import start_failure

    kube, scaler_url = cluster
    ns = "crash"
    kube.create_namespace(ns)
    ep = json.loads(json.dumps(ENDPOINT))
    ep["metadata"]["name"] = "broken"
    idle_s = 8
    ep["spec"]["serverless"]["idleTimeout"] = idle_s
    assert kube.create(ep, ns).status_code == 201
    wait_for(lambda: (kube.get("Deployment", ns, "broken-main") or {}).get("spec", {})
             .get("replicas") == 0, what="the variant at zero")
    body = ScaleRequest(endpoint="broken", variant="main", namespace=ns).model_dump_json()

    def ask() -> httpx.Response:
        return httpx.post(scaler_url, content=body, headers=token_for(ns), timeout=5)

    # No pod yet: the usual answer, and the scale-up.
    assert ask().status_code == 202
    wait_for(lambda: (kube.get("Deployment", ns, "broken-main") or {}).get("spec", {})
             .get("replicas") == 1, what="the scale-up")

    # The ReplicaSet's pod (the test plays the Deployment controller and the kubelet).
    dep = kube.get("Deployment", ns, "broken-main")
    assert dep is not None
    template = dep["spec"]["template"]
    [server] = template["spec"]["containers"]
    pod_name = "broken-main-6b7f9-x2x4q"
    created = kube.create({"apiVersion": "v1", "kind": "Pod",
                           "metadata": {"name": pod_name,
                                        "labels": dict(template["metadata"]["labels"])},
                           "spec": copy.deepcopy(template["spec"])}, ns)
    assert created.status_code == 201, created.text

    def set_pod(phase: str, container: dict[str, Any], ready: bool) -> None:
        status = {"phase": phase,
                  "conditions": [{"type": "Ready", "status": str(ready),
                                  "message": POD_SECRET}],
                  "containerStatuses": [container]}
        if ready:
            status |= {"podIP": "10.1.2.3", "podIPs": [{"ip": "10.1.2.3"}]}
        patched = kube.patch("Pod", ns, pod_name, {"status": status}, sub="status")
        assert patched.status_code == 200, patched.text

    def answered(what: str | None) -> httpx.Response:
        """The scaler's answer once it says ``what`` (None: the usual 202); it reads the
        pods at most once a second."""
        def check() -> httpx.Response | None:
            r = ask()
            failure = start_failure(r.status_code, r.content)
            if what is None:
                return r if r.status_code == 202 else None
            return r if failure is not None and failure.start_failed == what else None
        response: httpx.Response = wait_for(check, what=f"the scaler's answer: {what}")
        return response

    # Still starting (ContainerCreating): hold, as before.
    set_pod("Pending", _container_status(server["name"], {"waiting": {
        "reason": "ContainerCreating"}}), ready=False)
    time.sleep(1.2)  # past the scaler's last read of the pods
    assert ask().status_code == 202

    # Crash loop: the model server exits (its model does not load).
    set_pod("Running", _container_status(
        server["name"], {"waiting": {"reason": "CrashLoopBackOff", "message": POD_SECRET}},
        restarts=3, last={"terminated": {"reason": "Error", "exitCode": 1,
                                         "message": POD_SECRET}}), ready=False)
    r = answered(sf.EXITED)
    assert r.status_code == START_FAILED_STATUS
    assert r.headers["Retry-After"] == str(int(sf.RETRY_AFTER_S))
    assert r.json()["retry_after_s"] == sf.RETRY_AFTER_S
    assert "private-bucket" not in r.text and "Signature" not in r.text
    assert "broken" in r.json()["message"] and ns in r.json()["message"]

    # OOMKilled: restarted and loading again, not ready.
    set_pod("Running", _container_status(
        server["name"], {"running": {"startedAt": "2024-01-01T00:00:00Z"}}, restarts=4,
        last={"terminated": {"reason": "OOMKilled", "exitCode": 137}}), ready=False)
    answered(sf.OOM_KILLED)

    # The image cannot be pulled.
    set_pod("Pending", _container_status(server["name"], {"waiting": {
        "reason": "ImagePullBackOff", "message": POD_SECRET}}), ready=False)
    r = answered(sf.IMAGE_PULL)
    assert "private-bucket" not in r.text

    # Answering fast never stops trying: while callers keep asking (the gateway asks
    # at most once a second per variant), the variant is not idle and stays scaled
    # up, past idleTimeout, for Kubernetes to keep restarting its pod.
    until = time.monotonic() + idle_s + 3
    while time.monotonic() < until:
        assert ask().status_code == START_FAILED_STATUS
        dep = kube.get("Deployment", ns, "broken-main")
        assert dep is not None and dep["spec"]["replicas"] == 1
        time.sleep(1)
    # Not even scaled in and straight out again (which would start a fresh pod).
    scaled = [e["message"] for e in kube.list("Event", ns) if e.get("reason") == "Scaled"]
    assert not any("Scaled in" in m for m in scaled), scaled

    # The pod becomes Ready: the usual answer again.
    set_pod("Running", _container_status(server["name"], {"running": {
        "startedAt": "2024-01-01T00:00:00Z"}}, ready=True, restarts=4), ready=True)
    r = answered(None)
    assert r.json() == {"accepted": True}
