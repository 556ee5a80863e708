"""``status.shadow`` on Kubernetes: read every gateway pod's shadow metrics (I/O).

A light read, done by the Endpoint's status refresh (every
``status_interval_s``) for Endpoints with ``spec.shadowVariants`` only: the
scaler's pod discovery (the ready gateway pods listed from the API, at their
own IPs: never a Service of the tenant's namespace, see ``k8s.pods``) and its
bounded fetches, then the pure ``reconcile.shadow_status``. A pod that does not
answer in time is left out of this round's totals; a round whose pods cannot be
listed keeps what status says.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from kubeinfer_operator.errors import ClusterError
from kubeinfer_operator.reconcile import shadow_status
from kubeinfer_operator.render.plan import EndpointPlan
from kubeinfer_operator.scaling.cluster import ClusterScaler

log = logging.getLogger(__name__)


def shadow_names(plan: EndpointPlan) -> list[str]:
    return [v.name for v in plan.variants if v.shadow_sampling is not None]


async def read_shadow_status(scaler: ClusterScaler, plan: EndpointPlan,
                             namespace: str) -> list[dict[str, Any]] | None:
    """``status.shadow`` of ``plan`` (empty without shadows; None: no gateway answered)."""
    shadows = shadow_names(plan)
    if not shadows:
        return []
    try:
        urls = await scaler.find_gateways(namespace, plan.name)
    except ClusterError as exc:
        log.warning("Endpoint %s/%s: shadow status not read this round: %s", namespace,
                    plan.name, exc)
        return None

    async def one(url: str) -> dict[str, shadow_status.PeerTotals] | None:
        try:
            text = await asyncio.wait_for(scaler._fetch(url + "/metrics"),
                                          scaler.scrape_timeout_s)
        except TimeoutError:
            text = None
        if text is None:
            return None
        try:
            return shadow_status.parse(text, plan.name)
        except ValueError:
            log.warning("Endpoint %s: gateway %s served unreadable metrics", plan.name, url)
            return None

    views = [v for v in await asyncio.gather(*(one(u) for u in urls)) if v is not None]
    if not views:
        return None  # no gateway answered: keep what status says
    return shadow_status.entries(shadows, shadow_status.add(views))
