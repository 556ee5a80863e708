"""Names, labels, owner references and content hashes of an Endpoint's children: PURE.

Everything that identifies a child object lives here, so the renderer, the
reconciler (which finds children by label) and the Helm chart / e2e tests
(which select pods by label) agree on one naming scheme:

* ``<endpoint>-<variant>``  Deployment + Service of one variant's model servers
* ``<endpoint>-<variant>``  HorizontalPodAutoscaler of a variant scaled on
  CPUUtilization alone (``render.k8s_autoscaling``)
* ``<endpoint>-gateway``    Deployment + Service of the gateway
* ``<endpoint>-gateway-pods`` headless Service over the gateway pods' metrics
  port, for scaled Endpoints (the operator itself lists the gateway pods
  instead of resolving it: ``k8s.pods``)
* ``<endpoint>-routes``     ConfigMap holding the gateway's route table

Every name must be a DNS-1035 label of at most 63 characters (Service names
are); ``reconcile.validate`` refuses Endpoints whose names would break that.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from kubeinfer_operator.api import endpoint as ep

#: Kubernetes' limit on names that become DNS labels (Service names) and label values.
MAX_NAME = 63

# Standard labels (https://kubernetes.io/docs/concepts/overview/working-with-objects/common-labels/).
LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_PART_OF = "app.kubernetes.io/part-of"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
# kubeinfer's own labels: which Endpoint / variant an object belongs to.
LABEL_ENDPOINT = "kubeinfer.io/endpoint"
LABEL_VARIANT = "kubeinfer.io/variant"

APP_NAME = "kubeinfer"
MANAGED_BY = "kubeinfer-operator"

COMPONENT_MODEL_SERVER = "model-server"
COMPONENT_GATEWAY = "gateway"
COMPONENT_ROUTES = "routes"

#: Pod-template annotation: changes exactly when a variant's model servers must roll.
ANNOTATION_SERVER_HASH = "kubeinfer.io/server-hash"
#: Object annotation: hash of the manifest the operator last applied. The
#: reconciler patches a child only when this differs from the desired one, so
#: fields the API server defaults or normalises never cause a patch loop.
ANNOTATION_APPLIED_HASH = "kubeinfer.io/applied-hash"

#: Deployment annotation: the pod annotation keys its ``podTemplate`` set (comma-separated),
#: so the reconciler removes one the spec drops and keeps other writers' (``reconcile.diff``).
ANNOTATION_POD_ANNOTATIONS = "kubeinfer.io/pod-annotations"

#: Suffix of the headless Service over the gateway pods (after ``-gateway``).
GATEWAY_PODS_SUFFIX = "pods"

#: Variant names that would collide with the gateway's object names.
RESERVED_VARIANT_NAMES = frozenset({COMPONENT_GATEWAY,
                                    f"{COMPONENT_GATEWAY}-{GATEWAY_PODS_SUFFIX}"})


def variant_object_name(endpoint: str, variant: str) -> str:
    return f"{endpoint}-{variant}"


def gateway_name(endpoint: str) -> str:
    return f"{endpoint}-{COMPONENT_GATEWAY}"


def gateway_pods_name(endpoint: str) -> str:
    return f"{gateway_name(endpoint)}-{GATEWAY_PODS_SUFFIX}"


def routes_name(endpoint: str) -> str:
    return f"{endpoint}-{COMPONENT_ROUTES}"


def endpoint_selector(endpoint: str) -> dict[str, str]:
    """Labels every child of one Endpoint carries (to list them)."""
    return {LABEL_ENDPOINT: endpoint, LABEL_MANAGED_BY: MANAGED_BY}


def label_selector(labels: dict[str, str]) -> str:
    """``a=b,c=d`` as the API's ``labelSelector`` query parameter wants it."""
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def labels(endpoint: str, component: str, variant: str | None = None) -> dict[str, str]:
    out = {
        LABEL_NAME: APP_NAME,
        LABEL_INSTANCE: endpoint,
        LABEL_COMPONENT: component,
        LABEL_PART_OF: APP_NAME,
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_ENDPOINT: endpoint,
    }
    if variant is not None:
        out[LABEL_VARIANT] = variant
    return out


def pod_selector(endpoint: str, component: str, variant: str | None = None) -> dict[str, str]:
    """The Deployment/Service selector. Immutable on Deployments: only stable labels."""
    out = {LABEL_ENDPOINT: endpoint, LABEL_COMPONENT: component}
    if variant is not None:
        out[LABEL_VARIANT] = variant
    return out


def owner_reference(name: str, uid: str) -> dict[str, Any]:
    """Makes the Endpoint the controller of a child: deleting it garbage-collects the child."""
    return {
        "apiVersion": ep.API_VERSION,
        "kind": ep.KIND,
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def content_hash(obj: Any) -> str:
    """A short stable hash of JSON-able data (key order does not matter)."""
    data = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(data.encode()).hexdigest()[:16]


def with_applied_hash(manifest: dict[str, Any]) -> dict[str, Any]:
    """Stamp ``manifest`` with the hash of its own content (annotation excluded)."""
    meta = manifest.setdefault("metadata", {})
    annotations = meta.setdefault("annotations", {})
    annotations.pop(ANNOTATION_APPLIED_HASH, None)
    annotations[ANNOTATION_APPLIED_HASH] = content_hash(manifest)
    return manifest


def applied_hash(obj: dict[str, Any]) -> str | None:
    value = ((obj.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_APPLIED_HASH)
    return value if isinstance(value, str) else None
