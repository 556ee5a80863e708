"""This replica's place among its peers: reads kopf's peering object (I/O).

The operator's scaler answers gateways over HTTP outside kopf's handlers, so
kopf's pause of a standby replica does not stop it. ``Peering.active`` reads
the same KopfPeering / ClusterKopfPeering object kopf's peering uses and applies
``reconcile.leadership``; the answer is cached for a second, so a burst of scale
requests costs one GET.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from urllib.parse import quote

from kubeinfer_operator.errors import ClusterError
from kubeinfer_operator.k8s.client import KubeClient
from kubeinfer_operator.reconcile.leadership import is_active

#: How long one reading of the peering object answers ``active``, seconds.
CACHE_S = 1.0


class Peering:
    """Who this replica is among the replicas sharing the peering object ``name``."""

    def __init__(self, kube: KubeClient | None, *, name: str, identity: str, priority: int,
                 clusterwide: bool, clock: Callable[[], float] = time.monotonic) -> None:
        self.kube = kube
        self.name = name
        self.identity = identity
        self.priority = priority
        self.clusterwide = clusterwide
        self._clock = clock
        self._cache: dict[str, tuple[float, bool]] = {}

    def _path(self, namespace: str) -> str:
        if self.clusterwide:
            return f"/apis/kopf.dev/v1/clusterkopfpeerings/{quote(self.name, safe='')}"
        return (f"/apis/kopf.dev/v1/namespaces/{quote(namespace, safe='')}/kopfpeerings/"
                f"{quote(self.name, safe='')}")

    async def active(self, namespace: str) -> bool:
        """Whether this replica acts for ``namespace`` now (True without peering).

        When the peering object cannot be read this replica says it is active: a
        wrong "standby" would leave held requests waiting for nobody, while two
        replicas scaling the same Deployment up converge on the same replicas.
        """
        if self.kube is None:
            return True
        key = "" if self.clusterwide else namespace
        now = self._clock()
        cached = self._cache.get(key)
        if cached is not None and now - cached[0] < CACHE_S:
            return cached[1]
        try:
            body = await self.kube.get_path(self._path(namespace))
        except ClusterError:
            return True
        status = body.get("status") if isinstance(body, dict) else None
        answer = is_active(status if isinstance(status, dict) else None, self.identity,
                           self.priority, datetime.now(UTC))
        self._cache[key] = (now, answer)
        return answer
