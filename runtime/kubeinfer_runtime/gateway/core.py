"""The gateway's shared state: route table in force, upstream health, connections.

One ``GatewayCore`` per process. The hot path (``proxy``) reads ``routes`` and
``health.down``; the background loops (``loops``) replace ``routes`` and update
health. Replacing ``routes`` is a single attribute assignment: a request that
already holds the old ``RouteState`` finishes with it, so a reload never drops
or fails an in-flight request.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

from kubeinfer_runtime.contract import GatewaySettings, RouteTable
from kubeinfer_runtime.contract.auth import AuthMode
from kubeinfer_runtime.gateway import discovery, recorder
from kubeinfer_runtime.gateway.auth import Authenticator
from kubeinfer_runtime.gateway.capture_writer import CaptureTaps
from kubeinfer_runtime.gateway.credentials import CallerCredentials, CredentialsDirectory
from kubeinfer_runtime.gateway.health import HealthTable
from kubeinfer_runtime.gateway.routefile import Outcome, PollResult, RouteTableFile
from kubeinfer_runtime.gateway.routing import RouteState, compile_table
from kubeinfer_runtime.gateway.shadow import ShadowTaps
from kubeinfer_runtime.gateway.shedding import ShedPolicy
from kubeinfer_runtime.gateway.upstream import UpstreamClient

log = logging.getLogger("kubeinfer.gateway")


def _no_credentials() -> CallerCredentials | None:
    return None


class GatewayCore:
    def __init__(self, settings: GatewaySettings, *, rng: random.Random | None = None) -> None:
        self.settings = settings
        self.routes = RouteState()
        self.table: RouteTable | None = None
        self.health = HealthTable()
        self.client = UpstreamClient(max_idle=settings.upstream_pool_size,
                                     max_response_bytes=settings.max_response_bytes)
        self.rng = rng or random.Random()
        #: Default admission bounds of real-time variants (None: admission off).
        self.admission = (ShedPolicy(
            target_latency_s=settings.admission_target_latency_s,
            floor_per_upstream=settings.admission_floor_per_upstream,
            max_wait_s=settings.admission_max_wait_s,
            queue_per_upstream=settings.admission_queue_per_upstream,
            max_queue_bytes=settings.admission_max_queue_bytes)
            if settings.admission else None)
        self.source = RouteTableFile(Path(settings.route_table_path))
        self._announced_missing = False
        #: DNS upstream URL -> pod URLs last resolved (``discovery: dns`` variants).
        self.resolved: dict[str, tuple[str, ...]] = {}
        #: Endpoint name -> how its callers are checked (endpoints with auth only).
        self.auth: dict[str, Authenticator] = {}
        self._credentials: dict[str, CredentialsDirectory] = {}
        self._authenticators: dict[tuple[str, str | None, tuple[str, ...]], Authenticator] = {}
        #: Data capture: a tap provider (see ``gateway.taps``); its upload loop runs
        #: while the app serves.
        self.capture = CaptureTaps(settings)
        #: Shadow variants and mirrors: a tap provider (``gateway.shadow``) whose workers
        #: send copies with their own connections.
        self.shadows = ShadowTaps(rng=self.rng, max_response_bytes=settings.max_response_bytes)

    async def rediscover(self) -> list[str]:
        """Re-resolve the table's DNS upstreams; re-apply it when the pods changed."""
        if self.table is None:
            return []
        urls = discovery.dns_upstreams(self.table)
        if not urls and not self.resolved:
            return []
        fresh = await discovery.resolve_all(urls, self.resolved)
        if fresh == self.resolved:
            return []
        log.info("Model server pods changed: %s", ", ".join(
            f"{url} -> {len(pods)} pod(s)" for url, pods in sorted(fresh.items())))
        self.resolved = fresh
        return self.apply(self.table)

    def apply(self, table: RouteTable) -> list[str]:
        """Put ``table`` in force; returns upstreams not tracked before (to check now)."""
        expanded = discovery.expand(table, self.resolved)
        routes = compile_table(expanded, self.admission)
        upstreams = routes.upstreams()
        added = self.health.track(upstreams)
        self.auth = self._auth_of(table)
        # Taps are set before the routes go live: no request sees an endpoint without them.
        # Capture first: a shadow tap reads whether capture sampled the same exchange.
        for name, taps in self.capture.apply(table).items():
            endpoint = routes.endpoints.get(name)
            if endpoint is not None:
                endpoint.taps = taps
        for name, taps in self.shadows.apply(expanded, routes, self.capture.taps).items():
            endpoint = routes.endpoints.get(name)
            if endpoint is not None:
                endpoint.taps = (*endpoint.taps, *taps)
        self.routes = routes
        self.table = table
        self.client.forget(upstreams)
        recorder.route_table_loaded(table.revision)
        return added

    def _auth_of(self, table: RouteTable) -> dict[str, Authenticator]:
        """Each endpoint's authenticator, reusing those whose settings did not change (they
        hold the credentials directory being watched and the signing-key cache)."""
        out: dict[str, Authenticator] = {}
        for route in table.endpoints.values():
            auth = route.auth
            if auth is None or auth.mode is AuthMode.NONE:
                continue
            key = (auth.mode.value, auth.credentials_dir, tuple(sorted(auth.regions)))
            authenticator = self._authenticators.get(key)
            if authenticator is None:
                source = None
                if auth.credentials_dir:
                    source = self._credentials.get(auth.credentials_dir)
                    if source is None:
                        source = CredentialsDirectory(Path(auth.credentials_dir))
                        self._credentials[auth.credentials_dir] = source
                authenticator = Authenticator(
                    auth.mode, source.current if source is not None else _no_credentials,
                    regions=frozenset(auth.regions) or None)
                self._authenticators[key] = authenticator
                log.info("Endpoint %s authenticates callers with %s (credentials in %s)",
                         route.name, auth.mode.value, auth.credentials_dir or "(none)")
            out[route.name] = authenticator
        return out

    def reload(self) -> list[str]:
        """Poll the route-table file once; apply and log what changed."""
        result = self.source.poll()
        return self._handle(result)

    def _handle(self, result: PollResult) -> list[str]:
        path = self.source.path
        if result.outcome is Outcome.LOADED:
            assert result.table is not None
            added = self.apply(result.table)
            self._announced_missing = False
            log.info("Loaded route table %s revision %d: %d endpoint(s)", path,
                     result.table.revision, len(result.table.endpoints))
            return added
        if result.outcome is Outcome.INVALID:
            recorder.route_table_rejected()
            kept = (f"keeping revision {self.table.revision}" if self.table
                    else "no endpoint is served until it is fixed")
            log.error("Route table %s is invalid, %s: %s: fix the file (the operator renders "
                      "it from the Endpoint spec)", path, kept, result.error)
        elif result.outcome is Outcome.MISSING and not self._announced_missing:
            self._announced_missing = True
            if self.table is None:
                log.warning("Route table %s does not exist yet: every endpoint answers 404 "
                            "until it appears", path)
            else:
                log.warning("Route table %s disappeared: keeping revision %d", path,
                            self.table.revision)
        return []
