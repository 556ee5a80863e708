"""An Endpoint plan with its variants' rollouts applied: fleets as routes. PURE.

``expand_plan`` turns each variant under a rollout (``reconcile.rollout.Decision``)
into its fleets: one ``VariantPlan`` per slot, named for the slot (``v``,
``v-green``), weighted by its share of the variant's weight, with the replicas
the rollout decided, and ``production_variant`` naming the variant (what the
gateway answers in ``x-Amzn-Invoked-Production-Variant`` and matches
``TargetVariant`` against). Everything downstream (Deployments, Services, PDBs, route
table, network policies) is then rendered per fleet by the usual code.
``keep_live`` puts back the live Deployment of a blue fleet the rollout keeps
(it runs the old spec, which the current plan no longer describes), changing
only its replicas. A variant with no rollout, and every shadow variant, is left
exactly as it was (shadows are never rolled out: they take no production traffic).
While a step bakes under a ``disagreement`` alarm, the plan also carries the
mirrors between the two fleets (``reconcile.rollout_alarms.mirrors``).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from kubeinfer_operator.api.deployment_config import DeploymentConfig
from kubeinfer_operator.reconcile.rollout import Decision
from kubeinfer_operator.reconcile.rollout_alarms import mirrors
from kubeinfer_operator.render import k8s_meta as meta
from kubeinfer_operator.render import k8s_workloads as w
from kubeinfer_operator.render.k8s_workloads import Owner
from kubeinfer_operator.render.plan import EndpointPlan, VariantPlan
from kubeinfer_operator.settings import OperatorSettings


def _trivial(variant: str, decision: Decision | None) -> bool:
    return decision is None or (list(decision.fleets) == [variant]
                                and not decision.fleets[variant].keep)


def expand_plan(plan: EndpointPlan, decisions: Mapping[str, Decision],
                config: DeploymentConfig | None = None) -> EndpointPlan:
    """``plan`` with each rolling-out variant as its fleets (``config``: the Endpoint's
    deploymentConfig, for the mirrors of a disagreement alarm)."""
    variants: list[VariantPlan] = []
    mirrored = list(plan.mirrors)
    for v in plan.variants:
        decision = decisions.get(v.name)
        if v.shadow_sampling is not None or decision is None or _trivial(v.name, decision):
            variants.append(v)
            continue
        for fleet, fp in decision.fleets.items():
            variants.append(replace(v, name=fleet, weight=v.weight * decision.weights.get(
                fleet, 0.0), replicas=fp.replicas, production_variant=v.name))
        mirrored += [m for m in mirrors(config, decision.state) if m.peer in decision.fleets
                     and m.source in decision.fleets]
    return replace(plan, variants=tuple(variants), mirrors=tuple(mirrored))


def kept_fleets(decisions: Mapping[str, Decision]) -> dict[str, int]:
    """Slot -> replicas of the fleets whose live Deployment is kept as it is."""
    return {fleet: fp.replicas for d in decisions.values()
            for fleet, fp in d.fleets.items() if fp.keep}


def keep_live(manifests: list[dict[str, Any]], endpoint: str, kept: Mapping[str, int],
              live: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``manifests`` with each kept fleet's Deployment replaced by its live one."""
    wanted = {meta.variant_object_name(endpoint, f): n for f, n in kept.items()}
    out = []
    for m in manifests:
        name = m["metadata"]["name"]
        if m["kind"] == "Deployment" and name in wanted and name in live:
            obj = live[name]
            metadata = {k: copy.deepcopy(obj["metadata"][k])
                        for k in ("name", "namespace", "labels", "annotations",
                                  "ownerReferences") if k in obj["metadata"]}
            spec = copy.deepcopy(obj["spec"])
            spec["replicas"] = wanted[name]
            m = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": metadata,
                 "spec": spec}
        out.append(m)
    return out


def gateway_pods_for_alarms(config: DeploymentConfig | None, plan: EndpointPlan,
                            desired: list[dict[str, Any]], owner: Owner,
                            settings: OperatorSettings) -> list[dict[str, Any]]:
    """The headless gateway-pods Service (``k8s_workloads.gateway_pods_service``), when
    alarms scrape the gateways and nothing else rendered it."""
    if config is None or not any(a.promQL is None for a in config.alarms):
        return []
    name = meta.gateway_pods_name(plan.name)
    if any(m["kind"] == "Service" and m["metadata"]["name"] == name for m in desired):
        return []
    return [meta.with_applied_hash(w.gateway_pods_service(owner, settings))]
