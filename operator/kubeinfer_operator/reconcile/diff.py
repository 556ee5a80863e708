"""Desired children vs the children that exist: what to create, patch and delete. PURE.

State-based and idempotent: the same desired and actual objects always give
the same plan, and a second run after applying it gives an empty plan. A child
is patched only when its ``kubeinfer.io/applied-hash`` annotation differs from
the desired manifest's (never by comparing whole objects: the API server adds
defaults and normalises quantities, which would look like drift forever).

Only objects owned by this Endpoint (an ownerReference carrying its uid) are
ever patched or deleted. An object with a wanted name but another owner is a
conflict: reported, never overwritten.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from kubeinfer_operator.render import k8s_meta as meta


@dataclass(frozen=True)
class ObjectKey:
    kind: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind} {self.name}"


def key_of(obj: dict[str, Any]) -> ObjectKey:
    return ObjectKey(str(obj.get("kind", "")), str((obj.get("metadata") or {}).get("name", "")))


def owned_by(obj: dict[str, Any], uid: str) -> bool:
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return any(isinstance(r, dict) and r.get("uid") == uid for r in refs)


@dataclass(frozen=True)
class Changes:
    create: list[dict[str, Any]] = field(default_factory=list)
    patch: list[dict[str, Any]] = field(default_factory=list)
    delete: list[ObjectKey] = field(default_factory=list)
    #: Human-readable reasons some desired objects cannot be applied.
    conflicts: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.create or self.patch or self.delete or self.conflicts)


def conflict_message(obj: dict[str, Any], namespace: str, endpoint: str) -> str:
    k = key_of(obj)
    return (f"{k.kind} {namespace}/{k.name} already exists and is not owned by Endpoint "
            f"{endpoint}; delete or rename it, or rename the Endpoint")


def diff_children(desired: Iterable[dict[str, Any]], actual: Iterable[dict[str, Any]], *,
                  owner_uid: str, owner_name: str, namespace: str) -> Changes:
    """Plan the writes that turn ``actual`` into ``desired``.

    ``actual`` holds every existing object that may matter: the Endpoint's
    labelled children and any object found under a desired name.
    """
    by_key = {key_of(o): o for o in actual}
    changes = Changes()
    wanted: set[ObjectKey] = set()
    for manifest in desired:
        k = key_of(manifest)
        wanted.add(k)
        existing = by_key.get(k)
        if existing is None:
            changes.create.append(manifest)
        elif not owned_by(existing, owner_uid):
            changes.conflicts.append(conflict_message(existing, namespace, owner_name))
        elif meta.applied_hash(existing) != meta.applied_hash(manifest):
            changes.patch.append(manifest)
    for k, existing in sorted(by_key.items(), key=lambda kv: (kv[0].kind, kv[0].name)):
        if k not in wanted and owned_by(existing, owner_uid):
            changes.delete.append(k)
    return changes
