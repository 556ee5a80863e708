"""Where the operator reaches the pods it calls over HTTP: read from the API, never DNS (I/O).

The gateway pods it scrapes and the fleet server it polls live in tenants'
namespaces, behind Services a namespace editor may repoint. So the operator
lists the pods by its own labels and takes the addresses their kubelets
reported (``reconcile.pod_addresses`` says which pods qualify and why); it never
resolves a Service's name. One LIST per call, with the operator's existing
``get``/``list`` on pods.

The same LIST of a variant's model-server pods tells the scaler whether the
variant's start failed (``variant_start_failure``; ``reconcile.start_failure``
decides), so a gateway holding requests for it is answered at once.
"""

from __future__ import annotations

from collections.abc import Mapping

from kubeinfer_operator.k8s import kinds
from kubeinfer_operator.k8s.client import KubeClient
from kubeinfer_operator.reconcile.pod_addresses import pod_urls
from kubeinfer_operator.reconcile.start_failure import StartFailure, start_failure
from kubeinfer_operator.render.k8s_meta import COMPONENT_MODEL_SERVER, label_selector, pod_selector


async def ready_pod_urls(kube: KubeClient, namespace: str, selector: Mapping[str, str],
                         port: int) -> list[str]:
    """Base URLs (``http://<pod IP>:<port>``) of the ready pods of ``namespace`` carrying
    ``selector``'s labels. Raises ``ClusterError`` when the API cannot be read."""
    pods = await kube.list(kinds.POD, namespace, label_selector(dict(selector)))
    return pod_urls(pods, selector, port)


async def variant_start_failure(kube: KubeClient, namespace: str, endpoint: str,
                                variant: str) -> StartFailure | None:
    """Whether the latest start of ``endpoint``'s ``variant`` failed, from its model-server
    pods (listed by the operator's labels; ``reconcile.start_failure`` decides). Raises
    ``ClusterError`` when the API cannot be read."""
    selector = pod_selector(endpoint, COMPONENT_MODEL_SERVER, variant)
    return start_failure(await kube.list(kinds.POD, namespace, label_selector(selector)))
