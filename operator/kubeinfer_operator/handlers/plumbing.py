"""The API plumbing that every kind's sync (Endpoint, TransformJob, CompilationJob) shares.

Each sync serialises the calls for one object, writes its status only when it
differs (no write, no event, no resourceVersion churn), and creates its Jobs so
that a namesake's leftover is told apart from its own. The kinds differ in what
they decide, not in how they talk to the API, so that part lives here once.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import weakref
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from kubeinfer_operator.errors import ClusterError, SpecError
from kubeinfer_operator.k8s import kinds
from kubeinfer_operator.k8s.client import AlreadyExists, KubeClient
from kubeinfer_operator.k8s.events import post_events
from kubeinfer_operator.observability import OperatorMetrics
from kubeinfer_operator.reconcile.diff import owned_by
from kubeinfer_operator.reconcile.events import job_events
from kubeinfer_operator.settings import OperatorSettings


class HasStatus(Protocol):
    """A batch kind's decision: the status it writes (its Events follow from it)."""

    @property
    def status(self) -> dict[str, Any]: ...


DecisionT = TypeVar("DecisionT", bound=HasStatus)


async def sync_owner_of(child_labels: Mapping[str, str], owner_label: str, kind: str,
                        namespace: str | None, sync: Callable[[str, str], Awaitable[object]],
                        logger: logging.Logger | logging.LoggerAdapter[Any]) -> None:
    """Re-sync the job resource a child (its Job, a candidate Deployment) belongs to,
    after that child changed. Problems of the spec are in the owner's status already;
    a transient failure is logged and left to the owner's refresh."""
    owner = child_labels.get(owner_label)
    if not owner:
        return
    try:
        await sync(namespace or "", owner)
    except SpecError:
        pass
    except ClusterError as exc:
        logger.warning("Sync of %s %s after a child's event failed: %s; the refresh retries",
                       kind, owner, exc)


def utcnow() -> datetime:
    return datetime.now(UTC)


class ObjectLocks:
    """One ``asyncio.Lock`` per (namespace, name): calls for one object never overlap."""

    def __init__(self) -> None:
        # Weak values: a lock nobody holds or waits on is dropped with its object.
        self._locks: weakref.WeakValueDictionary[tuple[str, str], asyncio.Lock] = (
            weakref.WeakValueDictionary())

    def __call__(self, namespace: str, name: str) -> asyncio.Lock:
        lock = self._locks.get((namespace, name))
        if lock is None:
            lock = asyncio.Lock()
            self._locks[(namespace, name)] = lock
        return lock


async def write_status(kube: KubeClient, kind: kinds.Kind, obj: dict[str, Any],
                       status: dict[str, Any]) -> None:
    """Merge ``status`` into the object's status subresource unless it already says so."""
    old = obj.get("status") or {}
    if all(old.get(k) == v for k, v in status.items()):
        return  # unchanged: no write, no event, no resourceVersion churn
    meta_ = obj["metadata"]
    await kube.merge_patch(kind, meta_["namespace"], meta_["name"],
                           {"status": status}, subresource="status")


async def create_owned_job(kube: KubeClient, manifest: dict[str, Any], uid: str, *,
                           log: logging.Logger,
                           conflict: Callable[[str, str], ClusterError]) -> None:
    """Create a Job; one that exists already is fine if ``uid`` owns it, else
    ``conflict(namespace, name)`` is raised (a deleted namesake's, not collected yet)."""
    namespace = manifest["metadata"]["namespace"]
    name = manifest["metadata"]["name"]
    try:
        await kube.create(manifest)
        log.info("Created Job %s/%s", namespace, name)
    except AlreadyExists:
        existing = await kube.get(kinds.JOB, namespace, name)
        if existing is not None and not owned_by(existing, uid):
            raise conflict(namespace, name) from None


class JobSync(abc.ABC, Generic[DecisionT]):
    """A batch kind's sync (TransformJob, CompilationJob): one call at a time per object,
    nothing to do once it is gone or being deleted (owner references take its Jobs)."""

    #: The kind this sync reconciles.
    kind: ClassVar[kinds.Kind]

    def __init__(self, client: KubeClient, settings: OperatorSettings,
                 clock: Callable[[], datetime] = utcnow,
                 metrics: OperatorMetrics | None = None) -> None:
        self.kube = client
        self.settings = settings
        self.clock = clock
        #: Reconciles counted and timed by kind and result (observability).
        self.metrics = metrics if metrics is not None else OperatorMetrics()
        self._lock = ObjectLocks()

    async def sync(self, namespace: str, name: str) -> DecisionT | None:
        """Take the job one step further. None when it is gone.

        Raises the kind's ``SpecError`` (permanent: the status says Failed, InvalidSpec)
        or a ``ClusterError`` (transient: retry later).
        """
        async with self._lock(namespace, name):
            obj = await self.kube.get(self.kind, namespace, name)
            if obj is None or obj["metadata"].get("deletionTimestamp"):
                return None  # owner references take its Jobs and pods
            with self.metrics.reconcile(self.kind.kind):
                decision = await self._sync(obj, namespace, name)
            # Started / Completed / Failed, once each: decided from the status change.
            await post_events(self.kube, self.kind, namespace, name, str(obj["metadata"]["uid"]),
                              job_events(self.kind.kind, obj.get("status"), decision.status),
                              self.clock())
            return decision

    @abc.abstractmethod
    async def _sync(self, obj: dict[str, Any], namespace: str, name: str) -> DecisionT:
        """One step of a job that exists."""

    async def _write_status(self, obj: dict[str, Any], status: dict[str, Any]) -> None:
        await write_status(self.kube, self.kind, obj, status)
