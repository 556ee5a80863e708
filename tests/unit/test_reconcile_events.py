"""Which Normal Events a reconcile posts (reconcile.events): decided from old status, new
status and the changes applied, never repeated by a refresh that changes nothing."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from kubeinfer_operator.reconcile.cluster_scaling import (
    POLICY_ASYNC_BACKLOG,
    ScaleChange,
    scale_direction,
    scaling_event,
)
from kubeinfer_operator.reconcile.diff import Changes, ObjectKey
from kubeinfer_operator.reconcile.events import (
    NORMAL,
    WARNING,
    EndpointEventMemory,
    EventSpec,
    describe_changes,
    endpoint_events,
    event_manifest,
    job_events,
)

NOW = datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC)


def _ready(gen: int, ok: bool, message: str = "Gateway and 2/2 variants rolled out") -> dict[
        str, Any]:
    return {"type": "Ready", "status": "True" if ok else "False",
            "reason": "AllVariantsReady" if ok else "VariantsUnavailable",
            "message": message, "observedGeneration": gen,
            "lastTransitionTime": "2025-01-01T00:00:00Z"}


def status(gen: int, ready: bool, variants: tuple[str, ...] = ("primary", "canary"),
           ) -> dict[str, Any]:
    return {"observedGeneration": gen, "url": "http://iris-gateway.ns.svc:8080",
            "variants": [{"name": v} for v in variants], "conditions": [_ready(gen, ready)]}


def dep(name: str) -> dict[str, Any]:
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name}}


def cm(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}}


def reasons(events: tuple[EventSpec, ...]) -> list[str]:
    return [e.reason for e in events]


FIRST = Changes(create=[cm("iris-routes"), dep("iris-gateway"), dep("iris-primary"),
                        dep("iris-canary")])


def test_first_reconcile_posts_created() -> None:
    out = endpoint_events("iris", {}, status(1, False), FIRST, announced=None)
    assert reasons(out.events) == ["Created"]
    assert out.events[0].type == NORMAL
    assert out.events[0].message == "Created the gateway and variants primary, canary for " \
                                    "generation 1"
    assert out.announced is None


def test_created_after_a_failed_first_try_too() -> None:
    # A first reconcile that failed wrote conditions only (no url): still "never set up".
    failed = {"observedGeneration": 1, "conditions": [_ready(1, False)]}
    out = endpoint_events("iris", failed, status(1, False), Changes(), announced=None)
    assert reasons(out.events) == ["Created"]


def test_ready_at_a_generation_posts_rollout_complete_once() -> None:
    memory = EndpointEventMemory()
    assert reasons(memory.decide("ns", "iris", {}, status(1, False), FIRST)) == ["Created"]
    done = memory.decide("ns", "iris", status(1, False), status(1, True), Changes())
    assert reasons(done) == ["RolloutComplete"]
    assert done[0].message == "Generation 1 rolled out: Gateway and 2/2 variants rolled out"
    # The next refreshes change nothing: nothing is posted.
    assert memory.decide("ns", "iris", status(1, True), status(1, True), Changes()) == ()
    # Pods come and go at the same generation: Ready flaps, no second announcement.
    assert memory.decide("ns", "iris", status(1, True), status(1, False), Changes()) == ()
    assert memory.decide("ns", "iris", status(1, False), status(1, True), Changes()) == ()


def test_nothing_changed_posts_nothing() -> None:
    for ready in (False, True):
        out = endpoint_events("iris", status(3, ready), status(3, ready), Changes(),
                              announced=3 if ready else None)
        assert out.events == ()


def test_a_restart_does_not_announce_again() -> None:
    # No memory (a new operator process), and the status is already Ready: announced.
    memory = EndpointEventMemory()
    assert memory.decide("ns", "iris", status(2, True), status(2, True), Changes()) == ()
    assert memory.decide("ns", "iris", status(2, True), status(2, False), Changes()) == ()
    assert memory.decide("ns", "iris", status(2, False), status(2, True), Changes()) == ()


def test_a_new_generation_posts_updated_then_rollout_complete() -> None:
    memory = EndpointEventMemory()
    memory.decide("ns", "iris", status(3, True), status(3, True), Changes())
    changes = Changes(patch=[dep("iris-primary"), dep("iris-canary"), cm("iris-routes")])
    updated = memory.decide("ns", "iris", status(3, True), status(4, False), changes)
    assert reasons(updated) == ["Updated"]
    assert updated[0].message == ("Generation 4 applied: variants canary, primary rolling to "
                                  "generation 4; ConfigMap updated")
    assert memory.decide("ns", "iris", status(4, False), status(4, False), Changes()) == ()
    assert reasons(memory.decide("ns", "iris", status(4, False), status(4, True),
                                 Changes())) == ["RolloutComplete"]


def test_a_generation_ready_at_once_posts_both() -> None:
    out = endpoint_events("iris", status(4, True), status(5, True),
                          Changes(patch=[cm("iris-routes")]), announced=4)
    assert reasons(out.events) == ["Updated", "RolloutComplete"]
    assert out.announced == 5


def test_forget_drops_the_memory() -> None:
    memory = EndpointEventMemory()
    memory.decide("ns", "iris", status(1, False), status(1, True), Changes())
    memory.forget("ns", "iris")
    # A namesake created later starts from scratch.
    assert reasons(memory.decide("ns", "iris", {}, status(1, True), FIRST)) == [
        "Created", "RolloutComplete"]


def test_describe_changes_names_variants_gateway_and_removals() -> None:
    changes = Changes(create=[dep("iris-shadow")], patch=[dep("iris-gateway")],
                      delete=[ObjectKey("Deployment", "iris-canary"),
                              ObjectKey("Service", "iris-canary")])
    text = describe_changes("iris", changes, ["primary", "canary", "shadow"], 7)
    assert text == ("Generation 7 applied: variant shadow rolling to generation 7; variant "
                    "canary removed; gateway rolling; Service updated")
    assert describe_changes("iris", Changes(), ["primary"], 2) == (
        "Generation 2 applied: no child object changed")


def _job(phase: str, *conditions: tuple[str, str, str]) -> dict[str, Any]:
    return {"phase": phase, "conditions": [
        {"type": t, "status": s, "reason": r, "message": f"{t} {r}"} for t, s, r in conditions]}


def test_job_started_completed_failed_once_each() -> None:
    pending = _job("Pending")
    planning = _job("Planning", ("Running", "True", "Planning"))
    running = _job("Running", ("Running", "True", "Running"))
    complete = _job("Complete", ("Running", "False", "Completed"),
                    ("Complete", "True", "Completed"))
    started = job_events("TransformJob", pending, planning)
    assert reasons(started) == ["Started"]
    assert started[0].message == "TransformJob started (Planning): Running Planning"
    assert job_events("TransformJob", {}, planning) == started
    assert job_events("TransformJob", planning, running) == ()  # a later phase: no event
    assert job_events("TransformJob", running, running) == ()
    done = job_events("TransformJob", running, complete)
    assert reasons(done) == ["Completed"] and done[0].type == NORMAL
    assert job_events("TransformJob", complete, complete) == ()
    failed = _job("Failed", ("Running", "False", "DeadlineExceeded"),
                  ("Failed", "True", "DeadlineExceeded"))
    out = job_events("CompilationJob", running, failed)
    assert reasons(out) == ["Failed"] and out[0].type == WARNING
    assert out[0].message == "CompilationJob failed (DeadlineExceeded): Failed DeadlineExceeded"
    assert job_events("CompilationJob", failed, failed) == ()


def test_event_manifest_and_the_scaling_event() -> None:
    event = event_manifest(api_version="kubeinfer.io/v1alpha1", kind="TransformJob",
                           namespace="ns", name="batch", uid="u1",
                           event=EventSpec("Started", "x" * 2000), now=NOW)
    assert event["involvedObject"] == {"apiVersion": "kubeinfer.io/v1alpha1",
                                       "kind": "TransformJob", "name": "batch",
                                       "namespace": "ns", "uid": "u1"}
    assert event["metadata"] == {"generateName": "batch.", "namespace": "ns"}
    assert len(event["message"]) == 1024 and event["type"] == "Normal"
    assert event["firstTimestamp"] == event["lastTimestamp"] == "2025-03-04T05:06:07Z"
    scaled = scaling_event("ns", "iris", "u2", "Variant a: Scaled out from 1 to 2", NOW)
    assert scaled["reason"] == "Scaled" and scaled["involvedObject"]["kind"] == "Endpoint"
    assert scaled["source"] == {"component": "kubeinfer-operator"}


def test_scale_direction() -> None:
    assert scale_direction(0, 1) == "from_zero"
    assert scale_direction(2, 0) == "to_zero"
    assert scale_direction(1, 3) == "up"
    assert scale_direction(3, 1) == "down"
    assert ScaleChange("up", POLICY_ASYNC_BACKLOG).policy == "async_backlog"
