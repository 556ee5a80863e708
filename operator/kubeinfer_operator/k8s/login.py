"""How the operator logs in to the Kubernetes API (for kopf and for ``KubeClient``).

One login handler serves both, so they always share one identity:

1. in a pod: the ServiceAccount token (``kopf.login_with_service_account``);
2. otherwise the kubeconfig named by ``$KUBECONFIG`` (or ``~/.kube/config``),
   read at login time (``kopf.login_with_kubeconfig``);
3. kubeconfigs whose user authenticates through an exec or auth-provider
   plugin (EKS, GKE, ...) go through the official client, which runs plugins.

kopf calls the handler at start-up and again whenever the API answers 401, so
``KubeClient`` picks up refreshed credentials too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import kopf

from kubeinfer_operator.k8s.client import KubeClient


def _has_credentials(info: kopf.ConnectionInfo) -> bool:
    return bool(info.token or info.username or info.certificate_path or info.certificate_data
                or info.scheme)


def connection_info(**kwargs: Any) -> kopf.ConnectionInfo | None:
    info: kopf.ConnectionInfo | None = kopf.login_with_service_account(**kwargs)
    if info is not None:
        return info
    info = kopf.login_with_kubeconfig(**kwargs)
    if info is not None and not _has_credentials(info) and not info.server.startswith("http:"):
        info = kopf.login_via_client(**kwargs) or info
    return info


def login_handler(client: KubeClient) -> Callable[..., kopf.ConnectionInfo | None]:
    """A kopf ``on.login`` handler that also hands the credentials to ``client``."""

    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        info = connection_info(**kwargs)
        if info is not None:
            client.use(info)
        return info

    return login
