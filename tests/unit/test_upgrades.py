"""Staged runtime upgrades: the pure decisions (reconcile.upgrades)."""

from __future__ import annotations

from typing import Any

from kubeinfer_operator.reconcile.upgrades import UpgradeSlots, hold_images, image_drift

MANAGED = frozenset({"rt:2", "cc:2"})


def deployment(name: str, image: str, init: str | None = None,
               replicas: int = 1) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": [{"name": "server", "image": image}]}
    if init:
        spec["initContainers"] = [{"name": "compile", "image": init}]
    return {"kind": "Deployment", "metadata": {"name": name},
            "spec": {"replicas": replicas, "template": {"spec": spec}}}


def test_drift_only_for_operator_managed_images_of_existing_deployments() -> None:
    live = [deployment("a", "rt:1"), deployment("b", "user:1")]
    assert image_drift([deployment("a", "rt:2")], live, MANAGED)
    assert not image_drift([deployment("a", "rt:1")], live, MANAGED)
    # A user's own image changing is a spec change, never held.
    assert not image_drift([deployment("b", "user:2")], live, MANAGED)
    # A new Deployment rolls nothing.
    assert not image_drift([deployment("new", "rt:2")], live, MANAGED)
    # The compile init container counts too.
    assert image_drift([deployment("a", "rt:1", init="cc:2")],
                       [deployment("a", "rt:1", init="cc:1")], MANAGED)


def test_hold_keeps_live_images_and_every_other_change() -> None:
    live = [deployment("a", "rt:1", init="cc:1")]
    desired = [deployment("a", "rt:2", init="cc:2", replicas=3), deployment("new", "rt:2"),
               {"kind": "Service", "metadata": {"name": "a"}}]
    held = hold_images(desired, live, MANAGED)
    pod = held[0]["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == "rt:1"
    assert pod["initContainers"][0]["image"] == "cc:1"
    assert held[0]["spec"]["replicas"] == 3
    assert held[1]["spec"]["template"]["spec"]["containers"][0]["image"] == "rt:2"
    assert held[2] == desired[2]
    assert desired[0]["spec"]["template"]["spec"]["containers"][0]["image"] == "rt:2"


def test_slots_admit_up_to_the_limit_and_wake_waiters_when_one_frees() -> None:
    slots = UpgradeSlots(2)
    assert slots.admit(("n", "a")) and slots.admit(("n", "b"))
    assert slots.admit(("n", "a"))  # holding a slot already
    assert not slots.admit(("n", "c")) and not slots.admit(("n", "d"))
    assert slots.finish(("n", "c")) == []  # a waiter that went away frees nothing
    assert slots.finish(("n", "a")) == [("n", "d")]
    assert slots.admit(("n", "d"))
    assert slots.rolling == {("n", "b"), ("n", "d")}


def test_no_limit_admits_everyone() -> None:
    slots = UpgradeSlots(0)
    assert all(slots.admit(("n", str(i))) for i in range(10))
    assert slots.rolling == set()


def test_an_endpoint_that_is_not_serving_rolls_without_taking_a_slot() -> None:
    # A tenant's Endpoints that never become Ready must not hold the slots forever.
    slots = UpgradeSlots(2)
    assert all(slots.admit(("t", str(i)), serving=False) for i in range(5))
    assert slots.rolling == set()
    assert slots.admit(("n", "a")) and slots.admit(("n", "b"))
    assert not slots.admit(("n", "c"))
    # A waiter that stops serving rolls at once (it has no traffic to lose) ...
    assert slots.admit(("n", "c"), serving=False) and slots.waiting == set()
    # ... while one holding a slot keeps it until it finishes.
    assert slots.admit(("n", "a"), serving=False) and ("n", "a") in slots.rolling
