"""Desired children vs the children that exist: what to create, patch and delete. PURE.

State-based and idempotent: the same desired and actual objects always give
the same plan, and a second run after applying it gives an empty plan. A child
is patched when its ``kubeinfer.io/applied-hash`` annotation differs from the
desired manifest's (the spec changed), or when what we set no longer holds in
the live object (drift: ``kubectl edit`` of an image, a replica count, a
Service selector, the route table).

Drift is judged on what we own only, so the operator never fights another
writer: every field of the desired manifest must be present and equal in the
live object (a dict may hold more keys: API-server defaults, ``kubectl``
annotations such as ``restartedAt``; lists must match item by item;
quantities compare by value, ``1.5`` = ``1500m``). Fields we leave out are not
ours: ``spec.replicas`` of a variant an HPA scales is never rendered, and a
scaled variant's replicas are rendered as the scaler decided. Two maps are
ours entirely, because an extra key changes what they mean: a ConfigMap's
``data`` (the route table), a Service's ``spec.selector``, a PodDisruptionBudget's
selector and a Deployment's pod labels and nodeSelector; their patches remove
keys we did not set. The placement fields of a Deployment's pods (nodeSelector, tolerations,
affinity, serviceAccountName, ...) are ours too when they are absent: a field
the spec no longer sets is removed (a merge patch of the desired manifest alone
would leave it), and so are the pod annotations a ``podTemplate`` set before
(recorded in the Deployment's ``kubeinfer.io/pod-annotations`` annotation; other
writers' annotations, ``kubectl rollout restart``'s, are kept). A Service's
``externalName`` is ours too, though never set: a Service turned into an
``ExternalName`` is restored to its type with that name removed, not left
pointing somewhere with a stale field.

Only objects owned by this Endpoint (an ownerReference carrying its uid) are
ever patched or deleted. An object with a wanted name but another owner is a
conflict: reported, never overwritten.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from kubeinfer_operator.reconcile.quantity import parse_quantity
from kubeinfer_operator.render import k8s_meta as meta

#: (kind, path) of maps we own whole: a key someone added is drift too.
EXACT_MAPS = {("ConfigMap", ("data",)), ("Service", ("spec", "selector")),
              ("PodDisruptionBudget", ("spec", "selector", "matchLabels")),
              ("Deployment", ("spec", "template", "metadata", "labels")),
              ("Deployment", ("spec", "template", "spec", "nodeSelector"))}
#: Where a Deployment's pod spec is, and the fields of it we own even when we leave
#: them out (placement and identity; ``serviceAccount`` is the deprecated twin the API
#: server fills from ``serviceAccountName`` and back).
POD_SPEC = ("spec", "template", "spec")
OWNED_POD_FIELDS = ("nodeSelector", "tolerations", "affinity", "topologySpreadConstraints",
                    "priorityClassName", "serviceAccountName", "serviceAccount",
                    "imagePullSecrets", "automountServiceAccountToken")
#: Fields of a Service's spec we own though we never set them (where it points).
OWNED_SERVICE_FIELDS = ("externalName",)


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
    #: Children patched back because someone changed what we set.
    drifted: list[ObjectKey] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.create or self.patch or self.delete or self.conflicts)


def conflict_message(obj: dict[str, Any], namespace: str, endpoint: str) -> str:
    k = key_of(obj)
    return (f"{k.kind} {namespace}/{k.name} already exists and is not owned by Endpoint "
            f"{endpoint}; delete or rename it, or rename the Endpoint")


def _same_scalar(want: Any, have: Any) -> bool:
    if want == have:
        return True
    if isinstance(want, str) and isinstance(have, str):
        a, b = parse_quantity(want), parse_quantity(have)
        return a is not None and a == b
    return False


def _holds(want: Any, have: Any) -> bool:
    """Whether every field of ``want`` is in ``have`` with the same value."""
    if isinstance(want, dict):
        return isinstance(have, dict) and all(
            k in have and _holds(v, have[k]) for k, v in want.items())
    if isinstance(want, list):
        return (isinstance(have, list) and len(want) == len(have)
                and all(_holds(w, h) for w, h in zip(want, have, strict=True)))
    return _same_scalar(want, have)


def _at(obj: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        obj = obj.get(part) if isinstance(obj, dict) else None
    return obj


def recorded_keys(obj: dict[str, Any]) -> set[str]:
    """The pod annotation keys a ``podTemplate`` set, as recorded on a Deployment."""
    value = ((obj.get("metadata") or {}).get("annotations") or {}).get(
        meta.ANNOTATION_POD_ANNOTATIONS)
    return {k for k in value.split(",") if k} if isinstance(value, str) else set()


def _removals(desired: dict[str, Any], live: dict[str, Any]) -> dict[tuple[str, ...], list[str]]:
    """Keys of ``live`` we own but no longer want, by the path of the map holding them."""
    extra: dict[tuple[str, ...], list[str]] = {}
    kind = desired.get("kind")
    for exact_kind, path in EXACT_MAPS:
        want, have = _at(desired, path), _at(live, path)
        if exact_kind == kind and isinstance(want, dict) and isinstance(have, dict):
            keys = sorted(k for k in have if k not in want)
            if keys:
                extra[path] = keys
    if kind == "Service":
        have = _at(live, ("spec",))
        if isinstance(have, dict) and (keys := [k for k in OWNED_SERVICE_FIELDS if k in have]):
            extra[("spec",)] = keys
    if kind == "Deployment":
        want, have = _at(desired, POD_SPEC), _at(live, POD_SPEC)
        if isinstance(want, dict) and isinstance(have, dict):
            keys = sorted(k for k in OWNED_POD_FIELDS if k not in want and k in have)
            if keys:
                extra[POD_SPEC] = keys
        path = (*POD_SPEC[:-1], "metadata", "annotations")
        have = _at(live, path)
        stale = recorded_keys(live) - set(_at(desired, path) or {})
        if isinstance(have, dict) and (keys := sorted(k for k in stale if k in have)):
            extra[path] = keys
        if recorded_keys(live) and not recorded_keys(desired):
            extra[("metadata", "annotations")] = [meta.ANNOTATION_POD_ANNOTATIONS]
    return extra


def _with_nulls(desired: dict[str, Any],
                removals: dict[tuple[str, ...], list[str]]) -> dict[str, Any]:
    """``desired`` as a merge patch that also removes the ``removals`` (null values)."""
    if not removals:
        return desired
    patch = copy.deepcopy(desired)
    for path, keys in removals.items():
        target = patch
        for part in path:
            target = target.setdefault(part, {})
        target.update(dict.fromkeys(keys))  # null: a merge patch removes the key
    return patch


def update_patch(desired: dict[str, Any], live: dict[str, Any]) -> dict[str, Any]:
    """The merge patch that makes ``live`` what ``desired`` (a changed spec) says."""
    return _with_nulls(desired, _removals(desired, live))


def drift_patch(desired: dict[str, Any], live: dict[str, Any]) -> dict[str, Any] | None:
    """The merge patch that undoes drift of ``live`` from ``desired``; None if none."""
    extra = _removals(desired, live)
    if not extra and _holds(desired, live):
        return None
    return _with_nulls(desired, extra)


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
            changes.patch.append(update_patch(manifest, existing))
        elif (undo := drift_patch(manifest, existing)) is not None:
            changes.patch.append(undo)
            changes.drifted.append(k)
    for k, existing in sorted(by_key.items(), key=lambda kv: (kv[0].kind, kv[0].name)):
        if k not in wanted and owned_by(existing, owner_uid):
            changes.delete.append(k)
    return changes
