"""Whether a variant's latest start on Kubernetes has failed, and how to say so: PURE.

Why this exists: a serverless variant's gateway holds requests while a replica
starts from zero, up to ``coldStartTimeout`` (minutes). In local mode the
scaler knows when the model server it started failed to load, exited or ran
out of memory, and answers the gateway's ``POST /scale`` 503 with a
``contract.scale.StartFailed`` body, so the gateway answers the requests it
holds at once (503 with ``Retry-After``). On Kubernetes the kubelet starts the
containers and the operator only sees the pods: this module reads them (as the
API returns them, listed by the operator's own labels, ``k8s.pods``) and
decides whether the variant's start failed, so the operator's scaler can answer
the same way instead of letting every request wait the whole
``coldStartTimeout`` for a replica that is not coming (bad model URI, crash
loop, OOMKilled, an image that cannot be pulled).

The start failed when no pod of the variant is Ready and every live pod (not
terminating, not ended) has a container that failed: waiting in
``CrashLoopBackOff``, ``ImagePullBackOff``/``ErrImagePull``/``ErrImageNeverPull``,
``InvalidImageName``, ``CreateContainerConfigError`` or ``CreateContainerError``;
or that exited (now, or in its ``lastState`` after at least one restart) with an
error or ``OOMKilled``. A pod that is still starting (``ContainerCreating``,
loading its model with no earlier crash) may yet become ready, so while one
exists the scaler keeps holding: after a spec fix the new ReplicaSet's pod
starts beside the old crash-looping one, and requests wait for it.

What the decision says reaches the endpoint's callers, so it is one of the kinds
below and nothing more: never a container's message, its logs or the image
name (they may name registries, model URIs, paths or credentials), which stay in
``kubectl describe pod``.

The retry-after: Kubernetes itself restarts a crashed container (or pulls the
image again) with a back-off (10 s doubling up to 5 min) whose next try is not
readable from the pod, and a fix (a new spec, a pushed image) may come at any
time. So the answer is a fixed, bounded ``RETRY_AFTER_S``, the same as local
mode's wait before it tries a failed variant again (``RETRY_AFTER_FAILURE_S``):
the gateway asks again after it and holds the requests once the pods are not
failing any more.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from kubeinfer_operator.render.compile_jobs import CONTAINER as COMPILE_CONTAINER
from kubeinfer_operator.render.k8s_meta import LABEL_ENDPOINT, LABEL_VARIANT
from kubeinfer_runtime.contract.scale import LOAD_FAILED_EXIT_CODE, StartFailed

#: Seconds the gateway answers the variant's requests 503 after such an answer (local
#: mode's ``RETRY_AFTER_FAILURE_S``); a later 202 to its next scale request ends it sooner.
RETRY_AFTER_S = 10.0

# The kinds of failure, safe to tell the endpoint's callers (``StartFailed.start_failed``).
# The first two are the words local mode uses for the same failures.
OOM_KILLED = "its model server ran out of memory"
LOAD_FAILED = "its model failed to load"
EXITED = "its model server exited"
CRASH_LOOP = "its model server keeps crashing"
IMAGE_PULL = "its container image cannot be pulled"
IMAGE_NAME = "its container image name is invalid"
CONFIG = "its container configuration is invalid (a missing Secret or ConfigMap key)"
CREATE = "its container cannot be created"
COMPILE = "its model failed to compile"
INIT = "its pod's init container failed"

#: Which kind is told when the pods failed in several ways: what a person must fix
#: first (nothing runs before the image is pulled and the container created).
PRIORITY = (IMAGE_NAME, IMAGE_PULL, CONFIG, CREATE, COMPILE, INIT, LOAD_FAILED, OOM_KILLED,
            EXITED, CRASH_LOOP)

#: ``state.waiting.reason`` values that mean the container will not start by waiting.
WAITING_FAILURES: Mapping[str, str] = {
    "ImagePullBackOff": IMAGE_PULL,
    "ErrImagePull": IMAGE_PULL,
    "ErrImageNeverPull": IMAGE_PULL,
    "InvalidImageName": IMAGE_NAME,
    "CreateContainerConfigError": CONFIG,
    "CreateContainerError": CREATE,
}
CRASH_LOOP_BACK_OFF = "CrashLoopBackOff"
OOM_REASON = "OOMKilled"
ERROR_REASON = "Error"


@dataclass(frozen=True)
class StartFailure:
    """A variant's latest start failed: ``what`` kind of failure (one of this module's
    constants), and how long the gateway should answer 503 before asking again."""

    what: str
    retry_after_s: float = RETRY_AFTER_S


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _restarts(status: Mapping[str, Any]) -> int:
    count = status.get("restartCount")
    return count if isinstance(count, int) and not isinstance(count, bool) else 0


def _exit_failure(terminated: Mapping[str, Any]) -> str | None:
    """The kind of a container's exit (``state``/``lastState.terminated``): None unless
    it crashed (``Error``) or was ``OOMKilled`` (an ``Unknown`` exit after a node
    restart, or a ``Completed`` init container, is no failure of the start). A model
    server that ends because its model failed to load says so by its exit code."""
    reason = terminated.get("reason")
    if reason == OOM_REASON:
        return OOM_KILLED
    if reason == ERROR_REASON:
        return LOAD_FAILED if terminated.get("exitCode") == LOAD_FAILED_EXIT_CODE else EXITED
    return None


def container_failure(status: Mapping[str, Any], *, init: bool = False) -> str | None:
    """Why one container (an entry of ``containerStatuses``/``initContainerStatuses``)
    cannot start, or None when it runs, is ready or may still start."""
    state = _mapping(status.get("state"))
    reason = _mapping(state.get("waiting")).get("reason")
    if isinstance(reason, str) and reason in WAITING_FAILURES:
        return WAITING_FAILURES[reason]
    last = _mapping(_mapping(status.get("lastState")).get("terminated"))
    now = _mapping(state.get("terminated"))
    kind: str | None = None
    if reason == CRASH_LOOP_BACK_OFF:
        kind = _exit_failure(last) or CRASH_LOOP
    elif now:
        kind = _exit_failure(now)
        if kind is None and not init and now.get("reason") == "Completed":
            kind = EXITED  # a server that ends, even cleanly, serves nothing
    elif status.get("ready") is not True and _restarts(status) >= 1:
        # Restarted after a crash and not ready again (running or about to be).
        kind = _exit_failure(last)
    if kind is None or not init:
        return kind
    if kind == OOM_KILLED:
        return kind
    return COMPILE if status.get("name") == COMPILE_CONTAINER else INIT


def pod_ready(pod: Mapping[str, Any]) -> bool:
    """The pod's ``Ready`` condition is True."""
    conditions = _list(_mapping(pod.get("status")).get("conditions"))
    return any(_mapping(c).get("type") == "Ready" and _mapping(c).get("status") == "True"
               for c in conditions)


def live(pod: Mapping[str, Any]) -> bool:
    """Counts for the decision: not being deleted and not ended (``Succeeded``/``Failed``:
    an evicted pod, which its ReplicaSet has replaced)."""
    if _mapping(pod.get("metadata")).get("deletionTimestamp"):
        return False
    return _mapping(pod.get("status")).get("phase") not in ("Succeeded", "Failed")


def pod_failure(pod: Mapping[str, Any]) -> str | None:
    """Why ``pod`` cannot become ready (the most important kind of its failing
    containers), or None when it is ready or may still become ready."""
    if pod_ready(pod):
        return None
    status = _mapping(pod.get("status"))
    found = [kind for field, init in (("initContainerStatuses", True),
                                      ("containerStatuses", False))
             for c in _list(status.get(field))
             if (kind := container_failure(_mapping(c), init=init)) is not None]
    return min(found, key=PRIORITY.index) if found else None


def start_failure(pods: Iterable[Mapping[str, Any]],
                  retry_after_s: float = RETRY_AFTER_S) -> StartFailure | None:
    """Whether the variant whose pods are ``pods`` failed its latest start (PURE).

    None when a pod is Ready, when a live pod may still become ready, or when there is
    no live pod (the scale-up has not made one yet): the gateway keeps holding then.
    """
    kinds: list[str] = []
    for pod in pods:
        if not live(pod):
            continue
        if pod_ready(pod):
            return None
        kind = pod_failure(pod)
        if kind is None:
            return None  # still starting: it may yet become ready
        kinds.append(kind)
    if not kinds:
        return None
    return StartFailure(min(kinds, key=PRIORITY.index), retry_after_s)


def start_failed_answer(failure: StartFailure, namespace: str, endpoint: str,
                        variant: str) -> StartFailed:
    """The body of the scaler's 503 to a scale request for the variant (PURE): the kind
    of failure and where a person finds the rest, never a pod's own words."""
    return StartFailed(
        message=(f"Variant {variant[:63]} of Endpoint {namespace[:63]}/{endpoint[:63]}: its "
                 f"latest start failed ({failure.what}) and no pod is ready; Kubernetes keeps "
                 "restarting it and the scaler keeps it scaled up: kubectl describe pods -n "
                 f"{namespace[:63]} -l {LABEL_ENDPOINT}={endpoint[:63]},"
                 f"{LABEL_VARIANT}={variant[:63]} says why, then fix the variant"),
        start_failed=failure.what, retry_after_s=failure.retry_after_s)
