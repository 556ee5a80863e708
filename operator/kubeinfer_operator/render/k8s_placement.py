"""Placement, identity and sizing of the pods the operator renders: PURE.

* ``effective_template``: an object's ``podTemplate`` over the operator's default
  (``api.placement.merge_pod_templates``).
* ``apply_pod_template``: that template on a pod template's metadata and spec. The
  operator's labels and annotations always win (its selectors and roll hashes
  never change; the API model refuses those keys anyway), a spread constraint
  without ``labelSelector`` counts the pods of its own workload, and every pod
  has ``automountServiceAccountToken: false``, ``serviceAccountName`` or not. No
  pod the operator renders calls the Kubernetes API (only the operator does, with
  its own ServiceAccount), and they run tenants' images and handlers: a chosen
  ServiceAccount lends its cloud workload identity (IRSA and EKS Pod Identity
  project their own audience-bound token; GKE Workload Identity needs none), never
  its API rights.
* ``complete_resources``: every container gets cpu and memory requests and a
  memory limit: what the spec leaves out is filled in as Kubernetes itself would
  (a limit without a request: the request is the limit) or from the defaults,
  never with a limit below its request.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from kubeinfer_operator.api.placement import merge_pod_templates
from kubeinfer_operator.reconcile.quantity import parse_quantity

#: Pod spec fields a ``podTemplate`` sets, with their names in the pod spec (the same).
POD_SPEC_FIELDS = ("nodeSelector", "tolerations", "affinity", "topologySpreadConstraints",
                   "priorityClassName", "serviceAccountName", "imagePullSecrets")


def effective_template(default: Mapping[str, Any] | None,
                       own: Mapping[str, Any] | None) -> dict[str, Any]:
    """The template a workload's pods get: ``own`` over the operator's ``default``."""
    return merge_pod_templates(dict(default or {}), dict(own or {}))


def apply_pod_template(template: dict[str, Any], pod_template: Mapping[str, Any],
                       selector: Mapping[str, str]) -> dict[str, Any]:
    """``template`` (a pod template: ``{metadata, spec}``) with ``pod_template`` applied,
    and no API token mounted.

    ``selector``: the workload's pod selector, for spread constraints that name none.
    """
    out = copy.deepcopy(template)
    metadata = out.setdefault("metadata", {})
    spec = out["spec"]
    for name in ("labels", "annotations"):
        extra = pod_template.get(name) or {}
        if extra:
            metadata[name] = {**extra, **(metadata.get(name) or {})}
    for name in POD_SPEC_FIELDS:
        value = pod_template.get(name)
        if value in (None, [], {}):
            continue
        value = copy.deepcopy(value)
        if name == "topologySpreadConstraints":
            value = [c if c.get("labelSelector") else {**c, "labelSelector": {
                "matchLabels": dict(selector)}} for c in value]
        spec[name] = value
    spec["automountServiceAccountToken"] = False
    return out


def _larger(a: str, b: str) -> str:
    qa, qb = parse_quantity(a), parse_quantity(b)
    if qa is None or qb is None:
        return a
    return a if qa >= qb else b


def complete_resources(requests: Mapping[str, str], limits: Mapping[str, str], *,
                       cpu: str, memory: str, memory_limit: str) -> dict[str, Any]:
    """``requests``/``limits`` with cpu and memory requests and a memory limit filled in.

    A missing request takes the limit of the same resource (Kubernetes' own
    default) or else the default; a missing memory limit is the default limit
    or the memory request, whichever is larger.
    """
    req = dict(requests)
    lim = dict(limits)
    req.setdefault("cpu", lim.get("cpu", cpu))
    req.setdefault("memory", lim.get("memory", memory))
    lim.setdefault("memory", _larger(memory_limit, req["memory"]))
    return {"requests": req, "limits": lim}
