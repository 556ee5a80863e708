"""One reconcile of one Endpoint: read, decide (pure code), apply, report.

``EndpointSync.sync`` is state-based and idempotent: it reads the Endpoint
fresh from the API (kopf's event body may be older than what a concurrent
timer already applied), lists the children, asks ``reconcile`` what to change,
applies exactly that, and writes the status only when it differs. Running it
twice on an unchanged cluster makes no write at all. Calls for the same
Endpoint are serialised by a per-object lock, so the event handlers and the
status timer never interleave their writes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from kubeinfer_operator.errors import ClusterError, ConflictError
from kubeinfer_operator.handlers.plumbing import ObjectLocks, write_status
from kubeinfer_operator.k8s import kinds
from kubeinfer_operator.k8s.client import AlreadyExists, KubeClient, Rejected
from kubeinfer_operator.k8s.events import post_events
from kubeinfer_operator.observability import KIND_ENDPOINT, OperatorMetrics
from kubeinfer_operator.reconcile import rollout_status
from kubeinfer_operator.reconcile import status as st
from kubeinfer_operator.reconcile.async_paths import with_former_paths
from kubeinfer_operator.reconcile.async_validate import async_cluster_problems
from kubeinfer_operator.reconcile.cluster_scaling import scaling_event
from kubeinfer_operator.reconcile.compile_status import variant_compile_status
from kubeinfer_operator.reconcile.compile_validate import variant_compile_problems
from kubeinfer_operator.reconcile.diff import (
    Changes,
    conflict_message,
    diff_children,
    key_of,
    owned_by,
)
from kubeinfer_operator.reconcile.events import EndpointEventMemory, EventSpec
from kubeinfer_operator.reconcile.rollout import TERMINAL
from kubeinfer_operator.reconcile.upgrades import (
    REASON_UPGRADE_QUEUED,
    UpgradeSlots,
    hold_images,
    image_drift,
)
from kubeinfer_operator.reconcile.validate import (
    REASON_INVALID_SPEC,
    InvalidSpec,
    capture_cluster_problems,
    image_port_problems,
    validate_endpoint,
)
from kubeinfer_operator.redis_acl import RedisAclUnavailable, RedisUsers
from kubeinfer_operator.render import k8s_meta as meta
from kubeinfer_operator.render import k8s_secrets as secrets
from kubeinfer_operator.render.k8s import (
    Owner,
    endpoint_url,
    render_endpoint,
)
from kubeinfer_operator.render.k8s_autoscaling import autoscaling_problems
from kubeinfer_operator.render.plan import EndpointPlan, plan_endpoint
from kubeinfer_operator.render.rollout import (
    expand_plan,
    gateway_pods_for_alarms,
    keep_live,
    kept_fleets,
)
from kubeinfer_operator.scaling.cluster import ClusterScaler
from kubeinfer_operator.scaling.rollouts import RolloutGuard, previous_rollouts
from kubeinfer_operator.scaling.shadows import read_shadow_status, shadow_names
from kubeinfer_operator.settings import OperatorSettings
from kubeinfer_runtime.contract.outbound import OutboundPolicy

log = logging.getLogger(__name__)

#: Seconds before an Endpoint re-reads its namespace's runtime Secret (drift check).
SECRET_RECHECK_S = 60.0


def accepts_scale_requests(plan: EndpointPlan) -> bool:
    """Whether gateways may ask the scaler for replicas of this Endpoint's variants."""
    return plan.serverless is not None or any(v.autoscaling for v in plan.variants)


class ChildConflict(ConflictError):
    """A wanted child name is taken by an object this Endpoint does not own.

    Transient when the other owner is being garbage-collected (an Endpoint
    deleted and re-created under the same name), so it is retried.
    """


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _check_on_kubernetes(plan: EndpointPlan, namespace: str, name: str,
                         settings: OperatorSettings) -> None:
    """Refuse what local mode runs but a cluster cannot (CPUUtilization beside other
    policies: the operator reads no pod metrics; a relative file:// model to compile; an
    async queue without Redis or with file:// outputs; an image step on the runtime
    container's port) as InvalidSpec, naming field and fix."""
    problems = autoscaling_problems(plan) + variant_compile_problems(plan)
    problems += async_cluster_problems(plan, redis_url=settings.redis_url)
    problems += image_port_problems(plan, {settings.runtime_port: "serving",
                                           settings.metrics_port: "metrics"})
    problems += capture_cluster_problems(plan.capture_destination)
    if problems:
        raise InvalidSpec(f"{namespace}/{name}", problems)


class EndpointSync:
    def __init__(self, client: KubeClient, settings: OperatorSettings,
                 clock: Callable[[], datetime] = _utcnow,
                 scaler: ClusterScaler | None = None,
                 outbound: OutboundPolicy | None = None,
                 metrics: OperatorMetrics | None = None) -> None:
        self.kube = client
        #: Reconciles counted and timed (observability); Events decided (reconcile.events).
        self.metrics = metrics if metrics is not None else OperatorMetrics()
        self.events = EndpointEventMemory()
        self.settings = settings
        #: Which destinations spec URLs may name (None: from ``settings.outbound_allow``).
        self.outbound = outbound if outbound is not None else settings.outbound_policy()
        self.clock = clock
        #: Auto scaling / serverless replicas (None: replicas as in the spec).
        self.scaler = scaler
        #: namespace -> ((content hash, Endpoint uid), when) of the last runtime Secret check.
        self._secrets_ensured: dict[str, tuple[tuple[str, str], datetime]] = {}
        # One lock per Endpoint, dropped when nobody holds or waits on it.
        self._lock = ObjectLocks()
        #: Endpoints with a child-triggered sync waiting for the lock (see ``resync``).
        self._resync_waiting: set[tuple[str, str]] = set()
        #: Staged upgrades: which Endpoints may roll to a new runtime image now.
        self.upgrades = UpgradeSlots(settings.max_concurrent_upgrades)
        self._managed_images = frozenset({settings.runtime_image, settings.compiler_image})
        #: Endpoints told (by an Event) that their upgrade waits for a slot.
        self._queued_noted: set[tuple[str, str]] = set()
        self._woken: set[asyncio.Task[None]] = set()
        #: Guarded rollouts (spec.deploymentConfig): alarm windows and their scrapes.
        self.rollouts = RolloutGuard(scaler)
        #: Each namespace's own Redis user (``redis_acl``); None: one shared URL.
        self.redis_users = (RedisUsers(settings.redis_url,
                                       recheck_s=settings.redis_acl_recheck_s)
                            if settings.redis_url and settings.redis_acl else None)

    async def sync(self, namespace: str, name: str) -> None:
        """Bring one Endpoint's children and status in line with its spec.

        Raises ``InvalidSpec`` or ``Rejected`` (permanent: the status already
        says why) or a ``ClusterError`` (transient: retry later).
        """
        async with self._lock(namespace, name):
            obj = await self.kube.get(kinds.ENDPOINT, namespace, name)
            if obj is None or obj["metadata"].get("deletionTimestamp"):
                # Deleted: owner references let the cluster remove the children (and
                # the runtime Secret with the namespace's last Endpoint).
                if self.scaler is not None:
                    self.scaler.forget(namespace, name)
                self.rollouts.forget(namespace, name)
                self.events.forget(namespace, name)
                self._upgrade_done((namespace, name))
                return
            with self.metrics.reconcile(KIND_ENDPOINT):
                await self._sync(obj, namespace, name)

    async def deleted(self, namespace: str, name: str, *, asynchronous: bool) -> None:
        """What a deleted Endpoint leaves in Redis, outside the cluster's garbage collection:
        its queue, were it async (``scaling.backlog``: why), and the namespace's Redis user
        once no Endpoint of the namespace is left."""
        if asynchronous and self.scaler is not None:
            await self.scaler.drop_queue(namespace, name)
        if self.redis_users is None:
            return
        try:
            others = [e for e in await self.kube.list(kinds.ENDPOINT, namespace)
                      if e.get("metadata", {}).get("name") != name
                      and not e.get("metadata", {}).get("deletionTimestamp")]
        except ClusterError as exc:
            log.warning("Could not list the Endpoints of namespace %s (%s); its Redis user "
                        "stays", namespace, exc)
            return
        if not others:
            await self.redis_users.drop(namespace)

    async def resync(self, namespace: str, name: str) -> None:
        """``sync`` after a child changed, coalesced: a rollout's burst of Deployment
        events costs one sync per Endpoint, not one per event.

        A sync that has not read the cluster yet will see every change made before it
        does, so while one waits for the lock, further calls return at once.
        """
        key = (namespace, name)
        if key in self._resync_waiting:
            return
        self._resync_waiting.add(key)
        try:
            async with self._lock(namespace, name):
                self._resync_waiting.discard(key)
                obj = await self.kube.get(kinds.ENDPOINT, namespace, name)
                if obj is not None and not obj["metadata"].get("deletionTimestamp"):
                    with self.metrics.reconcile(KIND_ENDPOINT):
                        await self._sync(obj, namespace, name)
        finally:
            self._resync_waiting.discard(key)

    async def _sync(self, obj: dict[str, Any], namespace: str, name: str) -> None:
        metadata = obj["metadata"]
        generation = int(metadata.get("generation") or 0)
        old_status: dict[str, Any] = obj.get("status") or {}
        try:
            endpoint = validate_endpoint(name, namespace, obj.get("spec"),
                                         outbound=self.outbound,
                                         promql_label=self.settings.promql_namespace_label)
            plan = plan_endpoint(endpoint, generation=generation)
            _check_on_kubernetes(plan, namespace, name, self.settings)
        except InvalidSpec as exc:
            self._upgrade_done((namespace, name))
            await self._fail(obj, REASON_INVALID_SPEC, str(exc))
            raise
        owner = Owner(name=name, namespace=namespace, uid=str(metadata["uid"]))
        # Before the children: their pods read it (secretKeyRef env, a Secret volume).
        await self._ensure_runtime_secret(owner)
        if plan.async_config is not None:
            await self._ensure_redis_user(obj, namespace)
        actual = await self._children(namespace, name)
        deployments = st.deployments_by_name(actual)
        if plan.async_config is not None:
            # Requests queued under the paths the running workers have stay writable.
            plan = dataclasses.replace(plan, async_config=with_former_paths(
                plan.async_config, deployments.values(), self.clock().timestamp()))
        if self.scaler is not None:
            self.scaler.register(namespace, name, frozenset(
                v.name for v in plan.variants) if accepts_scale_requests(plan) else None)
            self.scaler.hand_over_to_hpas(plan, namespace)
            plan = self.scaler.replicas_for(plan, namespace, deployments)
        decisions = await self.rollouts.decide(
            plan, endpoint.spec.deploymentConfig, namespace, deployments, old_status,
            self.clock())
        # plan itself without a rollout
        fleets = expand_plan(plan, decisions, endpoint.spec.deploymentConfig)
        existing = {v.name for v in fleets.variants
                    if meta.variant_object_name(name, v.name) in deployments}
        desired = keep_live(render_endpoint(fleets, owner, self.settings,
                                            st.serving_variants(fleets, deployments), existing),
                            name, kept_fleets(decisions), deployments)
        desired += gateway_pods_for_alarms(endpoint.spec.deploymentConfig, fleets,
                                                  desired, owner, self.settings)
        upgrading = image_drift(desired, actual, self._managed_images)
        if upgrading and not self.upgrades.admit(
                (namespace, name), serving=st.condition_true(old_status, st.READY)):
            desired = hold_images(desired, actual, self._managed_images)
            await self._note_queued(owner)
        changes = diff_children(desired, actual, owner_uid=owner.uid, owner_name=name,
                                namespace=namespace)
        try:
            written, conflicts = await self._apply(changes, owner)
        except Rejected as exc:
            await self._fail(obj, st.REASON_REJECTED, str(exc))
            raise
        if conflicts:
            message = "; ".join(conflicts)
            await self._fail(obj, st.REASON_NAME_CONFLICT, message)
            raise ChildConflict(message)
        deployments = {**deployments, **st.deployments_by_name(written)}
        status = st.endpoint_status(plan, rollout_status.serving_aliases(name, deployments,
                                                                         decisions),
                                    url=endpoint_url(owner, self.settings),
                                    old=old_status, now=self.clock())
        rollout_events = rollout_status.apply(status, decisions, generation, old_status,
                                              self.clock())
        if self.scaler is not None:
            for variant in status["variants"]:
                reason = self.scaler.reason_for(namespace, name, variant["name"])
                if reason:
                    variant["lastScaling"] = reason
        if self.scaler is not None and shadow_names(plan):  # spec.shadowVariants
            shadow = await read_shadow_status(self.scaler, plan, namespace)
            status["shadow"] = shadow if shadow is not None else old_status.get("shadow", [])
        await self._compile_outcomes(plan, namespace, status)
        await self._write_status(obj, status)
        # Created / Updated / RolloutComplete, decided from what this reconcile did.
        await post_events(self.kube, kinds.ENDPOINT, namespace, name, owner.uid,
                          self.events.decide(namespace, name, old_status, status, changes)
                          + rollout_events, self.clock())
        if not upgrading and st.condition_true(status, st.READY):
            self._upgrade_done((namespace, name))

    # -- staged runtime upgrades ---------------------------------------------------------

    def _upgrade_done(self, key: tuple[str, str]) -> None:
        """``key`` rolled out (or is gone): wake the Endpoints waiting for its slot."""
        self._queued_noted.discard(key)
        for namespace, name in self.upgrades.finish(key):
            task = asyncio.create_task(self._wake(namespace, name))
            self._woken.add(task)
            task.add_done_callback(self._woken.discard)

    async def _wake(self, namespace: str, name: str) -> None:
        try:
            await self.resync(namespace, name)
        except ClusterError as exc:
            log.warning("Upgrade of %s/%s could not start: %s; the next reconcile retries",
                        namespace, name, exc)

    async def _note_queued(self, owner: Owner) -> None:
        """Say once per wait, on the Endpoint, why its new runtime image is not rolling."""
        key = (owner.namespace, owner.name)
        if key in self._queued_noted:
            return
        self._queued_noted.add(key)
        message = (f"Runtime image upgrade queued: {len(self.upgrades.rolling)} Endpoint(s) "
                   f"are rolling (at most {self.upgrades.limit} at a time); this one keeps "
                   "its current image until a slot frees")
        log.info("%s/%s: %s", owner.namespace, owner.name, message)
        await post_events(self.kube, kinds.ENDPOINT, owner.namespace, owner.name, owner.uid,
                          [EventSpec(REASON_UPGRADE_QUEUED, message)], self.clock())

    async def _compile_outcomes(self, plan: EndpointPlan, namespace: str,
                                status: dict[str, Any]) -> None:
        """Variants compiling before they serve: their pods' compile reports into status."""
        for variant in status["variants"]:
            v = plan.variant(variant["name"])
            if v is None or v.compile is None:
                continue
            selector = meta.label_selector(meta.pod_selector(plan.name,
                                                             meta.COMPONENT_MODEL_SERVER, v.name))
            outcome = variant_compile_status(await self.kube.list(kinds.POD, namespace,
                                                                  selector), v.server_hash)
            if outcome is not None:
                variant["compiled"] = outcome

    async def autoscale(self, namespace: str, name: str) -> None:
        """Run the scaler's policies for one Endpoint, then apply what they decided.

        Each replica change is logged and posted as a ``Scaled`` Event on the
        Endpoint; ``sync`` renders it and records the reason in status.
        """
        if self.scaler is None:
            return
        # Under the Endpoint's lock: gateways repeat a scale request every second
        # while they hold requests, and two evaluations racing on the same
        # replicas would post the same "cold start" Event twice.
        async with self._lock(namespace, name):
            await self._autoscale(namespace, name)

    async def _autoscale(self, namespace: str, name: str) -> None:
        assert self.scaler is not None
        obj = await self.kube.get(kinds.ENDPOINT, namespace, name)
        if obj is None or obj["metadata"].get("deletionTimestamp"):
            return
        try:
            plan = plan_endpoint(validate_endpoint(
                name, namespace, obj.get("spec"), outbound=self.outbound,
                promql_label=self.settings.promql_namespace_label))
            _check_on_kubernetes(plan, namespace, name, self.settings)
        except InvalidSpec:
            return  # reported by sync
        owner = Owner(name=name, namespace=namespace, uid=str(obj["metadata"]["uid"]))
        if plan.async_config is not None:
            # At the scaler's pace, not only at a full sync (every resync_interval_s):
            # a restarted Redis that forgot the user gets it back within a minute.
            await self._ensure_redis_user(obj, namespace)
        deployments = st.deployments_by_name(await self._children(namespace, name))
        current = {v.name: v.replicas
                   for v in self.scaler.replicas_for(plan, namespace, deployments).variants}
        # A variant's guarded rollout holds its scaling (green starts at blue's replicas).
        rolling = {variant for variant, state in previous_rollouts(obj.get("status") or {}
                                                                     ).items()
                   if state.phase not in TERMINAL}
        messages = await self.scaler.evaluate(plan, namespace, current, now=self.clock(),
                                              held=rolling)
        for message in messages:
            try:
                await self.kube.create(scaling_event(namespace, name, owner.uid, message,
                                                     self.clock()))
            except ClusterError as exc:
                log.warning("Could not post the scaling Event of %s/%s: %s", namespace, name,
                            exc)
        if messages:
            # Read again: the spec may have changed while the scaler scraped.
            obj = await self.kube.get(kinds.ENDPOINT, namespace, name)
            if obj is not None and not obj["metadata"].get("deletionTimestamp"):
                await self._sync(obj, namespace, name)

    async def _children(self, namespace: str, name: str) -> list[dict[str, Any]]:
        selector = meta.label_selector(meta.endpoint_selector(name))
        found: list[dict[str, Any]] = []
        for kind in kinds.CHILD_KINDS:
            if kind is kinds.NETWORK_POLICY and not self.settings.network_policy:
                continue  # none rendered: not worth a LIST per refresh
            found += await self.kube.list(kind, namespace, selector)
        return found

    async def _ensure_redis_user(self, obj: dict[str, Any], namespace: str) -> None:
        """The namespace's Redis user, which the runtime Secret's URL names, before any
        gateway or worker uses it (and again after a Redis restart forgot it)."""
        if self.redis_users is None:
            return
        import redis.exceptions

        try:
            await self.redis_users.ensure(namespace)
        except RedisAclUnavailable as exc:
            await self._fail(obj, st.REASON_REDIS_ACL, str(exc))
            raise ClusterError(str(exc)) from None  # retried: the administrator may fix it
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                OSError) as exc:
            # The workers cannot reach it either (their probes say so); the next refresh
            # tries again. Not a reason to hold back the rest of the Endpoint.
            log.warning("Endpoint %s/%s: could not set the namespace's Redis user (%s: %s); "
                        "retrying at the next refresh", namespace, obj["metadata"]["name"],
                        type(exc).__name__, exc)

    async def _ensure_runtime_secret(self, owner: Owner) -> None:
        """Create or update the namespace's runtime Secret, owned by this Endpoint too.

        Skipped when this Endpoint ensured the same content less than a minute ago:
        the refresh runs every few seconds and a GET each time would be waste.
        """
        namespace = owner.namespace
        data = secrets.runtime_secret_data(namespace, self.settings)
        if not data:
            return
        stamp = (meta.content_hash(data), owner.uid)
        ensured = self._secrets_ensured.get(namespace)
        now = self.clock()
        if ensured is not None and ensured[0] == stamp and (now - ensured[1]).total_seconds() < (
                SECRET_RECHECK_S):
            return
        name = self.settings.runtime_secret_name
        ref = secrets.shared_owner_reference(owner.name, owner.uid)
        existing = await self.kube.get(kinds.SECRET, namespace, name)
        if existing is None:
            try:
                await self.kube.create(secrets.runtime_secret(namespace, self.settings, [ref]))
                log.info("Created Secret %s/%s (runtime credentials)", namespace, name)
            except AlreadyExists:
                raise ClusterError(f"Secret {namespace}/{name} appeared while being created; "
                                   "retrying") from None
        else:
            labels = existing["metadata"].get("labels") or {}
            if labels.get(meta.LABEL_MANAGED_BY) != meta.MANAGED_BY:
                raise ChildConflict(f"Secret {namespace}/{name} exists and is not managed by "
                                    "kubeinfer; delete or rename it, or set the chart's "
                                    "runtime.secretName")
            owners = existing["metadata"].get("ownerReferences") or []
            merged = secrets.merged_owners(owners, ref)
            # EdgeFleets' status tokens are theirs: never compared, never removed here.
            old = secrets.endpoint_keys(existing.get("data") or {})
            if merged != owners or old != data:
                patch: dict[str, Any] = {"data": {**{k: None for k in old if k not in data},
                                                  **data}}
                patch["metadata"] = {"ownerReferences": merged,
                                     # Optimistic: two Endpoints adding themselves at once
                                     # must not drop each other's reference.
                                     "resourceVersion": existing["metadata"].get(
                                         "resourceVersion")}
                await self.kube.merge_patch(kinds.SECRET, namespace, name, patch)
                log.info("Updated Secret %s/%s (runtime credentials)", namespace, name)
        self._secrets_ensured[namespace] = (stamp, now)

    async def _apply(self, changes: Changes,
                     owner: Owner) -> tuple[list[dict[str, Any]], list[str]]:
        """Apply the planned writes; return the objects written and any conflicts."""
        written: list[dict[str, Any]] = []
        conflicts = list(changes.conflicts)
        for manifest in changes.create:
            try:
                written.append(await self.kube.create(manifest))
                log.info("Created %s %s/%s", manifest["kind"], owner.namespace,
                         manifest["metadata"]["name"])
            except AlreadyExists:
                # Not in our labelled listing: someone else's object, or ours
                # created by a concurrent reconcile a moment ago.
                kind = kinds.kind_of(manifest)
                existing = await self.kube.get(kind, owner.namespace,
                                               manifest["metadata"]["name"])
                if existing is not None and not owned_by(existing, owner.uid):
                    conflicts.append(conflict_message(existing, owner.namespace, owner.name))
                elif existing is not None and meta.applied_hash(existing) != meta.applied_hash(
                        manifest):
                    changes.patch.append(manifest)
        for manifest in changes.patch:
            kind = kinds.kind_of(manifest)
            patched = await self.kube.merge_patch(kind, owner.namespace,
                                                  manifest["metadata"]["name"], manifest)
            if patched is not None:
                written.append(patched)
                log.info("%s %s %s/%s", "Restored (changed outside its Endpoint)"
                         if key_of(manifest) in changes.drifted else "Updated",
                         manifest["kind"], owner.namespace, manifest["metadata"]["name"])
        for key in changes.delete:
            await self.kube.delete(kinds.BY_KIND[key.kind], owner.namespace, key.name)
            log.info("Deleted %s %s/%s (no longer in the spec)", key.kind, owner.namespace,
                     key.name)
        return written, conflicts

    async def _fail(self, obj: dict[str, Any], reason: str, message: str) -> None:
        generation = int(obj["metadata"].get("generation") or 0)
        status = st.failed_status(generation, reason, message, old=obj.get("status"),
                                  now=self.clock())
        await self._write_status(obj, status)

    async def _write_status(self, obj: dict[str, Any], status: dict[str, Any]) -> None:
        await write_status(self.kube, kinds.ENDPOINT, obj, status)
