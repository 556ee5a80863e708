"""``kubeinfer promote NAME SHADOW``: the spec edit that makes a shadow production (PURE).

Promoting shadow ``s`` into production variant ``v`` (the only variant, or the
one named) is this edit of the Endpoint's spec, which is also how to do it by
hand:

* copy what ``s`` runs into ``v``: ``model``, ``multiModel``, ``containers``,
  ``inferenceExecution``, ``env`` and ``resources`` (the model-server fields;
  absent ones are removed from ``v``);
* keep what ``v`` is to clients and to the cluster: its ``name`` (clients
  pinning TargetVariant keep working), ``weight``, ``replicas``,
  ``autoscaling``, ``admission`` and ``podTemplate``;
* remove ``s`` from ``spec.shadowVariants``.

So ``v``'s model servers change like any other model update: under a
``deploymentConfig`` that is a guarded blue/green rollout with its alarms,
otherwise a rolling update of ``v``'s Deployment.
"""

from __future__ import annotations

import copy
from typing import Any

#: What a shadow runs that promotion copies into the production variant.
PROMOTED_FIELDS = ("model", "multiModel", "containers", "inferenceExecution", "env",
                   "resources")


class PromoteError(ValueError):
    """The spec cannot be promoted as asked; the message says the fix."""


def promote(spec: dict[str, Any], shadow: str, variant: str | None = None) -> dict[str, Any]:
    """A copy of ``spec`` with shadow ``shadow`` promoted into ``variant`` (default: the
    only production variant)."""
    out = copy.deepcopy(spec)
    shadows = out.get("shadowVariants") or []
    found = [s for s in shadows if isinstance(s, dict) and s.get("name") == shadow]
    if not found:
        names = ", ".join(str(s.get("name")) for s in shadows if isinstance(s, dict))
        raise PromoteError(f"spec.shadowVariants has no shadow {shadow!r} (it has: "
                           f"{names or 'none'}); name one of them")
    variants = out.get("variants") or []
    if variant is None:
        if len(variants) != 1:
            names = ", ".join(str(v.get("name")) for v in variants)
            raise PromoteError(f"the Endpoint has {len(variants)} variants ({names}); say "
                               "which one the shadow replaces with --variant")
        target = variants[0]
    else:
        matches = [v for v in variants if v.get("name") == variant]
        if not matches:
            raise PromoteError(f"spec.variants has no variant {variant!r}; name one of "
                               + ", ".join(str(v.get("name")) for v in variants))
        target = matches[0]
    source = found[0]
    for key in PROMOTED_FIELDS:
        if key in source:
            target[key] = copy.deepcopy(source[key])
        else:
            target.pop(key, None)
    rest = [s for s in shadows if s is not source]
    if rest:
        out["shadowVariants"] = rest
    else:
        out.pop("shadowVariants", None)
    return out
