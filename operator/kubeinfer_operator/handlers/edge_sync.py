"""One reconcile of one EdgeFleet: read, decide (pure code), apply, report.

``EdgeSync.sync`` reads the EdgeFleet fresh from the API, makes sure the
namespace's runtime Secret (``kubeinfer-runtime``) holds the fleet's status token
(key ``edge-status-<fleet>``, generated once; the EdgeFleet becomes one more owner
of the Secret), lists its package Jobs and their pods (label
``kubeinfer.io/edge-fleet``), reads its fleet server Deployment, fetches the
fleet's status from a ready fleet server pod (``GET /v1/fleet`` with the status
token), asks ``reconcile.edge_status.decide`` what to do, does exactly that (delete stale
package Jobs, create missing ones, apply the fleet config ConfigMap and the fleet
server Deployment, Service and PodDisruptionBudget) and writes the status only
when it differs.

The operator never reads the Secrets the EdgeFleet names (bootstrap token,
signing key, Redis URL; its RBAC allows the runtime Secret only): pods read them
by reference, and a missing one shows as a pod that does not start, which the
status names. The status token authorizes the fleet server's two reads and
nothing else (no registering, no heartbeats, no packages); it is never logged or
written anywhere but the runtime Secret.

The token goes only to the fleet server's pods, at the IPs their kubelets
reported (listed by the labels the operator renders, ``k8s.pods``), never to the
fleet server Service's DNS name: that Service is in the tenant's namespace, and
an editor there could repoint it (``ExternalName``, another selector) to have
the token sent to a host of their choosing and the status read from it.
Devices keep using the Service (``status.fleetServer``).

The fetch is injectable (``fetch``, ``server_url``): tests point it at a fake
fleet server.
"""

from __future__ import annotations

import asyncio
import logging
import secrets as pysecrets
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import httpx
from pydantic import ValidationError

from kubeinfer_operator.errors import ClusterError, ConflictError
from kubeinfer_operator.handlers.plumbing import (
    ObjectLocks,
    create_owned_job,
    utcnow,
    write_status,
)
from kubeinfer_operator.k8s import kinds
from kubeinfer_operator.k8s.client import AlreadyExists, KubeClient
from kubeinfer_operator.k8s.pods import ready_pod_urls
from kubeinfer_operator.observability import OperatorMetrics
from kubeinfer_operator.reconcile import edge_status as es
from kubeinfer_operator.reconcile.compile_status import pod_view
from kubeinfer_operator.reconcile.diff import drift_patch, owned_by, update_patch
from kubeinfer_operator.reconcile.edge_validate import InvalidEdgeFleet, validate_edge_fleet
from kubeinfer_operator.reconcile.status import deployment_state
from kubeinfer_operator.reconcile.transform_observe import job_view
from kubeinfer_operator.render import edge_fleet as rf
from kubeinfer_operator.render import k8s_meta as meta
from kubeinfer_operator.render import k8s_secrets as secrets
from kubeinfer_operator.render.edge_plan import FleetPlan, fleet_config, plan_fleet
from kubeinfer_operator.settings import OperatorSettings
from kubeinfer_runtime.contract.edge import FleetStatus

log = logging.getLogger(__name__)

#: (base URL, status token) → the fleet's status; raises ``FleetStatusError``.
FleetFetch = Callable[[str, str], Awaitable[FleetStatus]]
#: Largest FleetStatus body read (counters by state and version: small).
MAX_FLEET_STATUS_BYTES = 1024 * 1024
FETCH_TIMEOUT_S = 5.0
#: Longest a whole answer may take (FETCH_TIMEOUT_S bounds each read, not the sum).
FETCH_DEADLINE_S = 15.0
#: Fleet server pods asked per refresh, at most.
MAX_SERVERS_ASKED = 3
#: Random bytes of a status token (``secrets.token_urlsafe``: 43 characters).
STATUS_TOKEN_BYTES = 32


class FleetStatusError(Exception):
    """The fleet server's status could not be read (the message says why, no secret)."""


class EdgeNameConflict(ConflictError):
    """An object name this EdgeFleet needs is taken by one it does not own."""


async def fetch_fleet_status(base_url: str, token: str) -> FleetStatus:
    """``GET <base_url>/v1/fleet`` with the status token, bounded in time and size."""
    url = f"{base_url.rstrip('/')}/v1/fleet"
    try:
        async with httpx.AsyncClient(timeout=FETCH_TIMEOUT_S) as client, client.stream(
                "GET", url, headers={"Authorization": f"Bearer {token}"}) as response:
            if response.status_code != 200:
                raise FleetStatusError(f"GET {url} answered {response.status_code}")
            body = b""
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_FLEET_STATUS_BYTES:
                    raise FleetStatusError(f"GET {url} answered more than "
                                           f"{MAX_FLEET_STATUS_BYTES} bytes")
    except httpx.HTTPError as exc:
        raise FleetStatusError(f"GET {url} failed: {type(exc).__name__}") from exc
    try:
        return FleetStatus.model_validate_json(body)
    except ValidationError as exc:
        raise FleetStatusError(f"GET {url} answered no FleetStatus ({exc.error_count()} "
                               "problems); check that the runtime image matches the "
                               "operator's version") from exc


class EdgeSync:
    """Syncs EdgeFleets; ``sync`` raises ``InvalidEdgeFleet`` for a spec that cannot run."""

    kind = kinds.EDGE_FLEET

    def __init__(self, client: KubeClient, settings: OperatorSettings, *,
                 fetch: FleetFetch = fetch_fleet_status,
                 server_url: Callable[[str, str], str] | None = None,
                 clock: Callable[[], datetime] = utcnow,
                 metrics: OperatorMetrics | None = None) -> None:
        self.kube = client
        self.settings = settings
        self.fetch = fetch
        #: Tests: (namespace, fleet) → the one URL to poll instead of the fleet server's
        #: ready pods (a fake fleet server).
        self.server_url = server_url
        self.clock = clock
        self.metrics = metrics if metrics is not None else OperatorMetrics()
        self._lock = ObjectLocks()

    async def sync(self, namespace: str, name: str) -> es.Decision | None:
        """Take the fleet one step further. None when it is gone."""
        async with self._lock(namespace, name):
            obj = await self.kube.get(self.kind, namespace, name)
            if obj is None or obj["metadata"].get("deletionTimestamp"):
                return None  # owner references take its Jobs, ConfigMap, Deployment, Service
            with self.metrics.reconcile(self.kind.kind):
                return await self._sync(obj, namespace, name)

    def _info(self, obj: dict[str, Any], plan: FleetPlan | None) -> es.FleetInfo:
        md = obj["metadata"]
        signing = ""
        server_secrets: tuple[str, ...] = ()
        if plan is not None:
            ns, spec = md["namespace"], plan.spec
            ref = spec.signing.keySecret
            signing = f"Secret {ns}/{ref.name} key {ref.key} (spec.signing.keySecret)"
            named = [(spec.registration.bootstrapTokenSecret,
                      "spec.registration.bootstrapTokenSecret")]
            if spec.redis.urlSecret is not None:
                named.append((spec.redis.urlSecret, "spec.redis.urlSecret"))
            server_secrets = tuple(f"Secret {ns}/{r.name} key {r.key} ({field})"
                                   for r, field in named)
        return es.FleetInfo(
            name=md["name"], namespace=md["namespace"],
            generation=int(md.get("generation") or 0),
            version=plan.version if plan else "", model=plan.model_uri if plan else "",
            run_hashes={b.target: b.run_hash for b in plan.builds} if plan else {},
            job_names={b.target: b.job_name for b in plan.builds} if plan else {},
            status=obj.get("status") or {},
            replicas=plan.spec.server.replicas if plan else 1,
            url=rf.server_url(md["name"], md["namespace"], self.settings) if plan else "",
            signing_secret=signing, server_secrets=server_secrets)

    async def _sync(self, obj: dict[str, Any], namespace: str, name: str) -> es.Decision:
        uid = str(obj["metadata"]["uid"])
        try:
            fleet = validate_edge_fleet(name, namespace, obj.get("spec"))
            plan = plan_fleet(fleet, namespace)
        except InvalidEdgeFleet as exc:
            await write_status(self.kube, self.kind, obj, es.invalid_status(
                self._info(obj, None), str(exc), self.clock()))
            raise
        info = self._info(obj, plan)
        # Before the fleet server: its pods read the token (secretKeyRef) at start.
        token, token_problem = await self._status_token(plan, uid)
        observed, stale = await self._observe(plan, info, uid, token, token_problem)
        decision = es.decide(info, observed, self.clock())
        created = await self._apply(plan, decision, uid, stale, token)
        if created and await self._owner_gone(namespace, name, uid):
            # Deleted while this sync ran: the garbage collector may have passed already,
            # so what was just created would be orphaned until its next sweep.
            for kind, child in created:
                await self.kube.delete(kind, namespace, child)
            return decision
        await write_status(self.kube, self.kind, obj, decision.status)
        return decision

    async def _owner_gone(self, namespace: str, name: str, uid: str) -> bool:
        now = await self.kube.get(self.kind, namespace, name)
        return (now is None or str(now["metadata"].get("uid")) != uid
                or bool(now["metadata"].get("deletionTimestamp")))

    # -- reading ------------------------------------------------------------------------------

    async def _status_token(self, plan: FleetPlan, uid: str) -> tuple[str | None, str | None]:
        """(status token, problem): the fleet's status token from the namespace's runtime
        Secret, written there first when missing (the Secret created if need be, this
        EdgeFleet added to its owners), as Endpoints keep that Secret (``handlers.sync``).
        The problem: the Secret's name is taken by one kubeinfer does not manage."""
        namespace, fleet = plan.namespace, plan.name
        name = self.settings.runtime_secret_name
        key = secrets.edge_status_key(fleet)
        ref = rf.runtime_secret_owner(fleet, uid)
        existing = await self.kube.get(kinds.SECRET, namespace, name)
        if existing is None:
            token = pysecrets.token_urlsafe(STATUS_TOKEN_BYTES)
            try:
                await self.kube.create(secrets.runtime_secret(namespace, self.settings, [ref],
                                                              extra={key: token}))
            except AlreadyExists:
                raise ClusterError(f"Secret {namespace}/{name} appeared while being created; "
                                   "retrying") from None
            log.info("Created Secret %s/%s (runtime credentials, EdgeFleet %s's status "
                     "token)", namespace, name, fleet)
            return token, None
        labels = existing["metadata"].get("labels") or {}
        if labels.get(meta.LABEL_MANAGED_BY) != meta.MANAGED_BY:
            return None, (f"Secret {namespace}/{name} exists and is not managed by kubeinfer "
                          "(the operator keeps the fleet's status token there); delete or "
                          "rename it, or set the chart's runtime.secretName")
        owners = existing["metadata"].get("ownerReferences") or []
        merged = secrets.merged_owners(owners, ref)
        stored = secrets.status_token_of(existing.get("data") or {}, fleet)
        data: dict[str, str] = {}
        if stored is None:
            stored = pysecrets.token_urlsafe(STATUS_TOKEN_BYTES)
            data[key] = secrets.encode(stored)
        if merged != owners or data:
            patch: dict[str, Any] = {"metadata": {
                "ownerReferences": merged,
                # Optimistic: an Endpoint or another EdgeFleet adding itself at once must
                # not drop this reference (or this one theirs).
                "resourceVersion": existing["metadata"].get("resourceVersion")}}
            if data:
                patch["data"] = data
            await self.kube.merge_patch(kinds.SECRET, namespace, name, patch)
            log.info("Updated Secret %s/%s (EdgeFleet %s's status token)", namespace, name,
                     fleet)
        return stored, None

    async def _observe(self, plan: FleetPlan, info: es.FleetInfo, uid: str,
                       token: str | None, token_problem: str | None
                       ) -> tuple[es.Observed, list[str]]:
        """What exists, and the package Jobs of no wanted build (another version's)."""
        namespace = plan.namespace
        selector = meta.label_selector(rf.selector(plan.name))
        jobs = {j["metadata"]["name"]: j for j in await self.kube.list(kinds.JOB, namespace,
                                                                        selector)
                if owned_by(j, uid)}
        stale = sorted(set(jobs) - {b.job_name for b in plan.builds})
        pods: list[dict[str, Any]] = []
        if any(job_view(jobs.get(b.job_name)).finished for b in plan.builds):
            pods = await self.kube.list(kinds.POD, namespace, selector)
        builds = {}
        for b in plan.builds:
            mine = tuple(pod_view(p, rf.PACKAGE_CONTAINER) for p in pods
                         if ((p.get("metadata") or {}).get("labels") or {}).get(
                             "batch.kubernetes.io/job-name", "") == b.job_name
                         or str((p.get("metadata") or {}).get("name", "")).startswith(
                             b.job_name + "-"))
            builds[b.target] = es.Build(job=job_view(jobs.get(b.job_name)), pods=mine)
        server_problem = await self._conflict(plan, uid) or token_problem
        deployment = await self.kube.get(kinds.DEPLOYMENT, namespace, rf.server_name(plan.name))
        if deployment is not None and not owned_by(deployment, uid):
            deployment = None
        state = deployment_state(deployment)
        fleet, fleet_error = None, None
        if deployment is None:
            fleet_error = "the fleet server is not deployed yet"
        elif token is None:
            fleet_error = "no status token to ask with"
        else:
            fleet, fleet_error = await self._fleet_status(plan, token)
        return es.Observed(builds=builds, server_exists=deployment is not None,
                           server_available=state.available if deployment else 0,
                           fleet=fleet, fleet_error=fleet_error,
                           server_problem=server_problem,
                           server_reason=es.REASON_NAME_CONFLICT), stale

    async def _fleet_status(self, plan: FleetPlan,
                            token: str) -> tuple[FleetStatus | None, str | None]:
        """(status, why not): from the first ready fleet server pod that answers."""
        if self.server_url is not None:
            urls = [self.server_url(plan.namespace, plan.name)]
        else:
            urls = await ready_pod_urls(
                self.kube, plan.namespace,
                rf.pod_selector(plan.name, rf.COMPONENT_FLEET_SERVER),
                self.settings.runtime_port)
        if not urls:
            return None, "no fleet server pod is ready"
        error = None
        # Replicas share the fleet's state: any one answers for it. A few at most: any
        # pod under the server's labels is listed, and each try may take FETCH_DEADLINE_S.
        for url in urls[:MAX_SERVERS_ASKED]:
            try:
                async with asyncio.timeout(FETCH_DEADLINE_S):  # a trickling answer
                    return es.bounded_fleet(await self.fetch(url, token)), None
            except TimeoutError:
                error = f"GET {url}/v1/fleet took longer than {FETCH_DEADLINE_S:.0f} s"
            except FleetStatusError as exc:
                error = str(exc)
        return None, error

    async def _conflict(self, plan: FleetPlan, uid: str) -> str | None:
        names = ((kinds.CONFIGMAP, rf.config_name(plan.name)),
                 (kinds.DEPLOYMENT, rf.server_name(plan.name)),
                 (kinds.SERVICE, rf.server_name(plan.name)))
        for kind, name in names:
            existing = await self.kube.get(kind, plan.namespace, name)
            if existing is not None and not owned_by(existing, uid):
                return (f"{kind.kind} {plan.namespace}/{name} already exists and is not owned "
                        f"by EdgeFleet {plan.name}; delete or rename it, or rename the "
                        "EdgeFleet")
        return None

    # -- writing ------------------------------------------------------------------------------

    async def _apply(self, plan: FleetPlan, decision: es.Decision, uid: str,
                     stale: list[str], token: str | None) -> list[tuple[kinds.Kind, str]]:
        """Do what ``decision`` says; return what was created (kind, name)."""
        namespace = plan.namespace
        created: list[tuple[kinds.Kind, str]] = []
        for name in stale:  # another version's: done, or no longer wanted
            if await self.kube.delete(kinds.JOB, namespace, name):
                log.info("Deleted Job %s/%s (not of version %s)", namespace, name, plan.version)
        for target in decision.delete:
            name = plan.build(target).job_name
            if await self.kube.delete(kinds.JOB, namespace, name):
                log.info("Deleted Job %s/%s (made from another spec)", namespace, name)
        for target in decision.create:
            build = plan.build(target)
            await create_owned_job(
                self.kube, rf.package_job(plan, build, uid=uid, settings=self.settings),
                uid, log=log, conflict=lambda ns, job: EdgeNameConflict(
                    f"Job {ns}/{job} exists and is not owned by EdgeFleet {plan.name}; "
                    "retrying"))
            created.append((kinds.JOB, build.job_name))
        if decision.current is None:
            return created
        config = fleet_config(plan, decision.current, decision.previous)
        desired = rf.fleet_server_objects(plan, config, uid=uid, settings=self.settings,
                                          status_token=token)
        for manifest in desired:
            if await self._put(manifest, uid):
                created.append((kinds.kind_of(manifest), manifest["metadata"]["name"]))
        if plan.spec.server.replicas < 2:
            pdb = await self.kube.get(kinds.PDB, namespace, rf.server_name(plan.name))
            if pdb is not None and owned_by(pdb, uid):
                await self.kube.delete(kinds.PDB, namespace, rf.server_name(plan.name))
        return created

    async def _put(self, manifest: dict[str, Any], uid: str) -> bool:
        """Create ``manifest`` or patch it where it changed or drifted; True: created."""
        kind = kinds.kind_of(manifest)
        md = manifest["metadata"]
        existing = await self.kube.get(kind, md["namespace"], md["name"])
        if existing is None:
            try:
                await self.kube.create(manifest)
                log.info("Created %s %s/%s", kind.kind, md["namespace"], md["name"])
                return True
            except AlreadyExists:
                existing = await self.kube.get(kind, md["namespace"], md["name"])
        if existing is None or not owned_by(existing, uid):
            return False  # another owner's: reported in status (NameConflict), never touched
        if meta.applied_hash(existing) != meta.applied_hash(manifest):
            patch: dict[str, Any] | None = update_patch(manifest, existing)
        else:
            patch = drift_patch(manifest, existing)
        if patch is not None:
            await self.kube.merge_patch(kind, md["namespace"], md["name"], patch)
            log.info("Updated %s %s/%s", kind.kind, md["namespace"], md["name"])
        return False

