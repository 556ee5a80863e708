"""Async endpoints in local mode: `kubeinfer up` with a private Redis, scale to zero and back.

The real CLI, supervisor, gateway, redis-server and async workers; file://
input and output so no object store is needed. The policy itself is
unit-tested against a fake clock (tests/unit/test_async_scaling.py); here the
supervisor must carry it out: the idle worker stops, and a new request starts
one from zero that processes it. The private redis-server is supervised: when
it is SIGKILLed with 100 requests queued, it comes back on the same port from
its append-only file, the endpoint is Ready again, and every request finishes.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from kubeinfer_runtime.contract.async_paths import FORMER_PATHS_GRACE_S, parse_former_paths
from tests.integration import test_local
from tests.integration.test_local import Local, wait_for
from tests.support.ports import wait_until

#: The local-mode fixture (own KUBEINFER_HOME, nothing left running afterwards).
local = test_local.local


def _manifest(name: str, model: Path, out: Path, hook: str | None = None) -> str:
    notification = f"\n    notification: {{successUrl: \"{hook}\"}}" if hook else ""
    return f"""\
apiVersion: kubeinfer.io/v1alpha1
kind: Endpoint
metadata:
  name: {name}
spec:
  type: Async
  async:
    outputPath: file://{out}
    maxRetries: 1{notification}
    scaling:
      targetBacklogPerReplica: 2
      minReplicas: 0
      maxReplicas: 2
      scaleOutCooldown: 0
      scaleInCooldown: 2
  variants:
  - name: main
    replicas: 1
    model:
      uri: file://{model}
"""


def _workers(state: dict[str, object]) -> list[dict[str, object]]:
    procs = state["processes"]
    assert isinstance(procs, list)
    return [p for p in procs if p["role"] == "async-worker" and p["pid"]]


def test_async_endpoint_scales_to_zero_and_back_on_new_work(local: Local, models_dir: Path,
                                                            tmp_path: Path) -> None:
    out = tmp_path / "out"
    data = tmp_path / "in.json"
    data.write_text(json.dumps({"instances": [[5.1, 3.5, 1.4, 0.2]]}))
    spec = local.write("async.yaml", _manifest("aq", models_dir / "iris.onnx", out))
    result = local.run("up", "-d", "-f", str(spec), "--timeout", "60")
    assert result.returncode == 0, result.stdout + result.stderr
    # state.json as `up` left it, read at once: the idle worker stops 2-3 s after the
    # apply, and `kubeinfer status` alone can take that long to start on a loaded machine.
    state = _state(local, "aq")
    url = state["url"]
    assert len(_workers(state)) == 1
    assert any(p["role"] == "gateway" for p in state["processes"])

    # Idle: the only worker stops once the queue stayed empty for scaleInCooldown.
    wait_for(local, "aq", lambda s: not _workers(s), "scale to zero", timeout=30)
    assert local.endpoint("aq")["phase"] == "Ready"

    # New work with no worker: the gateway still accepts it, a worker starts, runs it.
    r = httpx.post(f"{url}/endpoints/aq/async-invocations", headers={
        "X-Amzn-SageMaker-InputLocation": f"file://{data}",
        "X-Amzn-SageMaker-Inference-Id": "after-idle"})
    assert r.status_code == 202, r.text
    assert r.headers["x-amzn-sagemaker-outputlocation"] == f"file://{out}/after-idle.out"
    output = out / "after-idle.out"
    # The worker is looked for while the output is awaited: it stops again 2-3 s after
    # the output is written, sooner than a `kubeinfer status` started then may look.
    workers_seen: list[int] = []

    def written() -> bool:
        workers_seen.append(len(_workers(_state(local, "aq"))))
        return output.exists()

    wait_until(written, 60, "the output written by a worker started from zero")
    assert json.loads(output.read_text())["predictions"]["label"] == [0]
    assert max(workers_seen) >= 1, workers_seen

    # And back to zero once idle again.
    wait_for(local, "aq", lambda s: not _workers(s), "scale to zero again", timeout=30)
    events = (local.home / "local" / "aq" / "events.jsonl").read_text()
    assert "scaling out to 1" in events and "scaling in to 0" in events
    assert "private redis-server" in events

    result = local.run("down", "aq", timeout=60)
    assert result.returncode == 0, result.stderr
    local.wait_no_processes()


def _state(local: Local, name: str) -> dict[str, object]:
    """The supervisor's state.json (what ``kubeinfer status`` shows, without a CLI start)."""
    doc: dict[str, object] = json.loads((local.home / "local" / name / "state.json")
                                        .read_text())
    return doc


def _redis(state: dict[str, object]) -> dict[str, object]:
    procs = state["processes"]
    assert isinstance(procs, list)
    [redis] = [p for p in procs if p["role"] == "redis"]
    assert isinstance(redis, dict)
    return redis


def _refuses_strangers(redis: dict[str, object], pid: object) -> None:
    """Another local user reaching the private Redis's port gets nothing without its
    password, which is not on its command line nor in what status shows."""
    import redis as redis_py

    stranger = redis_py.Redis(host="127.0.0.1", port=int(str(redis["port"])),
                              socket_timeout=5)
    try:
        with pytest.raises(redis_py.AuthenticationError):
            stranger.ping()
    finally:
        stranger.close()
    password = (Path(str(redis["log"])).parent.parent / "redis" / "password").read_text()
    assert password.strip().encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
    assert "@" not in str(redis["url"])


def test_a_sigkilled_private_redis_comes_back_and_loses_no_request(
        local: Local, models_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(5):
        (inputs / f"{i}.json").write_text(json.dumps({"instances": [[5.1, 3.5, 1.4, 0.2]]}))
    spec = local.write("ar.yaml", _manifest("ar", models_dir / "iris.onnx", out))
    result = local.run("up", "-d", "-f", str(spec), "--timeout", "60")
    assert result.returncode == 0, result.stdout + result.stderr
    state = wait_for(local, "ar", lambda s: not _workers(s), "scale to zero", timeout=30)
    url = state["url"]
    ids = [f"req-{i:03d}" for i in range(100)]
    # No worker: the supervisor (which scales workers and watches Redis) is paused
    # while the 100 requests are queued and Redis is killed, so all of them are still
    # in Redis when it dies, however fast a worker would have drained them.
    supervisor = state["supervisor_pid"]
    assert isinstance(supervisor, int)
    os.kill(supervisor, signal.SIGSTOP)
    try:
        with httpx.Client(base_url=url, trust_env=False) as client:
            for i, rid in enumerate(ids):
                r = client.post("/endpoints/ar/async-invocations", headers={
                    "X-Amzn-SageMaker-InputLocation": f"file://{inputs}/{i % 5}.json",
                    "X-Amzn-SageMaker-Inference-Id": rid})
                assert r.status_code == 202, r.text
        assert not _workers(local.endpoint("ar"))
        redis = _redis(local.endpoint("ar"))
        pid = redis["pid"]
        assert isinstance(pid, int)
        assert b"redis-server" in Path(f"/proc/{pid}/cmdline").read_bytes()
        _refuses_strangers(redis, pid)
        os.kill(pid, signal.SIGKILL)
    finally:
        os.kill(supervisor, signal.SIGCONT)
    assert not out.exists() or not any(out.glob("*.out")), "a request finished with no worker"

    # Restarted (new pid, same port), and the endpoint is Ready again by itself.
    state = wait_for(local, "ar", lambda s: s["phase"] == "Ready"
                     and _redis(s)["restarts"] == 1 and _redis(s)["pid"] not in (None, pid),
                     "Ready with a restarted redis-server", timeout=60)
    assert _redis(state)["port"] == redis["port"]
    _refuses_strangers(_redis(state), _redis(state)["pid"])
    # The gateway queues again by itself (its Redis client reconnects).
    r = httpx.post(f"{url}/endpoints/ar/async-invocations", headers={
        "X-Amzn-SageMaker-InputLocation": f"file://{inputs}/0.json",
        "X-Amzn-SageMaker-Inference-Id": "after-restart"})
    assert r.status_code == 202, r.text
    ids.append("after-restart")
    wait_until(lambda: all((out / f"{rid}.out").exists() for rid in ids), 90,
               "all 100 outputs after the restart", interval=0.2)
    events = (local.home / "local" / "ar" / "events.jsonl").read_text()
    assert f"Private redis-server (pid {pid}) exited (killed by SIGKILL)" in events
    assert "Restarted the private redis-server (restart 1)" in events
    assert "redis" in local.run("status").stdout

    result = local.run("down", "ar", timeout=60)
    assert result.returncode == 0, result.stderr
    local.wait_no_processes()


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


def test_a_changed_output_path_stays_writable_for_requests_queued_under_it(
        local: Local, models_dir: Path, tmp_path: Path) -> None:
    """``up -f`` with another outputPath: the new workers carry the old pair (with its
    deadline), so requests queued under it are still written where their callers look
    (the worker's side: tests/integration/test_async_security.py)."""
    old_out, new_out = tmp_path / "old-out", tmp_path / "new-out"
    text = _manifest("moved", models_dir / "iris.onnx", old_out).replace(
        "minReplicas: 0", "minReplicas: 1")
    spec = local.write("moved.yaml", text)
    result = local.run("up", "-d", "-f", str(spec), "--timeout", "60")
    assert result.returncode == 0, result.stdout + result.stderr
    [worker] = _workers(local.endpoint("moved"))
    assert "KUBEINFER_FORMER_PATHS" not in _environ(int(str(worker["pid"])))
    spec.write_text(text.replace(f"file://{old_out}", f"file://{new_out}"))
    result = local.run("up", "-d", "-f", str(spec), "--timeout", "60")
    assert result.returncode == 0, result.stdout + result.stderr

    def moved_worker(state: dict[str, object]) -> bool:
        return any(_environ(int(str(w["pid"]))).get("KUBEINFER_OUTPUT_PATH")
                   == f"file://{new_out}" for w in _workers(state))

    wait_for(local, "moved", moved_worker, "a worker with the new outputPath", timeout=60)
    [env] = [e for w in _workers(local.endpoint("moved"))
             if (e := _environ(int(str(w["pid"]))))["KUBEINFER_OUTPUT_PATH"]
             == f"file://{new_out}"]
    [pair] = parse_former_paths(env["KUBEINFER_FORMER_PATHS"])
    assert pair.outputPath == f"file://{old_out}"
    assert pair.failurePath == f"file://{old_out}/failures"  # the spec's default
    assert pair.until > time.time() + FORMER_PATHS_GRACE_S - 300
    result = local.run("down", "moved", timeout=60)
    assert result.returncode == 0, result.stderr
    local.wait_no_processes()

