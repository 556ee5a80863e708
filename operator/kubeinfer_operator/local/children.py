"""One supervised runtime process (gateway or model-server replica) and its health.

A ``Child`` keeps what the supervisor knows about one process: its port (kept
across restarts while free, so route tables stay short-lived), its state, why
it is not ready, how often it crashed. Starting and health-checking are the
only I/O here; decisions (when to restart) come from ``backoff``. An async
worker that is not ready is also asked its liveness, as the kubelet does: one
that fails it (stuck for good) is killed and restarted like a crashed one.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from kubeinfer_operator.local.backoff import BackoffPolicy, CrashRecord, on_crash, restart_due
from kubeinfer_operator.local.memory import (
    OOM_KILLED,
    MemoryLimit,
    Verdict,
    judge,
    termination_reason,
)
from kubeinfer_operator.local.prefork import Adopted
from kubeinfer_operator.local.process import (
    free_port,
    group_alive,
    port_free,
    signal_exit_name,
    signal_group,
    spawn,
    tail,
)
from kubeinfer_operator.local.rss import tree_rss
from kubeinfer_operator.local.state import ProcessState, ProcState, process_start_time
from kubeinfer_runtime.contract import Role

HOST = "127.0.0.1"
#: Crashes in a row after which a new server is given up on (a rollout, an apply).
CRASH_LIMIT = 3
#: What the model server's /ping says when its model will never be ready (it
#: never retries: a new model means a new process), as opposed to "still
#: loading": the model failed to load, or loaded and failed its warm-up
#: inference, or a pipeline's handler cannot be imported. Same words as the
#: runtime's ``server.state.LOAD_FAILED_MARKER`` (a unit test keeps them equal).
LOAD_FAILED = "failed to load"
#: An async worker's liveness (the path the operator's livenessProbe names).
LIVE_PATH = "/v2/health/live"


@dataclass(frozen=True)
class ChildSpec:
    """What to run: the role and its ``KUBEINFER_*`` settings (host and port excluded)."""

    name: str
    role: Role
    env: dict[str, str]
    log_path: Path
    variant: str | None = None
    replica: int | None = None
    server_hash: str | None = None
    #: Enforced like a container's memory limit (None: unlimited); see ``memory``.
    memory_limit: MemoryLimit | None = None


async def poll_until(done: Callable[[], bool], limit_s: float, interval: float = 0.02) -> bool:
    """Await until ``done()`` (True) or ``limit_s`` passed (False), without blocking the loop.

    Process exit has no awaitable here (children are plain Popen objects, see
    ``process``), so it is polled; the interval keeps that cheap.
    """
    deadline = time.monotonic() + limit_s
    while True:
        if done():
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(interval)


def runtime_argv(role: Role) -> list[str]:
    return [sys.executable, "-m", "kubeinfer_runtime", "serve", "--role", role.value]


def not_ready_reason(response: httpx.Response) -> str:
    """The runtime's own words for why it is not ready (SageMaker-style JSON error body)."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        for key in ("Message", "message", "detail", "reason"):
            if isinstance(body.get(key), str) and body[key]:
                return str(body[key])
    text = response.text.strip().replace("\n", " ")
    return f"/ping answered {response.status_code}" + (f": {text[:200]}" if text else "")


@dataclass
class Child:
    spec: ChildSpec
    port: int = 0
    proc: subprocess.Popen[bytes] | Adopted | None = None
    #: Starts the process instead of ``spawn`` (the fork server, for fast
    #: model-server starts on scaled endpoints); None: ``spawn``.
    launcher: Callable[..., subprocess.Popen[bytes] | Adopted] | None = None
    state: ProcState = ProcState.STARTING
    reason: str = ""
    restarts: int = 0
    last_exit: int | None = None
    started_at: float = 0.0
    crash: CrashRecord = field(default_factory=CrashRecord)
    #: Part of the variant the route table serves (not a replica still being
    #: rolled out, nor one being drained); routed once also ready.
    active: bool = False
    #: True while the route table lists this child (model servers only).
    routed: bool = False
    #: Kernel start time of the current pid, to recognise it later (pids are reused).
    start_time: int | None = None
    #: False once the supervisor decided to stop it: its exit is then no crash.
    wanted: bool = True
    ever_ready: bool = False
    #: Why the previous run ended (Kubernetes' lastState.terminated reason, message).
    last_termination: str = ""
    last_termination_message: str = ""
    #: Set when the supervisor killed the current run for its memory; read at its exit.
    oom_message: str | None = None
    #: A kill verdict ``check`` reached (measured as the process turned ready) that the
    #: supervisor has not reported yet.
    unreported_kill: Verdict | None = None
    #: Why ``check`` killed the current run for its failed liveness; read at its exit.
    liveness_message: str | None = None
    #: The same, until the supervisor has reported the kill.
    unreported_liveness: str | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def ready(self) -> bool:
        return self.state is ProcState.READY and self.running

    def failure(self) -> str | None:
        """Why this server will not become ready by waiting (None: it may): it gave up on
        its model for good, or crashed ``CRASH_LIMIT`` times in a row."""
        if self.running and self.state is ProcState.NOT_READY and LOAD_FAILED in self.reason:
            return f"model server {self.name} is not ready: {self.reason}"
        streak = self.crash.streak
        if streak >= CRASH_LIMIT and self.last_termination == OOM_KILLED:
            return (f"model server {self.name} was {OOM_KILLED} {streak} times in a row: "
                    f"{self.last_termination_message}")
        if streak >= CRASH_LIMIT:
            last = tail(self.spec.log_path, lines=6)
            return (f"model server {self.name} crashed {streak} times in a row (last: "
                    f"{self.reason}); see {self.spec.log_path}"
                    + (f"; last lines:\n{last}" if last else ""))
        return None

    def start(self, *, port: int | None = None) -> None:
        """Spawn the process, on ``port``, else its previous port while free, else a free one."""
        if port:
            self.port = port
        elif not self.port or not port_free(self.port, HOST):
            self.port = free_port(HOST)
        env = {**os.environ, **self.spec.env, "KUBEINFER_HOST": HOST,
               "KUBEINFER_PORT": str(self.port)}
        launch = self.launcher or spawn
        self.proc = launch(runtime_argv(self.spec.role), env=env, log_path=self.spec.log_path)
        self.started_at = time.monotonic()
        self.start_time = process_start_time(self.proc.pid)
        self.state = ProcState.STARTING
        self.reason = "process started"

    def collect_exit(self, policy: BackoffPolicy, now: float) -> str | None:
        """When the process exited on its own: schedule its restart, return the report."""
        if self.proc is None or self.state is ProcState.BACKOFF or not self.wanted:
            return None
        code = self.proc.poll()
        if code is None:
            return None
        self.last_exit = code
        oom, self.oom_message = self.oom_message, None
        unlive, self.liveness_message = self.liveness_message, None
        self.last_termination = termination_reason(code, oom_killed=oom is not None)
        self.last_termination_message = oom or unlive or ""
        self.crash = on_crash(policy, self.crash, started_at=self.started_at, now=now)
        self.state = ProcState.BACKOFF
        self.routed = False
        delay = (self.crash.restart_at or now) - now
        how = (OOM_KILLED if oom is not None else "liveness probe failed"
               if unlive is not None else signal_exit_name(code))
        self.reason = (f"{OOM_KILLED}: {oom}; restarting in {delay:.1f}s" if oom is not None
                       else f"liveness probe failed: {unlive}; restarting in {delay:.1f}s"
                       if unlive is not None
                       else f"crashed ({how}), restarting in {delay:.1f}s")
        report = (f"Process {self.name} (pid {self.proc.pid}) exited ({how}); restart "
                  f"{self.restarts + 1} in {delay:.1f}s; log {self.spec.log_path}")
        if oom is not None or unlive is not None:
            return report  # its kill's event said why; the log's last lines would not
        last = tail(self.spec.log_path, lines=8)
        return report + (f"; last lines:\n{last}" if last else "")

    def check_memory(self) -> Verdict:
        """Measure the running process against its memory limit; on a kill verdict,
        SIGKILL its process group as the kernel would (the exit is collected later,
        and restarted with backoff like any crash)."""
        if (self.spec.memory_limit is None or not self.wanted or self.proc is None
                or self.state is ProcState.BACKOFF or self.oom_message is not None
                or self.proc.poll() is not None):
            return Verdict(kill=False)
        # poll() said running: the pid is still our unreaped child, never a reused one.
        verdict = judge(tree_rss(self.proc.pid), self.spec.memory_limit)
        if verdict.kill:
            self.oom_message = verdict.message
            signal_group(self.proc.pid, signal.SIGKILL)
        return verdict

    def restart_if_due(self, now: float) -> bool:
        if self.state is not ProcState.BACKOFF or not self.wanted:
            return False
        if not restart_due(self.crash, now):
            return False
        self.restarts += 1
        self.start()
        return True

    async def check(self, client: httpx.AsyncClient) -> None:
        """Update readiness from ``GET /ping`` (both roles answer it)."""
        if not self.wanted or self.state is ProcState.BACKOFF or not self.running:
            return
        probed = self.proc
        try:
            response = await client.get(self.url + "/ping", timeout=2.0)
        except httpx.HTTPError as exc:
            if not self._still_probed(probed):
                return
            if self.ever_ready:
                self.state = ProcState.NOT_READY
                self.reason = f"/ping failed: {type(exc).__name__}"
            else:
                self.state = ProcState.STARTING
                self.reason = "starting (port not answering yet)"
            return
        if not self._still_probed(probed):
            return
        if response.status_code == 200:
            # On Kubernetes a process over its memory limit is killed when it allocates,
            # so it never answers a probe. Memory is measured here between rounds, and a
            # quick server could turn ready (and end its crash loop) first: measure it
            # the moment it would turn ready, before anything routes to it.
            verdict = self.check_memory()
            if verdict.kill:
                self.unreported_kill = verdict
                return
            self.state = ProcState.READY
            self.reason = ""
            self.ever_ready = True
        else:
            self.state = ProcState.NOT_READY
            self.reason = not_ready_reason(response)
            if self.spec.role is Role.ASYNC_WORKER:
                await self._check_live(client, probed)

    async def _check_live(self, client: httpx.AsyncClient,
                          probed: subprocess.Popen[bytes] | Adopted | None) -> None:
        """Kill an async worker whose liveness fails, as the kubelet would: its loop ended,
        or model calls that never return hold its threads (it said so for a while first:
        its readiness failed at once). Asked only when not ready, so a healthy worker
        costs no second request; the exit is collected and restarted with the crash
        backoff, the reason its own (``liveness_message``)."""
        try:
            response = await client.get(self.url + LIVE_PATH, timeout=2.0)
        except httpx.HTTPError:
            return  # it answered /ping just now: a probe lost now is no verdict
        if response.status_code < 400 or not self._still_probed(probed) or self.proc is None:
            return
        # SIGKILL, not SIGTERM: a call that never returns keeps the interpreter from
        # exiting (it joins its threads), and what the worker held is reclaimed by any
        # other worker after the visibility timeout, as after a crash.
        self.liveness_message = self.unreported_liveness = not_ready_reason(response)
        signal_group(self.proc.pid, signal.SIGKILL)

    def _still_probed(self, probed: subprocess.Popen[bytes] | Adopted | None) -> bool:
        """Whether a probe's answer still describes this child: while it was in flight the
        process may have been OOM-killed and its exit collected (BACKOFF), restarted or
        stopped. Applied anyway, it would mark a dead process STARTING or READY, and the
        next round would collect the same exit again, as a second crash (and without its
        OOMKilled reason, so a crash loop of OOM kills was reported as crashes)."""
        return (probed is self.proc and self.wanted and self.state is not ProcState.BACKOFF
                and self.running)

    async def stop(self, *, grace_s: float = 10.0) -> None:
        """SIGTERM the process group (graceful: in-flight requests finish), then SIGKILL."""
        self.wanted = False
        self.active = False
        self.routed = False
        self.state = ProcState.STOPPING
        proc = self.proc
        if proc is None:
            self.state = ProcState.STOPPED
            return
        if proc.poll() is None:
            signal_group(proc.pid, signal.SIGTERM)
            if not await poll_until(lambda: proc.poll() is not None, grace_s):
                signal_group(proc.pid, signal.SIGKILL)
                await poll_until(lambda: proc.poll() is not None, 30.0)
        # Group members (extra uvicorn workers) may linger briefly after the leader.
        if not await poll_until(lambda: not group_alive(proc.pid), 2.0):
            signal_group(proc.pid, signal.SIGKILL)
        self.last_exit = proc.returncode
        # Stopped on purpose: an earlier run's OOMKilled must not label this exit.
        self.last_termination = self.last_termination_message = ""
        self.state = ProcState.STOPPED

    def snapshot(self) -> ProcessState:
        pid = self.pid if self.running else None
        return ProcessState(
            name=self.name, role=self.spec.role.value, variant=self.spec.variant,
            replica=self.spec.replica, server_hash=self.spec.server_hash, pid=pid,
            start_time=self.start_time if pid else None, port=self.port, url=self.url,
            state=self.state, reason=self.reason, routed=self.routed, restarts=self.restarts,
            last_exit=self.last_exit, last_termination=self.last_termination,
            last_termination_message=self.last_termination_message,
            log=str(self.spec.log_path),
        )
