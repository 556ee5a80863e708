"""Posting the Events the pure decisions chose (``reconcile.events``): best effort.

An Event that cannot be posted is logged and dropped: a reconcile never fails, and
is never retried, for want of one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import datetime

from kubeinfer_operator.errors import KubeinferError
from kubeinfer_operator.k8s.client import KubeClient
from kubeinfer_operator.k8s.kinds import Kind
from kubeinfer_operator.reconcile.events import EventSpec, event_manifest

log = logging.getLogger(__name__)


async def post_events(kube: KubeClient, kind: Kind, namespace: str, name: str, uid: str,
                      events: Iterable[EventSpec], now: datetime) -> None:
    """Create one core/v1 Event per ``events`` on the object ``kind`` ``namespace/name``."""
    for event in events:
        try:
            await kube.create(event_manifest(api_version=kind.api_version, kind=kind.kind,
                                             namespace=namespace, name=name, uid=uid,
                                             event=event, now=now))
        except KubeinferError as exc:  # transient, or refused: either way, not posted
            log.warning("Could not post the %s Event of %s %s/%s: %s", event.reason,
                        kind.kind, namespace, name, exc)
