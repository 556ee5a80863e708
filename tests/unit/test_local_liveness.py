"""Local mode restarts an async worker whose liveness fails, as the kubelet would.

An async worker stuck for good (its loop ended, or model calls that never return
hold every inference thread) fails ``/v2/health/live``; on Kubernetes its
livenessProbe restarts it. The supervisor asks a not-ready worker the same and
kills one that fails it; the exit then takes the crash-restart path (backoff,
events, the reason recorded). Real child processes (``sleep``), the probes'
answers from a stand-in client.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx

from kubeinfer_operator.local.children import Child, ChildSpec
from kubeinfer_operator.local.memory import ERROR
from kubeinfer_operator.local.paths import EndpointPaths
from kubeinfer_operator.local.process import spawn
from kubeinfer_operator.local.state import ProcState, read_events, read_state
from kubeinfer_operator.local.supervisor import Supervisor
from kubeinfer_runtime.contract import Role

STUCK = ("Async worker is stuck: all 1 inference thread(s) are held by 1 model call(s) "
         "that outlived their InvocationTimeoutSeconds (the oldest has run 200s)")


class _Probes:
    """An httpx client answering ``/ping`` and ``/v2/health/live`` as told; counts asks."""

    def __init__(self, ping: tuple[int, str], live: tuple[int, str]) -> None:
        self.answers = {"/ping": ping, "/v2/health/live": live}
        self.asked: list[str] = []

    async def get(self, url: str, **_: object) -> httpx.Response:
        path = "/" + url.split("/", 3)[3]
        self.asked.append(path)
        status, message = self.answers[path]
        body = {"live": True} if status == 200 else {"Message": message}
        return httpx.Response(status, json=body, request=httpx.Request("GET", url))


def _child(tmp_path: Path, role: Role = Role.ASYNC_WORKER) -> Child:
    spec = ChildSpec(name="main-0", role=role, env={}, log_path=tmp_path / "main-0.log",
                     variant="main", replica=0)

    def launch(argv: list[str], *, env: dict[str, str], log_path: Path) -> Any:
        # A stand-in for the worker: the supervisor only probes, kills and restarts it.
        return spawn(["sleep", "30"], env={"PATH": "/usr/bin:/bin"}, log_path=log_path)

    child = Child(spec, launcher=launch)
    child.start()
    return child


def _kill(child: Child) -> None:
    if child.proc is not None and child.proc.poll() is None:
        child.proc.kill()
        child.proc.wait()


async def test_a_worker_failing_its_liveness_is_killed_and_restarted_with_backoff(
        tmp_path: Path) -> None:
    paths = EndpointPaths(tmp_path / "ep")
    sup = Supervisor(paths)
    child = _child(tmp_path)
    sup.children = [child]
    first = child.pid
    client = _Probes(ping=(503, STUCK), live=(503, STUCK))
    try:
        await sup.monitor_once(client)  # type: ignore[arg-type]
        assert client.asked == ["/ping", "/v2/health/live"]
        assert not child.running and child.state is ProcState.BACKOFF  # collected at once
        assert child.reason == f"liveness probe failed: {STUCK}; restarting in 0.5s"
        events, _ = read_events(paths)
        assert [(e["level"], e["message"]) for e in events] == [
            ("error", f"Process main-0 (pid {first}) failed its liveness probe ({STUCK}): "
                      "killed, to be restarted"),
            ("error", f"Process main-0 (pid {first}) exited (liveness probe failed); restart 1 "
                      f"in 0.5s; log {child.spec.log_path}")]
        state = read_state(paths)
        assert state is not None
        [recorded] = state.processes
        # Kubernetes records a liveness kill as Error (exit 137); the message says why.
        assert (recorded.last_termination, recorded.last_termination_message) == (ERROR, STUCK)
        # The crash backoff applies: not before 0.5 s, then a new process.
        now = time.monotonic()
        assert not child.restart_if_due(now) and child.restart_if_due(now + 0.5)
        assert child.running and child.pid != first and child.restarts == 1
    finally:
        _kill(child)


async def test_liveness_is_asked_only_of_a_not_ready_worker_and_only_a_failure_kills(
        tmp_path: Path) -> None:
    redis_down = "Async worker cannot reach Redis at redis://127.0.0.1:6379/0"
    cases = [
        # Ready: no second request.
        (Role.ASYNC_WORKER, (200, ""), (503, STUCK), ["/ping"]),
        # Not ready, but live (Redis away, threads held within the bound): kept.
        (Role.ASYNC_WORKER, (503, redis_down), (200, ""), ["/ping", "/v2/health/live"]),
        # A real-time model server: its /ping alone, as before.
        (Role.MODEL_SERVER, (503, "loading"), (503, STUCK), ["/ping"]),
    ]
    for role, ping, live, asked in cases:
        child = _child(tmp_path, role)
        client = _Probes(ping=ping, live=live)
        try:
            await child.check(client)  # type: ignore[arg-type]
            assert client.asked == asked
            assert child.running and child.liveness_message is None
            assert child.state is (ProcState.READY if ping[0] == 200 else ProcState.NOT_READY)
        finally:
            _kill(child)
