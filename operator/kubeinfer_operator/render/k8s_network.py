"""NetworkPolicies of an Endpoint's pods: PURE.

Model servers (and async workers) answer whoever reaches their port: the
gateway adds authentication, payload limits and routing, and a pod that
bypasses it gets none of that. When ``settings.network_policy`` is on (the
chart's default), each Endpoint gets one policy over its model-server pods:
the inference port accepts only that Endpoint's gateway pods, the metrics port
only the configured scrapers (``settings.metrics_from``; anyone when none are
set, since metrics carry no secret). Gateways stay reachable: they are the
front door and authenticate callers themselves. The operator's scaler is
fenced by the chart's own policy (templates/networkpolicy.yaml).
"""

from __future__ import annotations

from typing import Any

from kubeinfer_operator.render import k8s_meta as meta
from kubeinfer_operator.render.k8s_workloads import (
    METRICS_PORT_NAME,
    PORT_NAME,
    Owner,
    object_metadata,
)
from kubeinfer_operator.render.plan import EndpointPlan
from kubeinfer_operator.settings import OperatorSettings

#: Suffix of the model servers' policy (``<endpoint>-model-servers``).
MODEL_SERVERS_SUFFIX = "model-servers"


def model_servers_policy_name(endpoint: str) -> str:
    return f"{endpoint}-{MODEL_SERVERS_SUFFIX}"


def model_servers_policy(owner: Owner, settings: OperatorSettings) -> dict[str, Any]:
    gateways = {"podSelector": {"matchLabels": meta.pod_selector(owner.name,
                                                                  meta.COMPONENT_GATEWAY)}}
    metrics_rule: dict[str, Any] = {"ports": [{"port": METRICS_PORT_NAME, "protocol": "TCP"}]}
    if settings.metrics_from:
        metrics_rule["from"] = list(settings.metrics_from)
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": object_metadata(owner, model_servers_policy_name(owner.name),
                                    meta.COMPONENT_MODEL_SERVER),
        "spec": {
            "podSelector": {"matchLabels": meta.pod_selector(owner.name,
                                                             meta.COMPONENT_MODEL_SERVER)},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [gateways], "ports": [{"port": PORT_NAME, "protocol": "TCP"}]},
                metrics_rule,
            ],
        },
    }


def network_policies(owner: Owner, plan: EndpointPlan,
                     settings: OperatorSettings) -> list[dict[str, Any]]:
    """Every NetworkPolicy of the Endpoint (``plan`` kept for per-type policies)."""
    del plan  # one policy fits every endpoint type today
    return [model_servers_policy(owner, settings)]
