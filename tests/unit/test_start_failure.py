"""Whether a variant's latest start failed, from its pods (``reconcile.start_failure``),
and the operator scaler's answer to a scale request for it (``scaling.cluster``,
``scaling.start_failures``).

Pods are dicts as the Kubernetes API returns them. The real operator answering a
gateway's ``POST /scale`` against the emulator is in
tests/integration/test_serverless_operator.py.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, cast

import pytest
from aiohttp import web

from kubeinfer_operator.reconcile import start_failure as sf
from kubeinfer_operator.reconcile.start_failure import (
    RETRY_AFTER_S,
    StartFailure,
    start_failed_answer,
    start_failure,
)
from kubeinfer_operator.render.compile_jobs import CONTAINER as COMPILE_CONTAINER
from kubeinfer_operator.render.k8s_secrets import scaler_token
from kubeinfer_operator.scaling.cluster import ClusterScaler
from kubeinfer_runtime.contract import ScaleRequest
from kubeinfer_runtime.contract.scale import (
    LOAD_FAILED_EXIT_CODE,
    START_FAILED_STATUS,
    StartFailed,
)

#: What a container's own words may hold: never in a decision or an answer.
SECRET = "s3://private-bucket/model.onnx?X-Amz-Signature=deadbeef password=hunter2"


def container(*, ready: bool = False, restarts: int = 0, waiting: str | None = None,
              running: bool = False, terminated: str | None = None, exit_code: int = 1,
              last: str | None = None, last_exit: int = 1,
              name: str = "model-server") -> dict[str, Any]:
    state: dict[str, Any] = {}
    if waiting is not None:
        state["waiting"] = {"reason": waiting, "message": SECRET}
    elif terminated is not None:
        state["terminated"] = {"reason": terminated, "exitCode": exit_code, "message": SECRET}
    elif running:
        state["running"] = {"startedAt": "2024-01-01T00:00:00Z"}
    status: dict[str, Any] = {"name": name, "ready": ready, "restartCount": restarts,
                              "image": "registry.example/private/image:1", "state": state}
    if last is not None:
        status["lastState"] = {"terminated": {"reason": last, "exitCode": last_exit,
                                              "message": SECRET}}
    return status


def pod(*containers: dict[str, Any], ready: bool = False, phase: str = "Running",
        init: list[dict[str, Any]] | None = None, deleting: bool = False,
        name: str = "ep-main-7d9c-abcde") -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "labels": {"kubeinfer.io/variant": "main"}}
    if deleting:
        metadata["deletionTimestamp"] = "2024-01-01T00:00:00Z"
    status: dict[str, Any] = {
        "phase": phase,
        "conditions": [{"type": "Ready", "status": "True" if ready else "False",
                        "message": SECRET}],
        "containerStatuses": list(containers)}
    if init is not None:
        status["initContainerStatuses"] = init
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "status": status}


CRASH_LOOP_ERROR = pod(container(waiting="CrashLoopBackOff", restarts=3, last="Error"))
CRASH_LOOP_OOM = pod(container(waiting="CrashLoopBackOff", restarts=2, last="OOMKilled",
                               last_exit=137))
READY = pod(container(ready=True, running=True), ready=True)
STARTING = pod(container(waiting="ContainerCreating"), phase="Pending")


@pytest.mark.parametrize(("the_pod", "what"), [
    (CRASH_LOOP_ERROR, sf.EXITED),
    (CRASH_LOOP_OOM, sf.OOM_KILLED),
    # CrashLoopBackOff without a readable last exit: still a crash loop.
    (pod(container(waiting="CrashLoopBackOff", restarts=5)), sf.CRASH_LOOP),
    # Restarted after the crash and loading again, not ready: the last start failed.
    (pod(container(running=True, restarts=1, last="Error")), sf.EXITED),
    (pod(container(running=True, restarts=1, last="OOMKilled", last_exit=137)),
     sf.OOM_KILLED),
    # Exited just now, before the kubelet restarts it.
    (pod(container(terminated="OOMKilled", exit_code=137)), sf.OOM_KILLED),
    (pod(container(terminated="Error")), sf.EXITED),
    (pod(container(terminated="Completed", exit_code=0)), sf.EXITED),
    # The model server's own exit code when its model failed to load (on Kubernetes).
    (pod(container(waiting="CrashLoopBackOff", restarts=2, last="Error",
                   last_exit=LOAD_FAILED_EXIT_CODE)), sf.LOAD_FAILED),
    (pod(container(terminated="Error", exit_code=LOAD_FAILED_EXIT_CODE)), sf.LOAD_FAILED),
    (pod(container(waiting="ImagePullBackOff"), phase="Pending"), sf.IMAGE_PULL),
    (pod(container(waiting="ErrImagePull"), phase="Pending"), sf.IMAGE_PULL),
    (pod(container(waiting="ErrImageNeverPull"), phase="Pending"), sf.IMAGE_PULL),
    (pod(container(waiting="InvalidImageName"), phase="Pending"), sf.IMAGE_NAME),
    (pod(container(waiting="CreateContainerConfigError"), phase="Pending"), sf.CONFIG),
    (pod(container(waiting="CreateContainerError"), phase="Pending"), sf.CREATE),
    # Init containers: the compile step, another one, and an OOM kill in one.
    (pod(container(waiting="PodInitializing"), phase="Pending",
         init=[container(name=COMPILE_CONTAINER, waiting="CrashLoopBackOff", restarts=2,
                         last="Error")]), sf.COMPILE),
    (pod(container(waiting="PodInitializing"), phase="Pending",
         init=[container(name="fetch", waiting="CrashLoopBackOff", restarts=2,
                         last="Error")]), sf.INIT),
    (pod(container(waiting="PodInitializing"), phase="Pending",
         init=[container(name="fetch", terminated="OOMKilled", exit_code=137)]),
     sf.OOM_KILLED),
    (pod(container(waiting="PodInitializing"), phase="Pending",
         init=[container(name="fetch", waiting="ImagePullBackOff")]), sf.IMAGE_PULL),
])
def test_every_kind_of_failed_start_is_named_without_the_pods_words(
        the_pod: dict[str, Any], what: str) -> None:
    failure = start_failure([the_pod])
    assert failure == StartFailure(what, RETRY_AFTER_S)
    assert what in sf.PRIORITY
    answer = start_failed_answer(failure, "ml", "ep", "main")
    text = answer.model_dump_json()
    assert answer.start_failed == what and answer.retry_after_s == RETRY_AFTER_S
    for word in ("hunter2", "private-bucket", "registry.example", "Signature"):
        assert word not in text


@pytest.mark.parametrize("the_pod", [
    READY,
    STARTING,
    # Pending, not scheduled yet: no container status at all.
    {"metadata": {"name": "p"}, "status": {"phase": "Pending"}},
    # Pulling, initialising, loading its model for the first time.
    pod(container(waiting="PodInitializing"), phase="Pending"),
    pod(container(running=True)),
    # An init container that completed; the server loads.
    pod(container(running=True), init=[container(name=COMPILE_CONTAINER,
                                                 terminated="Completed", exit_code=0)]),
    # Restarted after a node restart (reason Unknown), now loading: no crash of its own.
    pod(container(running=True, restarts=1, last="Unknown", last_exit=255)),
    # Ready although it crashed once before.
    pod(container(ready=True, running=True, restarts=1, last="OOMKilled"), ready=True),
])
def test_a_ready_or_starting_pod_is_no_failure(the_pod: dict[str, Any]) -> None:
    assert start_failure([the_pod]) is None


def test_no_pods_is_no_failure() -> None:
    """At zero replicas, or before the ReplicaSet made the pod: the scale-up is coming."""
    assert start_failure([]) is None


@pytest.mark.parametrize("others", [
    [READY],
    [STARTING],
    [READY, CRASH_LOOP_OOM],
])
def test_one_ready_or_starting_pod_among_failing_ones_is_no_failure(
        others: list[dict[str, Any]]) -> None:
    """A ready pod serves; a starting one (the new ReplicaSet's pod after a spec fix) may."""
    assert start_failure([CRASH_LOOP_ERROR, *others]) is None
    assert start_failure([*others, CRASH_LOOP_ERROR]) is None


def test_pods_that_are_going_or_gone_do_not_count() -> None:
    evicted = pod(container(waiting="ContainerCreating"), phase="Failed")
    deleting_ready = pod(container(ready=True, running=True), ready=True, deleting=True)
    deleting_starting = pod(container(waiting="ContainerCreating"), deleting=True)
    assert start_failure([evicted, deleting_ready, deleting_starting]) is None
    failure = start_failure([CRASH_LOOP_OOM, evicted, deleting_ready, deleting_starting])
    assert failure is not None and failure.what == sf.OOM_KILLED


def test_several_failing_pods_name_what_to_fix_first() -> None:
    pull = pod(container(waiting="ImagePullBackOff"), phase="Pending")
    assert start_failure([CRASH_LOOP_ERROR, CRASH_LOOP_OOM, pull]) == StartFailure(
        sf.IMAGE_PULL)
    assert start_failure([CRASH_LOOP_ERROR, CRASH_LOOP_OOM]) == StartFailure(sf.OOM_KILLED)
    # One pod, two containers (an image step beside the model server).
    two = pod(container(running=True, ready=True),
              container(name="step-pre", waiting="CrashLoopBackOff", restarts=2, last="Error"))
    assert start_failure([two]) == StartFailure(sf.EXITED)


def test_garbage_in_a_pod_is_no_failure_and_no_crash() -> None:
    for junk in ({}, {"status": None}, {"status": {"containerStatuses": "x"}},
                 {"status": {"containerStatuses": [None, 3, {"state": "x"}],
                             "conditions": [None]}},
                 {"status": {"containerStatuses": [{"restartCount": True,
                                                    "lastState": {"terminated": "x"}}]}}):
        assert start_failure([junk]) is None


def test_the_answer_fits_the_contract_and_says_where_to_look() -> None:
    long = "v" * 63
    answer = start_failed_answer(StartFailure(sf.CONFIG), "n" * 63, "e" * 63, long)
    again = StartFailed.model_validate_json(answer.model_dump_json())
    assert again.start_failed == sf.CONFIG and again.retry_after_s == RETRY_AFTER_S
    assert "kubectl describe pods" in again.message and long in again.message


# -- the operator's scale handler ----------------------------------------------------------------

KEY = b"k" * 32
NS = "ml"


class Posted:
    """What the handler reads of a request: its headers and its body."""

    def __init__(self, body: ScaleRequest, namespace: str = NS) -> None:
        self.headers = {"Authorization": f"Bearer {scaler_token(KEY, namespace)}"}
        self.body = body.model_dump_json().encode()

    async def read(self) -> bytes:
        return self.body


def scale_request(variant: str = "main") -> web.Request:
    return cast(web.Request, Posted(ScaleRequest(endpoint="ep", variant=variant,
                                                 namespace=NS)))


class Pods:
    """The variant's pods as the API lists them, counting the reads."""

    def __init__(self, *pods: dict[str, Any]) -> None:
        self.pods = list(pods)
        self.reads = 0
        self.delay = 0.0

    async def __call__(self, namespace: str, endpoint: str,
                       variant: str) -> StartFailure | None:
        assert (namespace, endpoint, variant) == (NS, "ep", "main")
        self.reads += 1
        await asyncio.sleep(self.delay)
        return start_failure(self.pods)


def scaler_with(pods: Pods) -> tuple[ClusterScaler, list[tuple[str, str]], list[float]]:
    clock = [0.0]
    scaler = ClusterScaler(signing_key=KEY, monotonic=lambda: clock[0])
    scaler.register(NS, "ep", frozenset({"main"}))
    rounds: list[tuple[str, str]] = []

    async def on_request(namespace: str, endpoint: str) -> None:
        rounds.append((namespace, endpoint))

    scaler.on_request = on_request
    scaler.start_failures.find = pods
    return scaler, rounds, clock


async def test_a_crash_looping_variant_is_answered_503_start_failed_and_still_scaled() -> None:
    pods = Pods(CRASH_LOOP_OOM)
    scaler, rounds, clock = scaler_with(pods)
    response = await scaler._on_scale(scale_request())
    assert response.status == START_FAILED_STATUS
    assert response.headers["Retry-After"] == str(int(RETRY_AFTER_S))
    answer = StartFailed.model_validate_json(cast(bytes, response.body))
    assert answer.start_failed == sf.OOM_KILLED and answer.retry_after_s == RETRY_AFTER_S
    assert SECRET not in cast(bytes, response.body).decode()
    # Answering fast does not stop trying: the request counts and its round runs.
    await asyncio.sleep(0)
    assert rounds == [(NS, "ep")]
    memory = scaler.memory[(NS, "ep", "main")]
    assert memory.requested_at == clock[0]
    # And the refused caller is traffic: the variant is not idle while callers ask.
    clock[0] = 42.0
    assert (await scaler._on_scale(scale_request())).status == START_FAILED_STATUS
    assert memory.last_activity == 42.0
    await scaler.close()


async def test_a_ready_or_starting_variant_is_answered_202() -> None:
    for state in (READY, STARTING):
        pods = Pods(CRASH_LOOP_ERROR, state)
        scaler, _, _ = scaler_with(pods)
        response = await scaler._on_scale(scale_request())
        assert response.status == 202 and json.loads(cast(bytes, response.body)) == {
            "accepted": True}
        assert scaler.memory[(NS, "ep", "main")].last_activity is None  # rounds judge it
        await scaler.close()


async def test_refused_requests_read_no_pods() -> None:
    pods = Pods(CRASH_LOOP_ERROR)
    scaler, _, _ = scaler_with(pods)
    unknown = await scaler._on_scale(scale_request("ghost"))
    other_ns = cast(web.Request, Posted(ScaleRequest(endpoint="ep", variant="main",
                                                     namespace=NS), namespace="other"))
    assert unknown.status == 404 and (await scaler._on_scale(other_ns)).status == 403
    assert pods.reads == 0
    await scaler.close()


async def test_a_flood_of_requests_reads_the_pods_once_a_second() -> None:
    pods = Pods(CRASH_LOOP_ERROR)
    pods.delay = 0.05
    scaler, _, clock = scaler_with(pods)
    answers = await asyncio.gather(*(scaler._on_scale(scale_request()) for _ in range(50)))
    assert {a.status for a in answers} == {START_FAILED_STATUS} and pods.reads == 1
    clock[0] += 0.5
    assert (await scaler._on_scale(scale_request())).status == START_FAILED_STATUS
    assert pods.reads == 1
    # A second on, the pods are read again: now one is ready.
    pods.pods.append(READY)
    clock[0] += 0.6
    assert (await scaler._on_scale(scale_request())).status == 202 and pods.reads == 2
    await scaler.close()


async def test_pods_that_cannot_be_read_in_time_leave_the_usual_answer(
        caplog: pytest.LogCaptureFixture) -> None:
    pods = Pods(CRASH_LOOP_ERROR)
    pods.delay = 5
    scaler, _, _ = scaler_with(pods)
    scaler.start_failures.timeout_s = 0.05
    assert (await scaler._on_scale(scale_request())).status == 202
    assert "without checking for a failed start" in caplog.text

    async def broken(namespace: str, endpoint: str, variant: str) -> StartFailure | None:
        raise RuntimeError(SECRET)

    scaler2, _, _ = scaler_with(pods)
    scaler2.start_failures.find = broken
    assert (await scaler2._on_scale(scale_request())).status == 202
    await scaler.close()
    await scaler2.close()
