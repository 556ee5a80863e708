"""The supervisor of one local endpoint: runs its plan as processes and keeps them up.

One supervisor process per endpoint (``kubeinfer local supervise``, started by
``kubeinfer up``). It holds the endpoint's lock for its whole life, then:

* starts the gateway, and for each change of ``reconcile.local_diff`` starts,
  rolls, scales or stops model servers — new servers always become ready before
  the route table sends them traffic, and leave the table before they stop;
* every tick, collects crashed children (restarted with exponential backoff,
  reported in events.jsonl with their last log lines), health-checks every
  child's ``/ping`` (and a not-ready async worker's liveness: one that fails it
  is killed and restarted the same way), rewrites the route table when the set
  of ready model servers changed, and rewrites state.json when anything changed;
* every ``memory_interval_s``, measures each model server with a memory limit
  and SIGKILLs one that is over it, as the kernel OOM-kills a container: an
  ``OOMKilled`` event with the numbers, then the crash-restart path above;
* on SIGHUP (or when it notices a newer desired.json) applies the new spec;
* on SIGTERM / SIGINT stops every child (gateway first) and removes its state.

It is single-threaded asyncio on purpose: children are forked from the main
thread, which their parent-death signal is tied to (see ``process``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

import httpx
import orjson
from pydantic import ValidationError

from kubeinfer_operator.api.endpoint import ServerlessConfig, format_validation_error
from kubeinfer_operator.errors import SpecError
from kubeinfer_operator.local.async_local import AsyncConfigError, AsyncLocal
from kubeinfer_operator.local.backoff import BackoffPolicy
from kubeinfer_operator.local.children import LOAD_FAILED as LOAD_FAILED
from kubeinfer_operator.local.children import Child, ChildSpec, poll_until
from kubeinfer_operator.local.credentials import LocalAuthError, resolve_auth
from kubeinfer_operator.local.manifest import outbound_policy, parse_endpoint
from kubeinfer_operator.local.memory import Verdict, memory_limit, oom_event
from kubeinfer_operator.local.paths import EndpointPaths
from kubeinfer_operator.local.rollout import LocalRollouts
from kubeinfer_operator.local.scaler import LocalScaler, keep_scaled_replicas
from kubeinfer_operator.local.state import (
    ApplyResult,
    DesiredSpec,
    EndpointState,
    VariantState,
    append_event,
    process_start_time,
    read_desired,
    take_lock_file,
    write_state,
)
from kubeinfer_operator.local.view import summarize
from kubeinfer_operator.reconcile.local_diff import Change, ChangeKind, diff_plans
from kubeinfer_operator.reconcile.validate import outbound_problems
from kubeinfer_operator.render.plan import EndpointPlan, VariantPlan, plan_endpoint
from kubeinfer_runtime.contract import Role, RouteTable
from kubeinfer_runtime.contract.auth import AuthRoute
from kubeinfer_runtime.contract.capture import CaptureRoute
from kubeinfer_runtime.contract.outbound import OutboundPolicy
from kubeinfer_runtime.contract.redact import redact_urls

log = logging.getLogger("kubeinfer.local")

#: Exit status of a supervisor that found another one running for the endpoint.
EXIT_ALREADY_RUNNING = 3
#: How often model servers are measured against their memory limits (seconds;
#: 0 or less switches enforcement off). Reading /proc costs microseconds, in the
#: supervisor, never on a model server's request path.
MEMORY_INTERVAL_S = float(os.environ.get("KUBEINFER_LOCAL_MEMORY_INTERVAL_S", "0.5"))


def _outbound_policy() -> OutboundPolicy:
    """The policy from the environment; a bad allow-list refuses all it would have allowed.

    (``kubeinfer up`` refuses a bad KUBEINFER_OUTBOUND_ALLOW before starting us.)
    """
    try:
        return outbound_policy()
    except SpecError as exc:
        log.error("%s; outbound calls get no allow-list", exc)
        return OutboundPolicy.parse("")


class Supervisor:
    def __init__(self, paths: EndpointPaths, *, policy: BackoffPolicy | None = None,
                 tick_s: float = 0.2, idle_tick_s: float = 1.0, route_reload_s: float = 0.2,
                 health_interval_s: float = 0.5,
                 memory_interval_s: float = MEMORY_INTERVAL_S) -> None:
        self.paths = paths
        self.policy = policy or BackoffPolicy()
        #: Monitor period while something changes (apply, a child not ready) ...
        self.tick_s = tick_s
        #: ... and while all is quiet: fewer health checks on an idle laptop.
        self.idle_tick_s = idle_tick_s
        self.route_reload_s = route_reload_s
        self.health_interval_s = health_interval_s
        self.memory_interval_s = memory_interval_s
        self.children: list[Child] = []
        self.gateway: Child | None = None
        #: ``spec.dataCapture`` as the gateway gets it (route table), None: off.
        self.capture: CaptureRoute | None = None
        #: Variants the route table serves, by name, and their order in the spec.
        self.running: dict[str, VariantPlan] = {}
        self.order: list[str] = []
        self.namespace: str | None = None
        self.serverless: ServerlessConfig | None = None
        self.generation = 0
        self.observed = 0
        self.last_apply: ApplyResult | None = None
        self.applying = False
        self.started = False
        self.stopping = False
        self._reload = asyncio.Event()
        self._stop = asyncio.Event()
        self._routes_json: str | None = None
        self._state_json: str | None = None
        self._lock_fd: int | None = None
        self._own_start_time = process_start_time(os.getpid())
        #: True when the gateway's ``GET /routes`` shows the table last written.
        self.gateway_synced = False
        self._client: httpx.AsyncClient | None = None
        #: Where spec URLs may point (KUBEINFER_OUTBOUND_ALLOW of ``kubeinfer up``).
        self.outbound = _outbound_policy()
        #: Auto scaling and serverless scale-to-zero (idle unless the spec asks).
        self.scaler = LocalScaler(self)
        #: Async endpoints: Redis, worker settings, backlog scaling.
        self.async_local = AsyncLocal(self)
        #: How the gateway authenticates callers (None: it does not; local default).
        self.auth_route: AuthRoute | None = None
        #: Deployment guardrails (spec.deploymentConfig): blue/green and rolling rollouts.
        self.rollouts = LocalRollouts(self)

    # -- helpers ---------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.paths.name

    @property
    def grace_s(self) -> float:
        """Fallback wait for the gateway to re-read the route table (it polls every
        ``route_reload_s``) when its ``/routes`` cannot be asked."""
        return 2 * self.route_reload_s + 0.3

    def event(self, message: str, *, level: str = "info", process: str | None = None) -> None:
        getattr(log, "error" if level == "error" else "info")(message)
        with contextlib.suppress(OSError):
            append_event(self.paths, message, level=level, process=process)

    def _variant_children(self, variant: str, *, active: bool | None = None) -> list[Child]:
        return [c for c in self.children if c.spec.variant == variant and c.wanted
                and (active is None or c.active is active)]

    def _server_child(self, plan: VariantPlan, replica: int) -> Child:
        name = f"{plan.name}-{replica}"
        spec = ChildSpec(
            name=name, role=self.async_local.role,
            env={**plan.server_env(self.name),
                 "KUBEINFER_MODEL_CACHE_DIR": str(self.paths.root / "cache"),
                 **self.async_local.worker_env()},
            log_path=self.paths.log_file(f"{name}-{plan.server_hash[:8]}"),
            variant=plan.name, replica=replica, server_hash=plan.server_hash,
            # KUBEINFER_LOCAL_MEMORY_INTERVAL_S=0 turns enforcement off altogether.
            memory_limit=memory_limit(dict(plan.limits), self.serverless.memory
                                      if self.serverless else None)
            if self.memory_interval_s > 0 else None,
        )
        child = Child(spec, launcher=self.scaler.launcher())
        child.start()
        self.children.append(child)
        log.info("started %s (pid %s) on port %s", name, child.pid, child.port)
        return child

    def _start_gateway(self, port: int | None) -> None:
        spec = ChildSpec(
            name="gateway", role=Role.GATEWAY,
            env={"KUBEINFER_ROUTE_TABLE_PATH": str(self.paths.routes),
                 "KUBEINFER_ROUTE_RELOAD_INTERVAL_S": str(self.route_reload_s),
                 "KUBEINFER_HEALTH_INTERVAL_S": str(self.health_interval_s),
                 **({"KUBEINFER_SCALER_URL": self.scaler.url,
                     "KUBEINFER_SCALER_TOKEN": self.scaler.token} if self.scaler.url else {})},
            log_path=self.paths.log_file("gateway"),
        )
        self.gateway = Child(spec)
        self.gateway.start(port=port)
        self.children.append(self.gateway)
        log.info("started gateway (pid %s) on port %s", self.gateway.pid, self.gateway.port)

    # -- route table and state -------------------------------------------------------------

    def current_plan(self) -> EndpointPlan:
        names = [n for n in self.order if n in self.running]
        names += [n for n in self.running if n not in names]
        return EndpointPlan(name=self.name, namespace=self.namespace,
                            generation=self.generation,
                            variants=tuple(self.running[n] for n in names),
                            type="Serverless" if self.serverless else "RealTime",
                            serverless=self.serverless,
                            async_config=self.async_local.plan,
                            redis_url=self.async_local.route_redis_url,
                            capture=self.capture,
                            guarded=self.rollouts.config is not None)

    def rolling_out(self, variant: str) -> bool:
        return self.rollouts.active(variant)

    def sync_routes(self) -> None:
        """Route every ready, active server of a running variant; write the table if changed."""
        upstreams: dict[str, list[str]] = {}
        # A variant under a guarded rollout is routed as its two fleets (``local.rollout``).
        plan = self.rollouts.expand(self.current_plan())
        fleets = {v.name for v in plan.variants}
        for child in self.children:
            variant = child.spec.variant
            # Async workers take no traffic from the gateway but count as serving.
            routed = (child.spec.role in (Role.MODEL_SERVER, Role.ASYNC_WORKER) and child.active
                      and child.ready and variant in fleets)
            child.routed = routed
            if routed and variant is not None and child.spec.role is Role.MODEL_SERVER:
                upstreams.setdefault(variant, []).append(child.url)
        table = plan.route_table(upstreams, auth=self.auth_route)
        text = table.to_json()
        if text != self._routes_json:
            table.write_atomic(self.paths.routes)
            self._routes_json = text

    def snapshot(self) -> EndpointState:
        # The private redis-server of an async endpoint is listed (and judged) too.
        procs = [c.snapshot() for c in self.children] + self.async_local.processes()
        variants = []
        for plan in self.rollouts.expand(self.current_plan()).variants:
            ready = sum(1 for c in self.children if c.spec.variant == plan.name and c.routed)
            variants.append(VariantState(name=plan.name, weight=plan.weight,
                                         replicas=plan.replicas, ready=ready,
                                         model_uri=plan.model_uri,
                                         server_hash=plan.server_hash,
                                         last_scaling=self.scaler.last_scaling(plan.name)))
        gateway = self.gateway.snapshot() if self.gateway else None
        summary = summarize(gateway=gateway, variants=variants, processes=procs,
                            applying=self.applying, started=self.started,
                            stopping=self.stopping, gateway_synced=self.gateway_synced,
                            apply_error="" if self.last_apply is None or self.last_apply.ok
                            else self.last_apply.message)
        return EndpointState(
            endpoint=self.name, supervisor_pid=os.getpid(),
            supervisor_start_time=self._own_start_time,
            url=self.gateway.url if self.gateway else None, phase=summary.phase,
            message=summary.message, generation=self.generation,
            observed_generation=self.observed, last_apply=self.last_apply,
            variants=variants, processes=procs, rollouts=self.rollouts.status(),
        )

    def write_state(self) -> None:
        state = self.snapshot()
        text = state.model_dump_json()
        if text != self._state_json:
            state.updated_at = time.time()
            write_state(self.paths, state)
            self._state_json = text

    # -- the gateway's view ----------------------------------------------------------------

    async def check_gateway_synced(self, client: httpx.AsyncClient) -> bool:
        """Whether the gateway routes with the table last written (its ``GET /routes``)."""
        gateway = self.gateway
        if gateway is None or not gateway.ready or self._routes_json is None:
            self.gateway_synced = False
            return False
        try:
            response = await client.get(gateway.url + "/routes", timeout=2.0)
            served = response.json().get("table") if response.status_code == 200 else None
            # /routes redacts URLs (the private Redis's password), so ours is compared
            # redacted too.
            synced = served is not None and (
                RouteTable.model_validate(served) == RouteTable.model_validate(
                    redact_urls(orjson.loads(self._routes_json))))
        except (httpx.HTTPError, ValueError, AttributeError):
            synced = False
        self.gateway_synced = synced
        return synced

    async def wait_gateway_synced(self, limit_s: float = 5.0) -> bool:
        """Wait (bounded) until the gateway serves the table last written."""
        client = self._client
        if client is None:
            await asyncio.sleep(self.grace_s)
            return False
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            if await self.check_gateway_synced(client):
                return True
            await asyncio.sleep(self.route_reload_s / 2)
        log.warning("gateway did not load the new route table within %ss", limit_s)
        return False

    # -- monitoring ------------------------------------------------------------------------

    def collect_exits(self, now: float) -> None:
        """Schedule the restart of every child that exited on its own, and report it."""
        for child in list(self.children):
            report = child.collect_exit(self.policy, now)
            if report:
                self.event(report, level="error", process=child.name)

    async def monitor_once(self, client: httpx.AsyncClient) -> None:
        now = time.monotonic()
        self.collect_exits(now)
        for child in list(self.children):
            if child.restart_if_due(now):
                self.event(f"Restarted {child.name} (restart {child.restarts}) as pid "
                           f"{child.pid} on port {child.port}", process=child.name)
        before = {id(c): c.ready for c in self.children}
        await asyncio.gather(*(c.check(client) for c in list(self.children)))
        killed = [c for c in self.children if c.unreported_kill is not None]
        for child in killed:
            assert child.unreported_kill is not None
            self.report_oom(child, child.unreported_kill)
            child.unreported_kill = None
        unlive = [c for c in self.children if c.unreported_liveness is not None]
        for child in unlive:
            self.event(f"Process {child.name} (pid {child.pid}) failed its liveness probe "
                       f"({child.unreported_liveness}): killed, to be restarted",
                       level="error", process=child.name)
            child.unreported_liveness = None
        if killed or unlive:
            await self.after_kills(killed + unlive)
        for child in self.children:
            if not child.ready or before.get(id(child), False):
                continue
            if child.restarts:
                self.event(f"Process {child.name} is ready again after {child.restarts} "
                           "restart(s)", process=child.name)
            else:
                log.info("%s (pid %s) is ready", child.name, child.pid)
        self.sync_routes()
        await self.check_gateway_synced(client)
        self.write_state()

    async def monitor(self, client: httpx.AsyncClient) -> None:
        while True:
            try:
                await self.monitor_once(client)
            except Exception:  # one bad tick must not end supervision
                log.exception("monitor tick failed")
            busy = self.applying or not self.gateway_synced or any(
                not c.ready for c in self.children if c.wanted)
            await asyncio.sleep(self.tick_s if busy else self.idle_tick_s)

    async def enforce_memory_once(self) -> list[Child]:
        """OOM-kill every model server over its memory limit; the children killed."""
        killed = []
        for child in list(self.children):
            verdict = child.check_memory()
            if verdict.kill:
                killed.append(child)
                self.report_oom(child, verdict)
        if killed:
            await self.after_kills(killed)
        return killed

    def report_oom(self, child: Child, verdict: Verdict) -> None:
        self.event(oom_event(verdict, process=child.name, variant=child.spec.variant,
                             replica=child.spec.replica),
                   level="error", process=child.name)

    async def after_kills(self, killed: list[Child]) -> None:
        # Take them out of the route table now, not at the next monitor tick:
        # SIGKILL takes effect at once, the exit status a moment later.
        await poll_until(lambda: all(not c.running for c in killed), 2.0)
        self.collect_exits(time.monotonic())
        self.sync_routes()
        self.write_state()

    async def watch_memory(self) -> None:
        while True:
            try:
                await self.enforce_memory_once()
            except Exception:  # one bad round must not end enforcement
                log.exception("memory limit check failed")
            await asyncio.sleep(self.memory_interval_s)

    # -- applying a spec -------------------------------------------------------------------

    async def wait_ready(self, children: list[Child], deadline: float, timeout_s: float,
                         label: str) -> str | None:
        """None once every child is ready, else why not (timeout or crash loop)."""
        while True:
            if all(c.ready for c in children):
                return None
            for c in children:
                failure = c.failure()
                if failure is not None:
                    return f"{label}: {failure}"
            if time.monotonic() >= deadline:
                waiting = [c for c in children if not c.ready]
                detail = "; ".join(f"{c.name}: {c.reason or c.state.value}" for c in waiting)
                return f"{label}: not ready after {timeout_s:g}s ({detail})"
            await asyncio.sleep(self.tick_s / 2)

    async def drain(self, children: list[Child]) -> None:
        for c in children:
            c.active = False
        self.sync_routes()
        # Stop only once the gateway no longer sends them new requests; the
        # graceful stop then lets in-flight ones finish.
        await self.wait_gateway_synced()
        await asyncio.gather(*(c.stop() for c in children))
        self.children = [c for c in self.children if c not in children]

    async def start_and_route(self, name: str, plan: VariantPlan, replicas: Iterable[int],
                              wait: Callable[[list[Child]], Awaitable[str | None]]) -> str | None:
        """Start the model servers ``replicas`` (indexes) of variant ``name`` under ``plan``
        and ``wait`` for them; once ready, ``plan`` becomes the running one and the gateway
        routes to them. Else they are stopped and the error says why.

        Rollouts (``apply_change``) and the scaler's scale-out share it; they differ
        only in how they wait (a rollout's deadline, the cold-start poll).
        """
        fresh = [self._server_child(plan, i) for i in replicas]
        error = await wait(fresh)
        if error:
            await asyncio.gather(*(c.stop() for c in fresh))
            self.children = [c for c in self.children if c not in fresh]
            return error
        self.running[name] = plan
        for c in fresh:
            c.active = True
        self.sync_routes()
        return None

    async def apply_change(self, change: Change, deadline: float, timeout_s: float) -> str | None:
        """Carry out one variant change; None on success, else why it was not done."""
        name = change.variant
        new = change.new
        if change.kind is ChangeKind.REMOVE:
            self.running.pop(name, None)
            await self.drain(self._variant_children(name))
            return None
        assert new is not None
        if change.kind is ChangeKind.REWEIGHT:
            self.running[name] = new
            self.sync_routes()
            return None

        async def until_ready(fresh: list[Child]) -> str | None:
            return await self.wait_ready(fresh, deadline, timeout_s, f"variant {name}")

        if change.kind in (ChangeKind.ADD, ChangeKind.ROLL):
            old = self._variant_children(name, active=True)
            error = await self.start_and_route(name, new, range(new.replicas), until_ready)
            if error is None and old:
                await self.drain(old)
            return error
        # SCALE: only the replicas above the smaller count start or stop.
        current = self._variant_children(name, active=True)
        if new.replicas > len(current):
            return await self.start_and_route(name, new, range(len(current), new.replicas),
                                              until_ready)
        self.running[name] = new
        extra = [c for c in current if (c.spec.replica or 0) >= new.replicas]
        await self.drain(extra)
        return None

    async def apply(self, desired: DesiredSpec) -> None:
        self.generation = desired.generation
        self.applying = True
        changes: list[Change] = []
        errors: list[str] = []
        try:
            try:
                endpoint = parse_endpoint(desired.manifest)
            except ValidationError as exc:
                errors.append(f"Endpoint {self.name} is invalid: "
                              + format_validation_error(exc).replace("\n", "; "))
                return
            refused = outbound_problems(endpoint.spec, self.outbound)
            if refused:
                errors.append(f"Endpoint {self.name} is invalid: " + "; ".join(refused))
                return
            if endpoint.name != self.name:
                errors.append(f"metadata.name: {endpoint.name!r} was handed to the supervisor "
                              f"of {self.name!r}; run kubeinfer up again")
                return
            new_plan = plan_endpoint(endpoint, base_dir=desired.base_dir,
                                     generation=desired.generation)
            old_plan = self.current_plan() if self.started else None
            new_plan = keep_scaled_replicas(old_plan, new_plan)
            try:
                new_plan = await self.async_local.prepare(new_plan)
                self.auth_route = resolve_auth(self.name, new_plan.auth)
            except (AsyncConfigError, LocalAuthError) as exc:
                errors.append(str(exc))
                return
            changes = diff_plans(old_plan, new_plan)
            self.rollouts.config = endpoint.spec.deploymentConfig
            carried = self.rollouts.split(changes, new_plan)
            self.namespace = new_plan.namespace
            self.serverless = new_plan.serverless
            self.capture = new_plan.capture
            self.order = [v.name for v in new_plan.variants]
            deadline = time.monotonic() + desired.timeout_s
            for change in changes:
                self.event(f"Applying generation {desired.generation}: {change.describe()}")
            # Capacity first (in parallel across variants), removals last.
            first = [c for c in carried if c.kind is not ChangeKind.REMOVE]
            last = [c for c in carried if c.kind is ChangeKind.REMOVE]
            for batch in (first, last):
                results = await asyncio.gather(
                    *(self.apply_change(c, deadline, desired.timeout_s) for c in batch))
                errors += [r for r in results if r]
            if self.rollouts.targets:  # guarded rollouts start now, then step on their own
                await self.rollouts.step_all()
            self.sync_routes()
            # `up` reports success only once the gateway routes with the new table.
            await self.wait_gateway_synced(limit_s=max(5.0, desired.timeout_s / 4))
        except asyncio.CancelledError:
            errors.append("interrupted: the supervisor is stopping")
            raise
        finally:
            self.applying = False
            self.started = True
            self.observed = desired.generation
            message = "; ".join(errors)
            self.last_apply = ApplyResult(generation=desired.generation, ok=not errors,
                                          message=message,
                                          changes=[c.describe() for c in changes])
            if errors:
                self.event(f"Generation {desired.generation} not fully applied: {message}",
                           level="error")
            else:
                self.event(f"Generation {desired.generation} applied"
                           + ("" if changes else " (no change)"))
            self.write_state()

    # -- lifecycle -------------------------------------------------------------------------

    def acquire_lock(self) -> bool:
        self.paths.root.mkdir(parents=True, exist_ok=True)
        self._lock_fd = take_lock_file(self.paths.lock)
        return self._lock_fd is not None

    async def run(self) -> int:
        if not self.acquire_lock():
            log.error("Endpoint %s already has a running supervisor; use kubeinfer up to "
                      "update it or kubeinfer down to stop it", self.name)
            return EXIT_ALREADY_RUNNING
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self._reload.set)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        desired = read_desired(self.paths)
        if desired is None:
            log.error("No readable desired spec at %s; start endpoints with kubeinfer up",
                      self.paths.desired)
            return 2
        self.paths.routes.unlink(missing_ok=True)
        await self.scaler.start_server()
        self._start_gateway(desired.gateway_port)
        self.sync_routes()
        self.write_state()
        self.event(f"Supervisor started (pid {os.getpid()}); gateway on {self.gateway_url}")
        async with httpx.AsyncClient(trust_env=False) as client:
            self._client = client
            monitor = asyncio.create_task(self.monitor(client))
            scaler = asyncio.create_task(self.scaler.run(client))
            async_scaler = asyncio.create_task(self.async_local.run())
            rollouts = asyncio.create_task(self.rollouts.run())
            tasks = [rollouts, async_scaler, scaler, monitor]
            if self.memory_interval_s > 0:
                tasks.insert(0, asyncio.create_task(self.watch_memory()))
            try:
                await self._serve()
            finally:
                for task in tasks:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                await self.scaler.stop_server()
                self._client = None
                await self.shutdown()
        return 0

    @property
    def gateway_url(self) -> str:
        return self.gateway.url if self.gateway else "(none)"

    async def _serve(self) -> None:
        """Apply newer desired specs until asked to stop."""
        stop_wait = asyncio.create_task(self._stop.wait())
        try:
            while not self._stop.is_set():
                desired = read_desired(self.paths)
                if desired is not None and desired.generation > self.generation:
                    # The scaler never starts or stops servers while a spec applies.
                    async with self.scaler.lock:
                        apply = asyncio.create_task(self.apply(desired))
                        await asyncio.wait({apply, stop_wait},
                                           return_when=asyncio.FIRST_COMPLETED)
                        if not apply.done():
                            apply.cancel()
                            with contextlib.suppress(asyncio.CancelledError):
                                await apply
                    continue
                self._reload.clear()
                # SIGHUP wakes us at once; the timeout catches a signal sent before
                # the handler existed.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._reload.wait(), timeout=1.0)
        finally:
            stop_wait.cancel()

    async def shutdown(self) -> None:
        self.stopping = True
        self.event("Stopping: gateway first, then every model server")
        with contextlib.suppress(OSError):
            self.write_state()
        if self.gateway is not None:
            await self.gateway.stop()
        await asyncio.gather(*(c.stop() for c in self.children if c is not self.gateway))
        await self.async_local.stop()  # after the workers: they drain into it
        for path in (self.paths.state, self.paths.routes, self.paths.desired):
            path.unlink(missing_ok=True)
        self.event("Stopped")


def run_supervisor(state_dir: Path) -> int:
    """Run one endpoint's supervisor until SIGTERM; logs go to stderr (the supervisor log)."""
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # One line per health check would drown what matters.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    paths = EndpointPaths(state_dir)
    return asyncio.run(Supervisor(paths).run())


def main(argv: list[str] | None = None) -> int:
    """``python -m kubeinfer_operator.local.supervisor --state-dir DIR``.

    ``kubeinfer up`` starts supervisors this way rather than through the CLI
    (``kubeinfer local supervise``, same thing) to skip importing typer and rich.
    """
    parser = argparse.ArgumentParser(prog="kubeinfer-local-supervisor")
    parser.add_argument("--state-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    return run_supervisor(args.state_dir)


if __name__ == "__main__":
    sys.exit(main())
