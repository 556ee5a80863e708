"""Local mode's async endpoints: their Redis, their workers' settings, backlog scaling.

Inside an endpoint's supervisor. For ``type: Async``:

* **Redis**: ``KUBEINFER_REDIS_URL`` from the environment of ``kubeinfer up``
  when set; otherwise a private ``redis-server`` (when on PATH) started by the
  supervisor in the endpoint's state directory, with an append-only file, so
  queued requests survive a supervisor restart. It is supervised
  (``private_redis``): a dead one is restarted on the same port from the same
  file, with backoff and events, and ``kubeinfer up`` again restarts it at once.
  Without either, the spec is not applied and the error says how to fix it.
* **Workers**: the variant's replicas run the runtime's ``async-worker`` role
  with the plan's queue env (``render.async_plan``) instead of model servers.
* **Scaling**: every ``interval_s`` the backlog is read from Redis and
  ``reconcile.async_scaling.decide`` (pure) says how many workers to run;
  starting and stopping them goes through the supervisor's scaler (the same
  start / ready / drain path as auto scaling), including to and from zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from dataclasses import replace
from typing import Any

from kubeinfer_operator.local.host import AsyncHost
from kubeinfer_operator.local.private_redis import PrivateRedis, RedisStartError
from kubeinfer_operator.local.process import free_port
from kubeinfer_operator.local.scaler import ReasonLog
from kubeinfer_operator.local.state import ProcessState, ProcState
from kubeinfer_operator.queue_backlog import read_backlog
from kubeinfer_operator.reconcile.async_scaling import BacklogState, decide
from kubeinfer_operator.render.async_plan import AsyncPlan
from kubeinfer_operator.render.plan import EndpointPlan
from kubeinfer_runtime.contract import AsyncBacklog, Role
from kubeinfer_runtime.contract.async_paths import carry_former_paths

log = logging.getLogger("kubeinfer.local")

#: Seconds between backlog reads (the scaling round).
INTERVAL_S = float(os.environ.get("KUBEINFER_ASYNC_SCALE_INTERVAL_S", "1"))
#: Workers must finish or release in-flight requests within the supervisor's
#: stop grace (10 s) after SIGTERM.
WORKER_DRAIN_S = 8.0
#: Seconds between checks that the private redis-server is alive.
REDIS_WATCH_S = 0.25


class AsyncConfigError(Exception):
    """The async endpoint cannot run here; the message says how to fix it."""


class AsyncLocal:
    def __init__(self, supervisor: AsyncHost, *, interval_s: float = INTERVAL_S) -> None:
        self.sup = supervisor
        self.interval_s = interval_s
        self.plan: AsyncPlan | None = None
        self.redis_url: str | None = None
        self.state = BacklogState()
        self.reasons = ReasonLog()
        self.redis: PrivateRedis | None = None
        self._client: Any = None

    # -- what the supervisor asks --------------------------------------------------------

    @property
    def role(self) -> Role:
        return Role.ASYNC_WORKER if self.plan is not None else Role.MODEL_SERVER

    @property
    def route_redis_url(self) -> str | None:
        """The Redis URL the route table names: the private server's, or None for one from
        ``KUBEINFER_REDIS_URL``, which the gateway inherits as env, so a password in it
        never lands in routes.json. The private server's password does: routes.json is
        in the user's private home, and the gateway's ``/routes`` redacts it."""
        return self.redis_url if self.redis is not None else None

    def worker_env(self) -> dict[str, str]:
        if self.plan is None:
            return {}
        return {**self.plan.worker_env(self.redis_url),
                "KUBEINFER_DRAIN_TIMEOUT_S": str(WORKER_DRAIN_S)}

    async def prepare(self, plan: EndpointPlan) -> EndpointPlan:
        """Make ``plan`` runnable: a Redis for an async plan; the plan with its URL (and
        the paths the workers ran with so far, for requests queued under them)."""
        if plan.async_config is not None and self.plan is not None:
            plan = replace(plan, async_config=replace(plan.async_config, former_paths=tuple(
                carry_former_paths((self.plan.output_path, self.plan.failure_path),
                                   list(self.plan.former_paths),
                                   (plan.async_config.output_path,
                                    plan.async_config.failure_path), time.time()))))
        self.plan = plan.async_config
        if plan.async_config is None:
            return plan
        if self.redis_url is None:
            self.redis_url = os.environ.get("KUBEINFER_REDIS_URL") or await self._start_redis()
        else:
            await self.watch_redis(force=True)  # `up` again: a dead Redis comes back now
        return replace(plan, redis_url=self.route_redis_url)

    def processes(self) -> list[ProcessState]:
        """What ``kubeinfer status`` lists besides the children: the private Redis."""
        return [self.redis.snapshot()] if self.redis is not None else []

    # -- private redis-server ------------------------------------------------------------

    async def _start_redis(self) -> str:
        exe = shutil.which("redis-server")
        if exe is None:
            raise AsyncConfigError(
                f"Endpoint {self.sup.name} is type Async and needs Redis: set "
                "KUBEINFER_REDIS_URL (redis://host:6379/0) before kubeinfer up, or install "
                "redis-server so kubeinfer starts a private one")
        server = PrivateRedis(exe, self.sup.paths.root / "redis",
                              self.sup.paths.log_file("redis"), free_port(), env=os.environ,
                              policy=self.sup.policy)
        try:
            await server.start()
        except RedisStartError as exc:
            await server.stop()
            raise AsyncConfigError(f"Endpoint {self.sup.name}: {exc}") from None
        self.redis = server
        self.sup.event(f"Started a private redis-server (pid {server.pid}) on {server.shown_url} "
                       f"for the async queue; data in {server.data}", process="redis")
        return server.url

    async def watch_redis(self, *, force: bool = False) -> None:
        """Restart the private redis-server when it died (after its backoff, or now)."""
        server = self.redis
        if server is None:
            return
        now = time.monotonic()
        report = server.collect_exit(now)
        if report:
            self.sup.event(report, level="error", process="redis")
        try:
            restarted = await server.restart_if_due(now, force=force)
        except RedisStartError as exc:
            self.sup.event(f"{exc}; trying again after a backoff", level="error",
                           process="redis")
            return
        if restarted:
            self.sup.event(restarted, process="redis")
            self.sup.write_state()

    async def stop(self) -> None:
        """After the workers stopped: close the client and stop the private Redis."""
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.aclose()
            self._client = None
        if self.redis is not None:
            await self.redis.stop()
        self.redis = None

    # -- scaling -------------------------------------------------------------------------

    async def backlog(self) -> AsyncBacklog:
        import redis.asyncio

        assert self.plan is not None and self.redis_url is not None
        if self._client is None:
            self._client = redis.asyncio.from_url(self.redis_url, decode_responses=True)
        return await read_backlog(self._client, self.plan.queue)

    async def run(self) -> None:
        watch = asyncio.create_task(self._watch_loop(), name="private-redis-watch")
        try:
            while True:
                await asyncio.sleep(self.interval_s)
                try:
                    await self.tick()
                except Exception:  # one bad round must not end scaling
                    log.exception("async scaling round failed")
        finally:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch

    async def _watch_loop(self) -> None:
        while True:
            await asyncio.sleep(REDIS_WATCH_S)
            if self.sup.stopping:
                continue  # shutdown stops it on purpose
            try:
                await self.watch_redis()
            except Exception:  # one bad round must not end supervision
                log.exception("private redis-server check failed")

    async def tick(self) -> None:
        sup = self.sup
        plan = self.plan
        if plan is None or self.redis_url is None or sup.applying or not sup.started:
            return
        if self.redis is not None and self.redis.state is not ProcState.READY:
            return  # no backlog to read while the private Redis restarts
        names = list(sup.running)
        if not names:
            return
        name = names[0]  # Async endpoints have exactly one variant
        backlog = await self.backlog()
        current = len(sup._variant_children(name, active=True))
        d = decide(plan.policy, current, backlog.total, self.state, time.monotonic())
        self.state = d.state
        if self.reasons.changes(name, current, d.desired, d.reason):
            await sup.scaler.scale(name, current, d.desired, d.reason)
