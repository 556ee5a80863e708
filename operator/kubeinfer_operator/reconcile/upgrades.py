"""Staged runtime upgrades: which Endpoints may roll to a new runtime image now (PURE).

An operator upgrade changes the runtime (and compiler) image of every Deployment
it owns. Applied at once, a bad image takes down every Endpoint in the cluster
within seconds. Instead at most ``limit`` Endpoints roll at a time; each keeps
its slot until its rollout is done (Ready at the new image), so a rollout that
never completes (a crashing image) halts the wave where it stands, as a canary
would. The others keep serving on the old image: their other changes still
apply, only the operator-managed images are held back.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

Key = tuple[str, str]

#: The Event reason on an Endpoint whose new runtime image waits for a slot.
REASON_UPGRADE_QUEUED = "UpgradeQueued"

_POD_CONTAINER_LISTS = ("initContainers", "containers")


def _containers(deployment: dict[str, Any]) -> dict[str, str]:
    """Container name → image of a Deployment's pod template (init containers too)."""
    spec = deployment.get("spec", {}).get("template", {}).get("spec", {})
    out: dict[str, str] = {}
    for field in _POD_CONTAINER_LISTS:
        for container in spec.get(field) or []:
            out[f"{field}/{container.get('name')}"] = str(container.get("image"))
    return out


def _deployments(manifests: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {m["metadata"]["name"]: m for m in manifests if m.get("kind") == "Deployment"}


def image_drift(desired: Iterable[dict[str, Any]], actual: Iterable[dict[str, Any]],
                managed: frozenset[str]) -> bool:
    """Whether applying ``desired`` changes a live container's image to one of the
    operator-managed images (``managed``: the runtime and compiler images).

    A user's own image (a pipeline step's ``image:``) is a spec change, not an
    upgrade, and is never held back; a Deployment not created yet rolls nothing.
    """
    live = _deployments(actual)
    for name, want in _deployments(desired).items():
        have = live.get(name)
        if have is None:
            continue
        have_images = _containers(have)
        for key, image in _containers(want).items():
            if image in managed and key in have_images and have_images[key] != image:
                return True
    return False


def hold_images(desired: list[dict[str, Any]], actual: Iterable[dict[str, Any]],
                managed: frozenset[str]) -> list[dict[str, Any]]:
    """``desired`` with every operator-managed image put back to the live one (same
    Deployment, same container), so everything else in the change still applies."""
    live = _deployments(actual)
    out = []
    for manifest in desired:
        have = live.get(manifest["metadata"]["name"]) if manifest.get("kind") == "Deployment" \
            else None
        if have is None:
            out.append(manifest)
            continue
        have_images = _containers(have)
        held = copy.deepcopy(manifest)
        spec = held.get("spec", {}).get("template", {}).get("spec", {})
        for field in _POD_CONTAINER_LISTS:
            for container in spec.get(field) or []:
                old = have_images.get(f"{field}/{container.get('name')}")
                if old is not None and container.get("image") in managed:
                    container["image"] = old
        out.append(held)
    return out


class UpgradeSlots:
    """Which Endpoints hold one of ``limit`` upgrade slots, and which wait for one.

    In memory: only the active operator replica reconciles, and a replica that takes
    over starts empty and fills the slots again from what it finds.
    """

    def __init__(self, limit: int) -> None:
        #: 0: no limit (every Endpoint rolls at once, as before).
        self.limit = limit
        self.rolling: set[Key] = set()
        self.waiting: set[Key] = set()

    def admit(self, key: Key, *, serving: bool = True) -> bool:
        """Whether ``key`` may roll now; takes a slot when one is free.

        An Endpoint that is not serving (not Ready at its current image) rolls without a
        slot: it has no traffic to lose, and one that never becomes Ready (a model that
        crashes, pods that never schedule: any tenant can have those) would otherwise
        hold its slot forever and stop every other namespace's upgrade with it.
        """
        if self.limit <= 0 or key in self.rolling:
            return True
        if not serving:
            self.waiting.discard(key)
            return True
        if len(self.rolling) < self.limit:
            self.rolling.add(key)
            self.waiting.discard(key)
            return True
        self.waiting.add(key)
        return False

    def finish(self, key: Key) -> list[Key]:
        """``key`` rolled out (or is gone): free its slot; the Endpoints to wake, in a
        stable order, when a slot freed."""
        self.waiting.discard(key)
        if key not in self.rolling:
            return []
        self.rolling.discard(key)
        return sorted(self.waiting)
