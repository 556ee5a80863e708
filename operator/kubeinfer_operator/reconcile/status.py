"""An Endpoint's status from what its Deployments report: PURE (the clock is an argument).

Readiness has one definition used everywhere: a Deployment is *available*
when ``status.availableReplicas >= 1``. An available variant gets traffic
from the gateway; the Endpoint is Ready when its gateway and every variant
are available. Conditions follow metav1.Condition: ``lastTransitionTime``
changes only when a condition's status flips, so re-running the reconcile on
an unchanged cluster yields an identical status (and no write).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kubeinfer_operator.render import k8s_meta as meta
from kubeinfer_operator.render.plan import EndpointPlan

READY = "Ready"
#: Per-variant condition types are ``VariantReady-<variant>`` (valid metav1
#: condition types; ``kubectl wait --for=condition=VariantReady-canary`` works).
VARIANT_READY_PREFIX = "VariantReady-"

REASON_READY = "AllVariantsReady"
REASON_GATEWAY_UNAVAILABLE = "GatewayUnavailable"
REASON_VARIANTS_UNAVAILABLE = "VariantsUnavailable"
REASON_AVAILABLE = "Available"
REASON_UNAVAILABLE = "Unavailable"
REASON_NAME_CONFLICT = "NameConflict"
REASON_REJECTED = "RejectedByAPI"


def timestamp(now: datetime) -> str:
    """RFC 3339 in UTC, second precision, as Kubernetes writes times."""
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class DeploymentState:
    exists: bool = False
    desired: int = 0
    ready: int = 0
    available: int = 0

    @property
    def serving(self) -> bool:
        return self.available >= 1


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def deployment_state(deployment: Mapping[str, Any] | None) -> DeploymentState:
    if deployment is None:
        return DeploymentState()
    spec = deployment.get("spec") or {}
    status = deployment.get("status") or {}
    desired = spec.get("replicas", 1)
    return DeploymentState(exists=True, desired=_int(desired),
                           ready=_int(status.get("readyReplicas")),
                           available=_int(status.get("availableReplicas")))


def deployments_by_name(objects: Iterable[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    return {str((o.get("metadata") or {}).get("name")): o for o in objects
            if o.get("kind") == "Deployment"}


def serving_variants(plan: EndpointPlan, deployments: Mapping[str, Mapping[str, Any]]) -> set[str]:
    """Variants whose Deployment has an available replica: the only ones the gateway routes to."""
    return {
        v.name for v in plan.variants
        if deployment_state(deployments.get(meta.variant_object_name(plan.name, v.name))).serving
    }


def condition(type_: str, status: bool, reason: str, message: str,
              generation: int) -> dict[str, Any]:
    return {"type": type_, "status": "True" if status else "False", "reason": reason,
            "message": message, "observedGeneration": generation}


def _ours(type_: str) -> bool:
    return type_ == READY or type_.startswith(VARIANT_READY_PREFIX)


def merge_conditions(old: Iterable[Mapping[str, Any]], new: Iterable[dict[str, Any]],
                     now: datetime, *, keep_variants: bool = False) -> list[dict[str, Any]]:
    """``new`` with lastTransitionTime carried over where the status did not flip.

    Conditions other writers own are kept; our per-variant conditions that are
    not in ``new`` are dropped (the variant is gone) unless ``keep_variants``.
    """
    previous = {str(c.get("type")): c for c in old if isinstance(c, Mapping)}
    out: list[dict[str, Any]] = []
    fresh_types = set()
    for fresh in new:
        before = previous.get(fresh["type"])
        same = before is not None and before.get("status") == fresh["status"]
        c = dict(fresh)
        c["lastTransitionTime"] = (str(before.get("lastTransitionTime")) if same and before
                                   else timestamp(now))
        fresh_types.add(c["type"])
        out.append(c)
    for type_, kept in previous.items():
        if type_ in fresh_types:
            continue
        if not _ours(type_) or (keep_variants and type_.startswith(VARIANT_READY_PREFIX)):
            out.append(dict(kept))
    return out


def _variant_condition(plan: EndpointPlan, name: str, state: DeploymentState,
                       generation: int) -> dict[str, Any]:
    dep = f"{plan.namespace}/{meta.variant_object_name(plan.name, name)}"
    counts = f"{state.available}/{state.desired} replicas available"
    if state.serving:
        return condition(VARIANT_READY_PREFIX + name, True, REASON_AVAILABLE,
                         f"Deployment {dep}: {counts}", generation)
    why = counts if state.exists else "not created yet"
    return condition(VARIANT_READY_PREFIX + name, False, REASON_UNAVAILABLE,
                     f"Deployment {dep}: {why}; the gateway does not route to variant {name} "
                     f"until a replica is available (kubectl describe deployment "
                     f"{meta.variant_object_name(plan.name, name)} -n {plan.namespace})",
                     generation)


def endpoint_status(plan: EndpointPlan, deployments: Mapping[str, Mapping[str, Any]], *,
                    url: str, old: Mapping[str, Any] | None, now: datetime) -> dict[str, Any]:
    """The full status of a valid Endpoint whose children have been applied."""
    gen = plan.generation
    states = {v.name: deployment_state(deployments.get(meta.variant_object_name(plan.name, v.name)))
              for v in plan.variants}
    gateway = deployment_state(deployments.get(meta.gateway_name(plan.name)))
    serving = [v.name for v in plan.variants if states[v.name].serving]
    # A variant scaled to zero (serverless, idle) is fine: the gateway holds its requests.
    waiting = [v.name for v in plan.variants if not states[v.name].serving and v.replicas > 0]
    if not gateway.serving:
        gw = meta.gateway_name(plan.name)
        ready = condition(READY, False, REASON_GATEWAY_UNAVAILABLE,
                          f"Deployment {plan.namespace}/{gw} has no available replica yet "
                          f"(kubectl describe deployment {gw} -n {plan.namespace})", gen)
    elif waiting:
        ready = condition(READY, False, REASON_VARIANTS_UNAVAILABLE,
                          f"Variants without an available replica: {', '.join(waiting)}; "
                          "see their VariantReady conditions", gen)
    else:
        ready = condition(READY, True, REASON_READY,
                          f"Gateway and {len(serving)}/{len(plan.variants)} variants available "
                          f"at {url}", gen)
    conditions = [ready] + [_variant_condition(plan, v.name, states[v.name], gen)
                            for v in plan.variants]
    return {
        "observedGeneration": gen,
        "url": url,
        "readyVariants": f"{len(serving)}/{len(plan.variants)}",
        "variants": [{"name": v.name, "desiredReplicas": v.replicas,
                      "readyReplicas": states[v.name].ready, "weight": v.weight}
                     for v in plan.variants],
        "conditions": merge_conditions((old or {}).get("conditions") or [], conditions, now),
    }


def failed_status(generation: int, reason: str, message: str, *,
                  old: Mapping[str, Any] | None, now: datetime) -> dict[str, Any]:
    """Ready=False with ``reason``; what was reported about running children stays."""
    out = {k: v for k, v in (old or {}).items() if k != "conditions"}
    out["observedGeneration"] = generation
    out["conditions"] = merge_conditions((old or {}).get("conditions") or [],
                                         [condition(READY, False, reason, message, generation)],
                                         now, keep_variants=True)
    return out
