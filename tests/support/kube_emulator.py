"""A Kubernetes API emulator for operator tests: kmock 0.8's emulator made API-server-like.

Stock ``kmock.KubernetesEmulator`` (0.8) serves discovery, CRUD and watches
over real HTTP, but cannot run a kopf operator with a finalizer (no
resourceVersion, so kopf's JSON-patch ``test`` fails) and misses much of what
an API server does (see ../shared/FACTS.md). This test-only subclass keeps
kmock's HTTP server, request parsing, discovery and error rendering, and
replaces object handling with a small in-memory API server that does what our
tests depend on:

* metadata the server owns: uid, resourceVersion (one global counter),
  generation (bumped when anything but metadata/status changes),
  creationTimestamp, namespace from the URL, generateName;
* optimistic concurrency: a write carrying a stale resourceVersion → 409;
  JSON patch ``test`` failures → 422 (what kopf expects);
* the status subresource: writes to the object ignore ``status``, writes to
  ``/status`` change only ``status``; unchanged writes are no-ops (no new
  resourceVersion, no watch event), as on a real server;
* deletion: finalizers hold the object with a deletionTimestamp until the
  last one is removed; then owner-reference cascade (the garbage collector)
  deletes dependents, synchronously; a dependent created when none of its owners
  exists any more goes too, right after its creation is answered;
* validation → 422: built-in kinds against the Kubernetes 1.33 schemas of
  kubernetes-validate (strict), custom resources against their CRD's
  openAPIV3Schema (Draft 4) after defaulting and pruning, plus list-map key
  uniqueness. CEL rules (``x-kubernetes-validations``) are NOT evaluated;
* lists carry ``kind``, ``metadata.resourceVersion``; label and field
  selectors; watches stream JSON lines (``application/json``), honour
  ``resourceVersion`` (events after it are replayed, so nothing is lost
  between a list and its watch) and ``timeoutSeconds``;
* namespaces must exist (``default`` does); CRDs created through the API
  register their resources for discovery.

Not emulated: controllers (no Pods/ReplicaSets, Deployments never become
available and Jobs never run: tests patch their status and create the pods a
Job controller would), strategic merge patch (treated as a
merge patch; fine for the flat patches our tests and kubectl send to CRs),
server-side apply (415), admission webhooks, RBAC.
"""

from __future__ import annotations

import asyncio
import copy
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp.web
import attrs
import kmock
from kmock._internal import rendering
from kmock._internal.k8s import KubernetesError

from tests.support import kube_patch as kp
from tests.support.kube_schema import builtin_validator

ResourceKey = tuple[str, str, str]  # group, version, plural


@dataclass
class ResourceDef:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    status_subresource: bool = False
    #: openAPIV3Schema of a CRD version (None: a built-in kind).
    schema: dict[str, Any] | None = None
    short_names: tuple[str, ...] = ()

    @property
    def key(self) -> ResourceKey:
        return (self.group, self.version, self.plural)

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


BUILTINS = [
    ResourceDef("", "v1", "namespaces", "Namespace", namespaced=False, status_subresource=True),
    ResourceDef("", "v1", "configmaps", "ConfigMap", short_names=("cm",)),
    ResourceDef("", "v1", "services", "Service", status_subresource=True, short_names=("svc",)),
    ResourceDef("", "v1", "events", "Event", short_names=("ev",)),
    ResourceDef("", "v1", "secrets", "Secret"),
    ResourceDef("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy",
                short_names=("netpol",)),
    ResourceDef("apps", "v1", "deployments", "Deployment", status_subresource=True,
                short_names=("deploy",)),
    ResourceDef("policy", "v1", "poddisruptionbudgets", "PodDisruptionBudget",
                status_subresource=True, short_names=("pdb",)),
    ResourceDef("autoscaling", "v2", "horizontalpodautoscalers", "HorizontalPodAutoscaler",
                status_subresource=True, short_names=("hpa",)),
    # TransformJobs: their Jobs, and the pods tests create in the Job controller's place.
    ResourceDef("batch", "v1", "jobs", "Job", status_subresource=True),
    ResourceDef("", "v1", "pods", "Pod", status_subresource=True, short_names=("po",)),
    ResourceDef("apiextensions.k8s.io", "v1", "customresourcedefinitions",
                "CustomResourceDefinition", namespaced=False, status_subresource=True,
                short_names=("crd",)),
    # kopf's peering resources, free-form (their CRDs ship with the Helm chart).
    ResourceDef("kopf.dev", "v1", "kopfpeerings", "KopfPeering",
                schema={"type": "object", "x-kubernetes-preserve-unknown-fields": True}),
    ResourceDef("kopf.dev", "v1", "clusterkopfpeerings", "ClusterKopfPeering", namespaced=False,
                schema={"type": "object", "x-kubernetes-preserve-unknown-fields": True}),
]
VERBS = ["create", "delete", "get", "list", "patch", "update", "watch"]


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _error(status: int, reason: str, message: str) -> KubernetesError:
    return KubernetesError(status=status, reason=reason, message=message, details={})


def _without(obj: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k not in keys}


@dataclass
class _Watcher:
    resource: ResourceKey
    namespace: str | None
    labels: str | None
    fields: str | None
    queue: asyncio.Queue[dict[str, Any]]

    def wants(self, resource: ResourceKey, obj: dict[str, Any]) -> bool:
        meta = obj.get("metadata") or {}
        return (resource == self.resource
                and (self.namespace is None or meta.get("namespace") == self.namespace)
                and kp.matches_labels(self.labels, meta.get("labels") or {})
                and kp.matches_fields(self.fields, obj))


@attrs.define(kw_only=True)
class KubeEmulator(kmock.KubernetesEmulator):
    """See the module docstring. ``crds``: CRD objects to install at start."""

    crds: list[dict[str, Any]] = attrs.field(factory=list)
    defs: dict[ResourceKey, ResourceDef] = attrs.field(factory=dict, init=False)
    store: dict[tuple[ResourceKey, str | None, str], dict[str, Any]] = attrs.field(
        factory=dict, init=False)
    rv: int = attrs.field(default=0, init=False)
    log: list[tuple[int, ResourceKey, dict[str, Any]]] = attrs.field(factory=list, init=False)
    watchers: list[_Watcher] = attrs.field(factory=list, init=False)
    #: Unexpected exceptions inside the emulator (tests assert this stays empty).
    failures: list[str] = attrs.field(factory=list, init=False)
    #: Injected errors: [method, path, status, times left] (see ``inject``).
    injected: list[list[Any]] = attrs.field(factory=list, init=False)
    #: Every request served: (method, path and query, User-Agent), for API-load checks.
    requests: list[tuple[str, str, str]] = attrs.field(factory=list, init=False)

    def inject(self, method: str, path: str, status: int, times: int = 1) -> list[Any]:
        """Answer the next ``times`` ``method`` requests to ``path`` with ``status``.

        Simulates a flaky or refusing API server (500, 429, 422 from a webhook).
        Returns the injection; its last item counts down as requests hit it.
        """
        entry = [method.upper(), path, status, times]
        self.injected.append(entry)
        return entry

    def _injected(self, raw: aiohttp.web.BaseRequest) -> KubernetesError | None:
        for entry in self.injected:
            if entry[3] > 0 and entry[0] == raw.method.upper() and raw.path == entry[1]:
                entry[3] -= 1
                return _error(entry[2], "Injected", f"injected failure {entry[2]} for a test")
        return None

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for d in BUILTINS:
            self._declare(d)
        self._put(self.defs[("", "v1", "namespaces")], None,
                  {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}})
        for crd in self.crds:
            self._put(self.defs[("apiextensions.k8s.io", "v1", "customresourcedefinitions")],
                      None, copy.deepcopy(crd))

    # -- resources -------------------------------------------------------------------------

    def _declare(self, d: ResourceDef) -> None:
        self.defs[d.key] = d
        self.resources[f"{d.api_version}/{d.plural}" if d.group else f"v1/{d.plural}"] = (
            kmock.ResourceInfo(kind=d.kind, namespaced=d.namespaced, verbs=VERBS,
                               singular=d.kind.lower(), shortnames=d.short_names,
                               subresources={"status"} if d.status_subresource else set()))

    def _register_crd(self, crd: dict[str, Any]) -> None:
        spec = crd["spec"]
        for version in spec["versions"]:
            self._declare(ResourceDef(
                spec["group"], version["name"], spec["names"]["plural"], spec["names"]["kind"],
                namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                status_subresource="status" in (version.get("subresources") or {}),
                schema=version["schema"]["openAPIV3Schema"],
                short_names=tuple(spec["names"].get("shortNames") or ())))

    # -- discovery fixes ---------------------------------------------------------------------

    async def _serve_version(self, request: rendering.Request) -> Any:
        body = await super()._serve_version(request)
        if isinstance(body, dict) and body.get("groupVersion", "").startswith("/"):
            body["groupVersion"] = body["groupVersion"][1:]  # core is "v1", not "/v1"
        for entry in (body or {}).get("resources", []) if isinstance(body, dict) else []:
            if "/" in entry.get("name", ""):  # subresources have no short names or categories
                entry.update(shortNames=[], categories=[], verbs=["get", "patch", "update"])
        return body

    async def _serve_server_version(self, request: rendering.Request) -> Any:
        return {"major": "1", "minor": "33", "gitVersion": "v1.33.0-kubeinfer-emulator",
                "platform": "linux/amd64"}

    # -- request dispatch --------------------------------------------------------------------

    def _route(self, path: str) -> tuple[ResourceDef, str | None, str | None, str | None] | None:
        """(resource, namespace, name, subresource) of an object/collection URL, else None.

        kmock's own parser cannot handle ``/api/v1/namespaces[/name]``, so
        resource URLs are parsed here; discovery URLs stay kmock's.
        """
        parts = [p for p in path.split("/") if p]
        if len(parts) >= 2 and parts[0] == "api":
            group, version, rest = "", parts[1], parts[2:]
        elif len(parts) >= 3 and parts[0] == "apis":
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            return None
        ns = None
        if (len(rest) >= 3 and rest[0] == "namespaces"
                and (group, version, rest[2]) in self.defs):
            ns, rest = rest[1], rest[2:]
        if not rest or (group, version, rest[0]) not in self.defs or len(rest) > 3:
            return None
        d = self.defs[(group, version, rest[0])]
        if d.namespaced != (ns is not None) and len(rest) > 1:
            return None
        return d, ns, (rest[1] if len(rest) > 1 else None), (rest[2] if len(rest) > 2 else None)

    async def __call__(self, raw: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        self.requests.append((raw.method, raw.path_qs, raw.headers.get("User-Agent", "")))
        if (injected := self._injected(raw)) is not None:
            await raw.read()
            return await self._render_error(injected)
        route = self._route(raw.path)
        if route is None:  # discovery and anything else: kmock's own handling
            return await super().__call__(raw)
        d, ns, name, sub = route
        body = await raw.read()
        try:
            data = json.loads(body) if body else None
        except ValueError:
            return await self._render_error(_error(400, "BadRequest", "the body is not JSON"))
        try:
            return await self._serve(raw, d, ns, name, sub, data)
        except KubernetesError as exc:
            return await self._render_error(exc)
        except Exception as exc:  # an emulator bug: make it visible to the tests
            self.failures.append(f"{raw.method} {raw.path_qs}: {exc!r}")
            return await self._render_error(exc)

    async def _serve(self, raw: aiohttp.web.BaseRequest, d: ResourceDef, ns: str | None,
                     name: str | None, sub: str | None, data: Any) -> aiohttp.web.StreamResponse:
        method, params = raw.method.upper(), raw.query
        if sub not in (None, "status"):
            raise _error(404, "NotFound", f"subresource {sub} is not served")
        if name is None:
            if method == "GET" and params.get("watch") in ("true", "1"):
                return await self._watch(raw, d, ns)
            if method == "GET":
                return self._json(self._list(d, ns, params))
            if method == "POST":
                return self._json(self._create(d, ns, data, params), 201)
            raise _error(405, "MethodNotAllowed", f"{method} on a collection is not supported")
        if method == "GET":
            return self._json(self._get(d, ns, name))
        if method == "PUT":
            return self._json(self._write(d, ns, name, sub, replace=data))
        if method == "PATCH":
            ctype = raw.headers.get("Content-Type", "").split(";")[0].strip()
            return self._json(self._write(d, ns, name, sub, patch=data, ctype=ctype))
        if method == "DELETE":
            return self._json(self._delete(d, ns, name, data or {}))
        raise _error(405, "MethodNotAllowed", f"{method} is not supported")

    @staticmethod
    def _json(body: Any, status: int = 200) -> aiohttp.web.Response:
        return aiohttp.web.json_response(body, status=status)

    # -- state ---------------------------------------------------------------------------------

    def _get(self, d: ResourceDef, ns: str | None, name: str) -> dict[str, Any]:
        obj = self.store.get((d.key, ns, name))
        if obj is None:
            raise _error(404, "NotFound", f'{d.plural}.{d.group} "{name}" not found')
        return obj

    def _list(self, d: ResourceDef, ns: str | None, params: Any) -> dict[str, Any]:
        items = [
            # A real server omits apiVersion/kind on items of built-in kinds.
            (_without(obj, "apiVersion", "kind") if d.schema is None else obj)
            for (key, obj_ns, _), obj in sorted(self.store.items(),
                                         key=lambda kv: (kv[0][1] or '', kv[0][2]))
            if key == d.key and (ns is None or obj_ns == ns)
            and kp.matches_labels(params.get("labelSelector"),
                                  obj["metadata"].get("labels") or {})
            and kp.matches_fields(params.get("fieldSelector"), obj)
        ]
        return {"apiVersion": d.api_version, "kind": f"{d.kind}List",
                "metadata": {"resourceVersion": str(self.rv)}, "items": items}

    def _emit(self, d: ResourceDef, kind: str, obj: dict[str, Any]) -> None:
        event = {"type": kind, "object": copy.deepcopy(obj)}
        self.log.append((self.rv, d.key, event))
        for w in self.watchers:
            if w.wants(d.key, obj):
                w.queue.put_nowait(event)

    def _stamp(self, obj: dict[str, Any]) -> None:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)

    def _put(self, d: ResourceDef, ns: str | None, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj.setdefault("metadata", {})
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(), generation=1)
        if d.namespaced:
            meta["namespace"] = ns
        else:
            meta.pop("namespace", None)
        obj.setdefault("apiVersion", d.api_version)
        obj.setdefault("kind", d.kind)
        self._stamp(obj)
        self.store[(d.key, ns, meta["name"])] = obj
        if d.key == ("apiextensions.k8s.io", "v1", "customresourcedefinitions"):
            self._register_crd(obj)
        self._emit(d, "ADDED", obj)
        return obj

    def _create(self, d: ResourceDef, ns: str | None, body: Any, params: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise _error(400, "BadRequest", "the body must be a JSON object")
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if d.namespaced and meta.get("namespace") not in (None, ns):
            raise _error(400, "BadRequest", "the namespace of the provided object does not "
                                            "match the namespace sent on the request")
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        if not meta.get("name"):
            raise _error(422, "Invalid", "metadata.name: Required value: name or generateName "
                                         "is required")
        if d.namespaced and (("", "v1", "namespaces"), None, ns) not in self.store:
            raise _error(404, "NotFound", f'namespaces "{ns}" not found')
        if (d.key, ns, meta["name"]) in self.store:
            raise _error(409, "AlreadyExists", f'{d.plural} "{meta["name"]}" already exists')
        for key in ("uid", "resourceVersion", "generation", "creationTimestamp",
                    "deletionTimestamp"):
            meta.pop(key, None)
        if d.status_subresource:
            obj.pop("status", None)
        obj.setdefault("apiVersion", d.api_version)
        obj.setdefault("kind", d.kind)
        obj = self._validated(d, obj)
        if params.get("dryRun"):
            return obj
        created = self._put(d, ns, obj)
        if self._dangling(created):
            # The garbage collector also deletes a dependent created after its owners were
            # gone (a reconcile in flight while its object was deleted), soon after.
            uid = created["metadata"]["uid"]
            try:
                asyncio.get_running_loop().call_soon(self._collect, d, ns, meta["name"], uid)
            except RuntimeError:
                self._collect(d, ns, meta["name"], uid)
        return created

    def _dangling(self, obj: dict[str, Any]) -> bool:
        """Whether ``obj`` has owners and none of them exists."""
        refs = obj["metadata"].get("ownerReferences") or []
        live = {o["metadata"]["uid"] for o in self.store.values()}
        return bool(refs) and not any(r.get("uid") in live for r in refs)

    def _collect(self, d: ResourceDef, ns: str | None, name: str, uid: str) -> None:
        obj = self.store.get((d.key, ns, name))
        if obj is not None and obj["metadata"]["uid"] == uid and self._dangling(obj):
            self._delete(d, ns, name, {})

    def _write(self, d: ResourceDef, ns: str | None, name: str, sub: str | None, *,
               replace: Any = None, patch: Any = None, ctype: str = "") -> dict[str, Any]:
        old = self._get(d, ns, name)
        if replace is not None:
            new = copy.deepcopy(replace)
        elif ctype == "application/json-patch+json":
            try:
                new = kp.json_patch(old, patch)
            except kp.PatchError as exc:
                raise _error(422, "Invalid", f"the JSON patch cannot be applied: {exc}") from exc
        elif ctype in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
            if not isinstance(patch, dict):
                raise _error(400, "BadRequest", "a merge patch must be a JSON object")
            wanted_rv = (patch.get("metadata") or {}).get("resourceVersion")
            if wanted_rv is not None and wanted_rv != old["metadata"]["resourceVersion"]:
                raise self._conflict(d, name)
            new = kp.merge_patch(old, kp.strip_directives(patch))
        else:
            raise _error(415, "UnsupportedMediaType", f"patch type {ctype!r} is not supported")
        if not isinstance(new, dict):
            raise _error(422, "Invalid", "the result is not an object")
        new_meta = new.setdefault("metadata", {})
        if replace is not None and new_meta.get("resourceVersion") not in (
                None, old["metadata"]["resourceVersion"]):
            raise self._conflict(d, name)
        # What the server owns cannot be changed by a write.
        for key in ("uid", "creationTimestamp", "name", "namespace", "deletionTimestamp",
                    "generation", "resourceVersion"):
            if key in old["metadata"]:
                new_meta[key] = old["metadata"][key]
            else:
                new_meta.pop(key, None)
        new["apiVersion"], new["kind"] = old["apiVersion"], old["kind"]
        if d.status_subresource and sub == "status":
            new = {**old, "status": new.get("status")}
        elif d.status_subresource:
            new = {**new, "status": old.get("status")}
        new = {k: v for k, v in new.items() if v is not None}
        new = self._validated(d, new)
        if new == old:
            return old  # a no-op write: no new resourceVersion, no event
        if _without(new, "metadata", "status") != _without(old, "metadata", "status"):
            new["metadata"]["generation"] = int(old["metadata"].get("generation", 1)) + 1
        self._stamp(new)
        self.store[(d.key, ns, name)] = new
        if new["metadata"].get("deletionTimestamp") and not new["metadata"].get("finalizers"):
            self._remove(d, ns, name)
            return new
        self._emit(d, "MODIFIED", new)
        return new

    def _conflict(self, d: ResourceDef, name: str) -> KubernetesError:
        return _error(409, "Conflict", f'Operation cannot be fulfilled on {d.plural} "{name}": '
                                       "the object has been modified; please apply your "
                                       "changes to the latest version and try again")

    def _delete(self, d: ResourceDef, ns: str | None, name: str,
                options: dict[str, Any]) -> dict[str, Any]:
        obj = self._get(d, ns, name)
        if obj["metadata"].get("finalizers"):
            if not obj["metadata"].get("deletionTimestamp"):
                obj = copy.deepcopy(obj)
                obj["metadata"]["deletionTimestamp"] = _now()
                obj["metadata"]["deletionGracePeriodSeconds"] = 0
                self._stamp(obj)
                self.store[(d.key, ns, name)] = obj
                self._emit(d, "MODIFIED", obj)
            return obj
        self._remove(d, ns, name, cascade=options.get("propagationPolicy") != "Orphan")
        return obj

    def _remove(self, d: ResourceDef, ns: str | None, name: str, cascade: bool = True) -> None:
        obj = self.store.pop((d.key, ns, name))
        self._stamp(obj)
        self._emit(d, "DELETED", obj)
        if not cascade:
            return
        uid = obj["metadata"]["uid"]
        # The garbage collector: dependents whose ownerReferences name the deleted uid
        # go once none of their owners is left (a shared object outlives one owner).
        live = {o["metadata"]["uid"] for o in self.store.values()}
        for (key, dep_ns, dep_name), dep in list(self.store.items()):
            refs = dep["metadata"].get("ownerReferences") or []
            if (any(r.get("uid") == uid for r in refs)
                    and not any(r.get("uid") in live for r in refs)
                    and (key, dep_ns, dep_name) in self.store):
                self._delete(self.defs[key], dep_ns, dep_name, {})

    # -- validation ----------------------------------------------------------------------------

    def _validated(self, d: ResourceDef, obj: dict[str, Any]) -> dict[str, Any]:
        if d.schema is not None:
            obj = kp.prune_and_default(obj, d.schema)
            validator = _draft4(json.dumps(d.schema, sort_keys=True))
            errors = [f"{'.'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message}"
                      for e in validator.iter_errors(obj)]
            errors += kp.list_map_errors(obj, d.schema)
        else:
            errors = [f"{'.'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message}"
                      for e in builtin_validator(d.api_version, d.kind).iter_errors(obj)]
        if errors:
            name = (obj.get("metadata") or {}).get("name")
            raise _error(422, "Invalid", f'{d.kind} "{name}" is invalid: ' + "; ".join(errors))
        return obj

    # -- watches -------------------------------------------------------------------------------

    async def _watch(self, raw: aiohttp.web.BaseRequest, d: ResourceDef,
                     ns: str | None) -> aiohttp.web.StreamResponse:
        params = raw.query
        watcher = _Watcher(d.key, ns, params.get("labelSelector"), params.get("fieldSelector"),
                           asyncio.Queue())
        since = params.get("resourceVersion") or ""
        if since not in ("", "0"):
            floor = self.log[0][0] if self.log else 0
            if int(since) < floor - 1:
                raise _error(410, "Expired", f"too old resource version: {since}")
            backlog = [ev for rv, key, ev in self.log
                       if rv > int(since) and watcher.wants(key, ev["object"])]
        else:
            backlog = [{"type": "ADDED", "object": copy.deepcopy(obj)}
                       for (key, obj_ns, _), obj in self.store.items()
                       if watcher.wants(key, obj)]
        for event in backlog:
            watcher.queue.put_nowait(event)
        self.watchers.append(watcher)  # no await since the snapshot: no event can be missed
        response = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
        loop = asyncio.get_running_loop()
        timeout = float(params.get("timeoutSeconds") or 3600)
        deadline = loop.time() + timeout
        try:
            await response.prepare(raw)
            while (left := deadline - loop.time()) > 0:
                if raw.transport is None or raw.transport.is_closing():
                    break
                try:
                    event = await asyncio.wait_for(watcher.queue.get(), min(left, 0.5))
                except TimeoutError:
                    continue
                await response.write(json.dumps(event).encode() + b"\n")
            await response.write_eof()
        except (ConnectionError, RuntimeError):
            pass  # the client went away
        finally:
            self.watchers.remove(watcher)
        return response


_DRAFT4: dict[str, Any] = {}


def _draft4(schema_json: str) -> Any:
    """A compiled Draft 4 validator per CRD schema (compiling costs more than validating)."""
    import jsonschema

    if schema_json not in _DRAFT4:
        _DRAFT4[schema_json] = jsonschema.Draft4Validator(kp.draft4_schema(json.loads(schema_json)))
    return _DRAFT4[schema_json]
