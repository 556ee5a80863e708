"""Memory limits in local mode: the pure verdict, quantities, and the kill-and-restart path.

The last tests run real (tiny) processes in place of model servers: ``sleep``
started through ``Child``'s launcher hook, measured from /proc and killed.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from kubeinfer_operator.errors import SpecError
from kubeinfer_operator.local import rss
from kubeinfer_operator.local.backoff import BackoffPolicy
from kubeinfer_operator.local.children import Child, ChildSpec
from kubeinfer_operator.local.manifest import parse_manifests
from kubeinfer_operator.local.memory import (
    COMPLETED,
    ERROR,
    OOM_KILLED,
    MemoryLimit,
    format_bytes,
    judge,
    limit_bytes,
    limit_problem,
    memory_limit,
    oom_event,
    termination_reason,
)
from kubeinfer_operator.local.paths import EndpointPaths
from kubeinfer_operator.local.process import spawn
from kubeinfer_operator.local.rss import descendants, process_rss, tree_rss
from kubeinfer_operator.local.state import (
    EndpointState,
    ProcessState,
    ProcState,
    read_events,
    read_state,
)
from kubeinfer_operator.local.supervisor import Supervisor
from kubeinfer_operator.local.view import process_rows
from kubeinfer_runtime.contract import Role

MI = 2**20
LIMIT_512 = MemoryLimit(bytes=512 * MI, text="512Mi", field="resources.limits.memory")


# -- the verdict -------------------------------------------------------------------------------


def test_over_the_limit_is_killed_with_the_numbers_and_the_fix() -> None:
    verdict = judge(612 * MI, LIMIT_512)
    assert verdict.kill
    assert verdict.message == ("using 612Mi, over its memory limit 512Mi "
                               "(resources.limits.memory); raise the limit or use a smaller model")
    assert oom_event(verdict, process="main-0", variant="main", replica=0) == (
        "Variant main replica 0: OOMKilled: using 612Mi, over its memory limit 512Mi "
        "(resources.limits.memory); raise the limit or use a smaller model")


def test_at_or_under_the_limit_and_unknown_usage_are_left_alone() -> None:
    # A cgroup lets usage reach the limit itself; only more is killed.
    assert not judge(512 * MI, LIMIT_512).kill
    assert not judge(512 * MI - 1, LIMIT_512).kill
    assert judge(512 * MI + 1, LIMIT_512).kill
    assert judge(512 * MI, LIMIT_512).message == ""
    assert not judge(None, LIMIT_512).kill  # the process is gone
    assert not judge(10**12, None).kill  # no limit: no enforcement


def test_oom_event_names_the_process_when_it_is_no_replica() -> None:
    verdict = judge(2 * MI, MemoryLimit(bytes=MI, text="1Mi", field="resources.limits.memory"))
    assert oom_event(verdict, process="gateway", variant=None, replica=None).startswith(
        "Process gateway: OOMKilled: using 2.0Mi, over its memory limit 1Mi")


@pytest.mark.parametrize(("size", "text"), [
    (0, "0.0Mi"), (41 * MI + MI // 3, "41.3Mi"), (100 * MI, "100Mi"), (612 * MI, "612Mi"),
    (10 * 1024 * MI - MI, "10239Mi"), (10 * 2**30, "10.0Gi"), (int(12.5 * 2**30), "12.5Gi"),
])
def test_sizes_print_in_binary_units(size: int, text: str) -> None:
    assert format_bytes(size) == text


# -- quantities ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("512Mi", 512 * MI), ("1Gi", 2**30), ("0.5Gi", 2**29), ("1G", 10**9), ("128974848", 128974848),
    ("129e6", 129 * 10**6), ("123k", 123000), ("1Ki", 1024),
    # Fractions of a byte round up, as Kubernetes does with memory.
    ("100m", 1), ("1500m", 2), ("0", 0),
    ("1kM", None), ("", None), ("lots", None), ("-1Gi", None),
])
def test_limit_bytes(text: str, expected: int | None) -> None:
    assert limit_bytes(text) == expected


def test_limit_comes_from_the_variant_else_serverless_memory() -> None:
    assert memory_limit({}, None) is None
    assert memory_limit({"cpu": "2"}, None) is None  # CPU is never enforced
    assert memory_limit({"memory": "30Mi"}, None) == MemoryLimit(
        30 * MI, "30Mi", "resources.limits.memory")
    # render.plan folds serverless.memory into the limits when the variant sets none.
    assert memory_limit({"memory": "2Gi"}, "2Gi") == MemoryLimit(
        2 * 2**30, "2Gi", "serverless.memory")
    assert memory_limit({"memory": "512Mi"}, "2Gi") == MemoryLimit(
        512 * MI, "512Mi", "resources.limits.memory")
    # 0 means no limit (the kubelet sets none); unparsable ones are refused earlier.
    assert memory_limit({"memory": "0"}, None) is None
    assert memory_limit({"memory": "1kM"}, None) is None


def test_limit_problems_name_the_field_and_the_fix() -> None:
    path = "spec.variants[0].resources.limits.memory"
    assert limit_problem(path, "512Mi") is None
    assert limit_problem(path, "0") is None
    assert limit_problem(path, "1kM") == (
        f"{path}: '1kM' is not a Kubernetes quantity; write it like 512Mi or 2Gi")
    assert limit_problem(path, "-1Gi") == (
        f"{path}: '-1Gi' is negative; write a size like 512Mi, or remove the limit")


def _manifest(memory: str) -> str:
    return ("apiVersion: kubeinfer.io/v1alpha1\nkind: Endpoint\nmetadata: {name: ep}\nspec:\n"
            "  variants:\n  - name: main\n    model: {uri: file:///m.onnx}\n"
            f"    resources: {{limits: {{memory: '{memory}', cpu: '1'}}}}\n")


def test_up_refuses_a_memory_limit_it_cannot_enforce() -> None:
    assert parse_manifests(_manifest("512Mi"), source="x.yaml", base_dir="/")
    with pytest.raises(SpecError) as err:
        parse_manifests(_manifest("1kM"), source="x.yaml", base_dir="/")
    assert "spec.variants[0].resources.limits.memory: '1kM' is not a Kubernetes quantity" \
        in str(err.value)


def test_termination_reasons_are_kubernetes_ones() -> None:
    assert termination_reason(-9, oom_killed=True) == OOM_KILLED
    assert termination_reason(-9, oom_killed=False) == ERROR
    assert termination_reason(1, oom_killed=False) == ERROR
    assert termination_reason(0, oom_killed=False) == COMPLETED


def test_status_shows_the_last_termination_like_kubectl() -> None:
    base: dict[str, Any] = {"name": "main-0", "role": "model-server", "variant": "main",
                            "port": 1, "url": "http://127.0.0.1:1", "state": ProcState.READY,
                            "log": "/x.log", "restarts": 2}
    procs = [ProcessState(**base, last_exit=-9, last_termination=OOM_KILLED),
             ProcessState(**{**base, "name": "main-1"}, last_exit=-15),
             ProcessState(**{**base, "name": "main-2"})]
    rows = process_rows(EndpointState(endpoint="ep", supervisor_pid=1, processes=procs))
    assert [(r["last exit"], r["restarts"]) for r in rows] == [
        ("OOMKilled (-9)", "2"), ("-15", "2"), ("-", "2")]


def test_state_files_without_the_new_fields_still_load() -> None:
    old = {"name": "a-0", "role": "model-server", "port": 1, "url": "u", "state": "ready",
           "log": "/x"}
    p = ProcessState.model_validate_json(json.dumps(old))
    assert (p.last_termination, p.last_termination_message) == ("", "")


# -- /proc ---------------------------------------------------------------------------------------


def _sleeper(tmp_path: Path, name: str, script: str = "sleep 30") -> Any:
    return spawn(["bash", "-c", script], env={"PATH": "/usr/bin:/bin"},
                 log_path=tmp_path / f"{name}.log")


def test_tree_rss_counts_descendants(tmp_path: Path) -> None:
    proc = _sleeper(tmp_path, "tree", "sleep 30 & sleep 30 & wait")
    try:
        deadline = time.monotonic() + 5
        while len(descendants(proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        kids = descendants(proc.pid)
        assert len(kids) == 2
        own = process_rss(proc.pid)
        total = tree_rss(proc.pid)
        assert own is not None and own > 0 and total is not None
        assert total > own  # the two sleeps count too
        # The fallback for kernels without /proc/<pid>/task/*/children finds the same.
        assert sorted(rss._parents()[proc.pid]) == sorted(kids)
    finally:
        proc.kill()
        proc.wait()
    assert tree_rss(proc.pid) is None and process_rss(proc.pid) is None
    assert descendants(proc.pid) == []


# -- the kill and restart path -------------------------------------------------------------------


def _child(tmp_path: Path, limit: MemoryLimit | None, replica: int = 0) -> Child:
    spec = ChildSpec(name=f"main-{replica}", role=Role.MODEL_SERVER, env={},
                     log_path=tmp_path / f"main-{replica}.log", variant="main", replica=replica,
                     memory_limit=limit)

    def launch(argv: list[str], *, env: dict[str, str], log_path: Path) -> Any:
        # A stand-in for the model server: the supervisor only measures and kills it.
        return spawn(["sleep", "30"], env={"PATH": "/usr/bin:/bin"}, log_path=log_path)

    child = Child(spec, launcher=launch)
    child.start()
    # Popen returns as soon as exec succeeded, before the new image has faulted
    # in its pages: wait until `sleep` is resident like any settled process.
    assert child.pid is not None
    deadline = time.monotonic() + 5
    while (process_rss(child.pid) or 0) < 256 * 1024 and time.monotonic() < deadline:
        time.sleep(0.01)
    return child


def _wait_exit(child: Child) -> None:
    assert child.proc is not None
    deadline = time.monotonic() + 5
    while child.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert child.proc.poll() is not None


TINY = MemoryLimit(bytes=64 * 1024, text="64Ki", field="resources.limits.memory")


def test_a_child_over_its_limit_is_killed_and_restarts_as_oomkilled(tmp_path: Path) -> None:
    child = _child(tmp_path, TINY)
    policy = BackoffPolicy(initial_s=0.5)
    try:
        first = child.pid
        verdict = child.check_memory()
        assert verdict.kill and "over its memory limit 64Ki" in verdict.message
        _wait_exit(child)
        assert not child.check_memory().kill  # dead: nothing more to measure or kill
        now = time.monotonic()
        report = child.collect_exit(policy, now)
        assert report is not None and "exited (OOMKilled); restart 1 in 0.5s" in report
        assert child.state is ProcState.BACKOFF
        assert child.reason.startswith("OOMKilled: using ") and "restarting in 0.5s" in child.reason
        assert child.last_exit == -signal.SIGKILL
        snap = child.snapshot()
        assert (snap.last_termination, snap.restarts) == (OOM_KILLED, 0)
        assert "over its memory limit 64Ki (resources.limits.memory)" in \
            snap.last_termination_message
        assert not child.restart_if_due(now + 0.4)  # the crash-restart backoff applies
        assert child.restart_if_due(now + 0.5)
        assert child.pid != first and child.running and child.restarts == 1
        # Killed by someone else this time: Error, not OOMKilled.
        assert child.proc is not None
        child.proc.send_signal(signal.SIGKILL)
        _wait_exit(child)
        assert child.collect_exit(policy, time.monotonic()) is not None
        assert (child.last_termination, child.last_termination_message) == (ERROR, "")
        assert child.reason.startswith("crashed (killed by SIGKILL)")
    finally:
        if child.proc is not None and child.proc.poll() is None:
            child.proc.kill()
            child.proc.wait()


def test_a_child_within_its_limit_or_without_one_is_never_killed(tmp_path: Path) -> None:
    for limit in (MemoryLimit(bytes=2**31, text="2Gi", field="resources.limits.memory"), None):
        child = _child(tmp_path, limit)
        try:
            assert not child.check_memory().kill
            assert child.running
        finally:
            assert child.proc is not None
            child.proc.kill()
            child.proc.wait()


async def test_supervisor_reports_the_oom_kill_and_records_it(tmp_path: Path) -> None:
    paths = EndpointPaths(tmp_path / "ep")
    sup = Supervisor(paths, memory_interval_s=0.5)
    within = _child(tmp_path, MemoryLimit(bytes=2**31, text="2Gi",
                                          field="resources.limits.memory"), replica=1)
    over = _child(tmp_path, TINY)
    sup.children = [within, over]
    try:
        killed = await sup.enforce_memory_once()
        assert killed == [over]
        assert not over.running and over.state is ProcState.BACKOFF  # collected at once
        assert within.running
        events, _ = read_events(paths)
        messages = [e["message"] for e in events]
        assert messages[0].startswith("Variant main replica 0: OOMKilled: using ")
        assert messages[0].endswith("over its memory limit 64Ki (resources.limits.memory); "
                                    "raise the limit or use a smaller model")
        assert messages[1].startswith(f"Process main-0 (pid {over.pid}) exited (OOMKilled)")
        assert {e["level"] for e in events} == {"error"}
        state = read_state(paths)
        assert state is not None
        recorded = {p.name: p for p in state.processes}
        assert recorded["main-0"].last_termination == OOM_KILLED
        assert recorded["main-1"].last_termination == ""
        assert await sup.enforce_memory_once() == []  # nothing else is over
    finally:
        for c in (within, over):
            if c.proc is not None and c.proc.poll() is None:
                c.proc.kill()
                c.proc.wait()


class _HeldPing:
    """An httpx client whose ``/ping`` answers 200 only when the test lets it."""

    def __init__(self) -> None:
        self.asked = asyncio.Event()
        self.answer = asyncio.Event()

    async def get(self, url: str, **_: object) -> httpx.Response:
        self.asked.set()
        await self.answer.wait()
        return httpx.Response(200, request=httpx.Request("GET", url))


async def test_a_probe_answered_after_the_oom_kill_was_collected_counts_no_second_crash(
        tmp_path: Path) -> None:
    """The OOM kill and its exit's collection can land while a /ping is in flight (the
    server answered just before it was killed): the answer must not mark the dead process
    ready, or the next round collects the same exit again as a crash of its own."""
    child = _child(tmp_path, TINY)
    policy = BackoffPolicy(initial_s=0.5)
    client = _HeldPing()
    try:
        probe = asyncio.create_task(child.check(client))  # type: ignore[arg-type]
        await client.asked.wait()
        assert child.check_memory().kill
        _wait_exit(child)
        assert child.collect_exit(policy, time.monotonic()) is not None
        client.answer.set()
        await probe
        assert child.state is ProcState.BACKOFF
        assert child.collect_exit(policy, time.monotonic()) is None  # counted once
        assert (child.crash.streak, child.last_termination) == (1, OOM_KILLED)
    finally:
        if child.proc is not None and child.proc.poll() is None:
            child.proc.kill()
            child.proc.wait()
