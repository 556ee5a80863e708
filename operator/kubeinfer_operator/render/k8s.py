"""An Endpoint's whole desired state on Kubernetes, as a list of manifests: PURE.

``render_endpoint`` is the single function the operator's handlers call: plan
+ settings + owner + which variants are ready → every child manifest, stamped
with the ``kubeinfer.io/applied-hash`` annotation the reconciler compares.
The route table sends traffic only to variants that are ready (a Deployment
with at least one available replica): the gateway never routes to a variant
that cannot answer. Scaled Endpoints also get a headless Service over their
gateway pods (the scaler scrapes each one) and CPU-only variants an HPA
(``k8s_autoscaling``); Deployments of two replicas or more a PodDisruptionBudget
(``k8s_disruption``).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from kubeinfer_operator.render import k8s_autoscaling as autoscaling
from kubeinfer_operator.render import k8s_compile
from kubeinfer_operator.render import k8s_disruption as disruption
from kubeinfer_operator.render import k8s_meta as meta
from kubeinfer_operator.render import k8s_network as policies
from kubeinfer_operator.render import k8s_secrets as secrets
from kubeinfer_operator.render import k8s_workloads as w
from kubeinfer_operator.render.k8s_workloads import Owner
from kubeinfer_operator.render.plan import EndpointPlan
from kubeinfer_operator.settings import OperatorSettings
from kubeinfer_runtime.contract import RouteTable

__all__ = ["Owner", "endpoint_url", "render_endpoint", "route_table"]


def endpoint_url(owner: Owner, settings: OperatorSettings) -> str:
    """The in-cluster URL of the Endpoint's gateway (reported in status.url)."""
    return w.service_url(meta.gateway_name(owner.name), owner.namespace, settings.runtime_port)


def route_table(plan: EndpointPlan, owner: Owner, settings: OperatorSettings,
                ready_variants: Collection[str]) -> RouteTable:
    """The gateway's routes: each ready variant's Service URL, none for the others.

    Serverless variants are always listed: at zero replicas their headless
    Service resolves to no pod (the gateway holds requests), and the gateway
    finds the first pod through DNS as soon as it is ready, without waiting for
    kubelet to refresh the mounted route table.
    """
    upstreams = {
        v.name: [w.service_url(meta.variant_object_name(owner.name, v.name), owner.namespace,
                               settings.runtime_port)]
        for v in plan.variants
        if v.name in ready_variants or plan.serverless is not None
    }
    return plan.route_table(upstreams, discovery="dns",
                            auth=secrets.resolve_auth(plan.auth, settings).route())


def render_endpoint(plan: EndpointPlan, owner: Owner, settings: OperatorSettings,
                    ready_variants: Collection[str] = (),
                    existing_variants: Collection[str] = ()) -> list[dict[str, Any]]:
    """Every child manifest, in a safe creation order.

    The ConfigMap comes first (gateway pods mount it) and variant objects
    before the gateway (it routes to them). ``existing_variants``: variants
    whose Deployment exists; one an HPA scales is then rendered without
    ``spec.replicas``, so applying it never changes what the HPA set (a new
    one starts with the plan's replicas).
    """
    manifests: list[dict[str, Any]] = [
        w.routes_configmap(owner, route_table(plan, owner, settings, ready_variants))
    ]
    for variant in plan.variants:
        manifests.append(w.model_server_service(owner, variant, settings))
        deployment = k8s_compile.with_compile_step(
            w.model_server_deployment(owner, variant, settings, plan.async_config), variant,
            settings)
        hpa = autoscaling.horizontal_pod_autoscaler(owner, plan, variant)
        if hpa is not None and variant.name in existing_variants:
            del deployment["spec"]["replicas"]
        manifests.append(deployment)
        if hpa is not None:
            manifests.append(hpa)
    manifests.append(w.gateway_service(owner, settings))
    if autoscaling.scrapes_gateway(plan):
        manifests.append(w.gateway_pods_service(owner, settings))
    manifests.append(w.gateway_deployment(owner, settings,
                                          secrets.resolve_auth(plan.auth, settings),
                                          plan.gateway_pod_template,
                                          s3=plan.capture is not None
                                          and plan.capture.destination.startswith("s3://")))
    manifests += disruption.disruption_budgets(plan, owner, settings.gateway_replicas)
    if settings.network_policy:
        manifests += policies.network_policies(owner, plan, settings)
    return [meta.with_applied_hash(m) for m in manifests]
