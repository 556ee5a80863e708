"""PodDisruptionBudgets of an Endpoint's Deployments: PURE.

A gateway or variant Deployment that runs (or may be scaled to) two replicas or
more gets a ``policy/v1`` PodDisruptionBudget named like it, selecting its pods
with its own selector, ``maxUnavailable: 1``: a node drain or a cluster upgrade
evicts its pods one at a time, so it keeps serving. A single replica gets none:
a budget cannot keep one pod serving through a drain, and one that forbade the
eviction would block the drain. Variants whose replicas a scaler owns
(autoscaling, ``async.scaling``) are judged by their maximum, so the
budget does not come and go as they scale.
"""

from __future__ import annotations

from typing import Any

from kubeinfer_operator.render import k8s_meta as meta
from kubeinfer_operator.render.k8s_workloads import Owner, object_metadata
from kubeinfer_operator.render.plan import EndpointPlan, VariantPlan


def variant_wants_budget(plan: EndpointPlan, variant: VariantPlan) -> bool:
    """Whether ``variant`` runs, or may be scaled to, two replicas or more."""
    if variant.replicas >= 2:
        return True
    if variant.autoscaling is not None:
        return variant.autoscaling.max_replicas >= 2
    # Serverless variants without autoscaling run at most max(1, provisioned) replicas.
    return plan.async_config is not None and plan.async_config.policy.max_replicas >= 2


def pod_disruption_budget(owner: Owner, name: str, component: str,
                          variant: str | None) -> dict[str, Any]:
    """The budget of the Deployment ``name`` (same name, same selector)."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": object_metadata(owner, name, component, variant),
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": meta.pod_selector(owner.name, component, variant)},
        },
    }


def disruption_budgets(plan: EndpointPlan, owner: Owner,
                       gateway_replicas: int) -> list[dict[str, Any]]:
    """The budgets of the Endpoint's Deployments that need one."""
    out = [pod_disruption_budget(owner, meta.variant_object_name(owner.name, v.name),
                                 meta.COMPONENT_MODEL_SERVER, v.name)
           for v in plan.variants if variant_wants_budget(plan, v)]
    if gateway_replicas >= 2:
        out.append(pod_disruption_budget(owner, meta.gateway_name(owner.name),
                                         meta.COMPONENT_GATEWAY, None))
    return out
