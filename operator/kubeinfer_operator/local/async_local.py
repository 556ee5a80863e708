"""Local mode's async endpoints: their Redis, their workers' settings, backlog scaling.

Inside an endpoint's supervisor. For ``type: Async``:

* **Redis**: ``KUBEINFER_REDIS_URL`` from the environment of ``kubeinfer up``
  when set; otherwise a private ``redis-server`` (when on PATH) started by the
  supervisor in the endpoint's state directory, with an append-only file, so
  queued requests survive a supervisor restart. Without either, the spec is
  not applied and the error says how to fix it.
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
import signal
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from kubeinfer_operator.local.process import free_port, spawn
from kubeinfer_operator.local.scaler import ReasonLog
from kubeinfer_operator.queue_backlog import read_backlog
from kubeinfer_operator.reconcile.async_scaling import BacklogState, decide
from kubeinfer_operator.render.async_plan import AsyncPlan
from kubeinfer_operator.render.plan import EndpointPlan
from kubeinfer_runtime.contract import AsyncBacklog, Role

if TYPE_CHECKING:
    import subprocess

    from kubeinfer_operator.local.supervisor import Supervisor

log = logging.getLogger("kubeinfer.local")

#: Seconds between backlog reads (the scaling round).
INTERVAL_S = float(os.environ.get("KUBEINFER_ASYNC_SCALE_INTERVAL_S", "1"))
#: Workers must finish or release in-flight requests within the supervisor's
#: stop grace (10 s) after SIGTERM.
WORKER_DRAIN_S = 8.0


class AsyncConfigError(Exception):
    """The async endpoint cannot run here; the message says how to fix it."""


class AsyncLocal:
    def __init__(self, supervisor: Supervisor, *, interval_s: float = INTERVAL_S) -> None:
        self.sup = supervisor
        self.interval_s = interval_s
        self.plan: AsyncPlan | None = None
        self.redis_url: str | None = None
        self.state = BacklogState()
        self.reasons = ReasonLog()
        self._redis_proc: subprocess.Popen[bytes] | None = None
        self._client: Any = None

    # -- what the supervisor asks --------------------------------------------------------

    @property
    def role(self) -> Role:
        return Role.ASYNC_WORKER if self.plan is not None else Role.MODEL_SERVER

    @property
    def route_redis_url(self) -> str | None:
        """The Redis URL the route table names: the private server's (no password), or
        None for one from ``KUBEINFER_REDIS_URL``, which the gateway inherits as env, so a
        password in it never lands in routes.json."""
        return self.redis_url if self._redis_proc is not None else None

    def worker_env(self) -> dict[str, str]:
        if self.plan is None:
            return {}
        return {**self.plan.worker_env(self.redis_url),
                "KUBEINFER_DRAIN_TIMEOUT_S": str(WORKER_DRAIN_S)}

    async def prepare(self, plan: EndpointPlan) -> EndpointPlan:
        """Make ``plan`` runnable: a Redis for an async plan; the plan with its URL."""
        self.plan = plan.async_config
        if plan.async_config is None:
            return plan
        if self.redis_url is None:
            self.redis_url = os.environ.get("KUBEINFER_REDIS_URL") or await self._start_redis()
        return replace(plan, redis_url=self.route_redis_url)

    # -- private redis-server ------------------------------------------------------------

    async def _start_redis(self) -> str:
        exe = shutil.which("redis-server")
        if exe is None:
            raise AsyncConfigError(
                f"Endpoint {self.sup.name} is type Async and needs Redis: set "
                "KUBEINFER_REDIS_URL (redis://host:6379/0) before kubeinfer up, or install "
                "redis-server so kubeinfer starts a private one")
        data = self.sup.paths.root / "redis"
        data.mkdir(parents=True, exist_ok=True)
        port = free_port()
        # Append-only file, fsynced every second: queued requests survive a restart.
        self._redis_proc = spawn(
            [exe, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(data),
             "--appendonly", "yes", "--appendfsync", "everysec", "--save", ""],
            env=os.environ, log_path=self.sup.paths.log_file("redis"))
        url = f"redis://127.0.0.1:{port}/0"
        import redis.asyncio

        client = redis.asyncio.from_url(url)
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    await client.ping()
                    break
                except Exception:
                    if self._redis_proc.poll() is not None or time.monotonic() > deadline:
                        raise AsyncConfigError(
                            f"Private redis-server for endpoint {self.sup.name} did not start; "
                            f"see {self.sup.paths.log_file('redis')}") from None
                    await asyncio.sleep(0.02)
        finally:
            await client.aclose()
        self.sup.event(f"Started a private redis-server (pid {self._redis_proc.pid}) on "
                       f"{url} for the async queue; data in {data}")
        return url

    async def stop(self) -> None:
        """After the workers stopped: close the client and stop the private Redis."""
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.aclose()
            self._client = None
        proc = self._redis_proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            for _ in range(250):
                if proc.poll() is not None:
                    break
                await asyncio.sleep(0.02)
            else:
                proc.kill()
        self._redis_proc = None

    # -- scaling -------------------------------------------------------------------------

    async def backlog(self) -> AsyncBacklog:
        import redis.asyncio

        assert self.plan is not None and self.redis_url is not None
        if self._client is None:
            self._client = redis.asyncio.from_url(self.redis_url, decode_responses=True)
        return await read_backlog(self._client, self.plan.queue)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.tick()
            except Exception:  # one bad round must not end scaling
                log.exception("async scaling round failed")

    async def tick(self) -> None:
        sup = self.sup
        plan = self.plan
        if plan is None or self.redis_url is None or sup.applying or not sup.started:
            return
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
