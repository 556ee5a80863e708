"""Which scaler scales each variant on Kubernetes, and the HPA it may get: PURE.

The operator's scaler reads the gateway's ``/metrics`` (and Prometheus for
Custom queries) but never reads pods, so it cannot measure CPU. Per metric,
then (issue 6 lets us choose):

* a variant whose ``autoscaling`` is target tracking on ``CPUUtilization``
  and nothing else (no step scaling, no schedule, no other metric, not
  serverless, ``minReplicas`` >= 1) gets an ``autoscaling/v2``
  HorizontalPodAutoscaler, and the operator's scaler leaves it alone: the
  HPA owns the Deployment's ``replicas`` (rendered without them once the
  Deployment exists, so a reconcile never undoes the HPA);
* any other use of ``CPUUtilization`` cannot be carried out on a cluster:
  :func:`autoscaling_problems` says so, with the field and the fix, and the
  Endpoint gets ``Ready=False`` reason ``InvalidSpec`` instead of a policy
  that silently never acts. Local mode measures its processes' CPU and mixes
  freely, which is why this is not a rule of the shared API model.

Our CPUUtilization is percent of ONE core (what local mode measures), not of
the pod's CPU request, so the HPA target is an ``AverageValue`` in millicores
(70 -> ``700m`` per pod), which needs no CPU request either.
"""

from __future__ import annotations

from typing import Any

from kubeinfer_operator.reconcile import autoscale
from kubeinfer_operator.render import k8s_meta as meta
from kubeinfer_operator.render.k8s_workloads import Owner, object_metadata
from kubeinfer_operator.render.plan import EndpointPlan, VariantPlan

CPU = autoscale.Metric.CPU_UTILIZATION
#: The API's bound on behavior.*.stabilizationWindowSeconds.
MAX_STABILIZATION_S = 3600


def hpa_cpu_target(plan: EndpointPlan, variant: VariantPlan) -> float | None:
    """The CPUUtilization target of a variant an HPA scales, or None (our scaler, if any)."""
    policy = variant.autoscaling
    if (policy is None or plan.scales_to_zero(variant) or plan.async_config is not None
            or (plan.guarded and variant.shadow_sampling is None)
            or not policy.target_tracking or policy.step_scaling or policy.scheduled
            or policy.min_replicas < 1
            or any(tt.metric is not CPU for tt in policy.target_tracking)):
        return None
    # Several CPU targets: the largest proposal wins, i.e. the smallest target.
    return min(tt.target for tt in policy.target_tracking)


def hpa_variants(plan: EndpointPlan) -> frozenset[str]:
    return frozenset(v.name for v in plan.variants if hpa_cpu_target(plan, v) is not None)


def scrapes_gateway(plan: EndpointPlan) -> bool:
    """Whether the operator's scaler decides from the gateways' metrics (serverless, or
    a variant scaled by our policies); async endpoints scale on their queue instead."""
    if plan.async_config is not None:
        return False
    return plan.serverless is not None or any(
        v.autoscaling is not None and hpa_cpu_target(plan, v) is None for v in plan.variants)


def cpu_quantity(percent: float) -> str:
    """Percent of one core as a CPU quantity: 70 -> ``700m`` (at least ``1m``)."""
    return f"{max(1, round(percent * 10))}m"


def _window(seconds: float) -> int:
    return min(max(0, round(seconds)), MAX_STABILIZATION_S)


def horizontal_pod_autoscaler(owner: Owner, plan: EndpointPlan,
                              variant: VariantPlan) -> dict[str, Any] | None:
    """The variant's HPA, or None when it does not qualify (see the module docstring).

    Cooldowns map to the HPA's stabilization windows: ``scaleInCooldown`` to
    scale-down's (the HPA then scales down only to the highest recommendation
    of that window, like our flapping protection), ``scaleOutCooldown`` to
    scale-up's (a scale-up needs that long of sustained load). Both are capped
    at the API's 3600 s.
    """
    target = hpa_cpu_target(plan, variant)
    policy = variant.autoscaling
    if target is None or policy is None:
        return None
    name = meta.variant_object_name(owner.name, variant.name)
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": object_metadata(owner, name, meta.COMPONENT_MODEL_SERVER, variant.name),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "minReplicas": policy.min_replicas,
            "maxReplicas": policy.max_replicas,
            "metrics": [{"type": "Resource", "resource": {
                "name": "cpu",
                "target": {"type": "AverageValue", "averageValue": cpu_quantity(target)}}}],
            "behavior": {
                "scaleDown": {"stabilizationWindowSeconds": _window(policy.scale_in_cooldown_s)},
                "scaleUp": {"stabilizationWindowSeconds": _window(policy.scale_out_cooldown_s)},
            },
        },
    }


def hpa_reason(owner_name: str, namespace: str, plan: EndpointPlan,
               variant: VariantPlan) -> str | None:
    """What ``status.variants[].lastScaling`` says of an HPA-scaled variant."""
    target = hpa_cpu_target(plan, variant)
    if target is None:
        return None
    return (f"Scaled by HorizontalPodAutoscaler {namespace}/"
            f"{meta.variant_object_name(owner_name, variant.name)} on CPUUtilization "
            f"(target {target:g}% of one core: {cpu_quantity(target)} per replica); "
            "kubectl describe hpa shows its decisions")


_CPU_FIX = ("use CPUUtilization alone in targetTracking (no stepScaling, scheduled or other "
            "metric, minReplicas 1 or more), which the operator turns into a "
            "HorizontalPodAutoscaler, or a Custom PromQL query over cAdvisor metrics such as "
            "container_cpu_usage_seconds_total")


def _conflicts(plan: EndpointPlan, variant: VariantPlan,
               policy: autoscale.Policy) -> list[str]:
    """What keeps a policy using CPUUtilization from becoming an HPA."""
    out = []
    if plan.scales_to_zero(variant):
        out.append("a Serverless endpoint (an HPA cannot scale to zero)")
    if policy.min_replicas < 1:
        out.append("minReplicas 0 (an HPA cannot scale to zero)")
    if plan.guarded and variant.shadow_sampling is None:
        out.append("deploymentConfig (an HPA scales one Deployment; a guarded rollout moves "
                   "the variant between two)")
    if any(tt.metric is not CPU for tt in policy.target_tracking):
        out.append("other targetTracking metrics")
    if policy.step_scaling:
        out.append("stepScaling")
    if policy.scheduled:
        out.append("scheduled scaling")
    return out


def autoscaling_problems(plan: EndpointPlan) -> list[str]:
    """Why the Endpoint's auto scaling cannot run on Kubernetes as written (empty: it can).

    Each problem names the field (``spec.variants[i].autoscaling...``) and the fix.
    """
    problems: list[str] = []
    for variant in plan.variants:
        policy = variant.autoscaling
        if policy is None or hpa_cpu_target(plan, variant) is not None:
            continue
        path = f"{plan.field_path(variant.name)}.autoscaling"
        conflicts = _conflicts(plan, variant, policy)
        for j, tt in enumerate(policy.target_tracking):
            if tt.metric is CPU:
                problems.append(
                    f"{path}.targetTracking[{j}]: CPUUtilization is measured on Kubernetes by a "
                    f"HorizontalPodAutoscaler, which cannot be combined with "
                    f"{', '.join(conflicts)}; {_CPU_FIX}")
        for j, sp in enumerate(policy.step_scaling):
            if sp.metric is CPU:
                problems.append(
                    f"{path}.stepScaling[{j}]: CPUUtilization step scaling is not available on "
                    f"Kubernetes (a HorizontalPodAutoscaler only tracks a target); {_CPU_FIX}")
    return problems
