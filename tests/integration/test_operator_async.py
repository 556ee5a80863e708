"""The real operator scales an async endpoint's workers from the queue backlog.

Emulator + real kopf operator + a real Redis: work arriving in the endpoint's
Redis Stream scales the worker Deployment up from zero, and an emptied queue
scales it back to zero (cooldowns set to 0 so the test needs no sleeps).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubeinfer_operator.settings import OperatorSettings
from kubeinfer_runtime.contract import AsyncQueueKeys
from kubeinfer_runtime.contract.async_paths import FORMER_PATHS_GRACE_S, parse_former_paths
from tests.support.kube_harness import (
    Kube,
    operator_on_emulator,
    wait_for,
)
from tests.support.redis_server import RedisServer, start_redis

REPO = Path(__file__).resolve().parents[2]
EXAMPLE: dict[str, Any] = yaml.safe_load((REPO / "examples" / "async-endpoint.yaml").read_text())
NS = "async-scaling"
NAME = "iris-async"
WORKERS = f"{NAME}-main"


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def kube(tmp_path_factory: pytest.TempPathFactory, redis: RedisServer) -> Iterator[Kube]:
    settings = OperatorSettings(standalone=True, status_interval_s=0.3, namespaces=[],
                                runtime_image="example.test/runtime:1", s3_secret_name=None,
                                redis_url=redis.url, redis_acl_recheck_s=0.5)
    with operator_on_emulator(settings, tmp_path_factory.mktemp("kube")) as (client, _):
        yield client


def _replicas(kube: Kube) -> int | None:
    dep = kube.get("Deployment", NS, WORKERS)
    return None if dep is None else int(dep["spec"].get("replicas", 1))


def _on_cluster(doc: dict[str, Any]) -> dict[str, Any]:
    """The example with object-store locations, as a cluster needs (it ships file:// ones)."""
    doc = copy.deepcopy(doc)
    doc["spec"]["async"]["outputPath"] = "s3://async-bucket/out"
    doc["spec"]["async"]["failurePath"] = "s3://async-bucket/failed"
    return doc


def _ready(kube: Kube, ns: str, name: str) -> dict[str, Any]:
    obj = kube.get("Endpoint", ns, name) or {}
    return next((c for c in (obj.get("status") or {}).get("conditions", [])
                 if c["type"] == "Ready"), {})


def test_backlog_scales_workers_from_zero_and_back(kube: Kube, redis: RedisServer) -> None:
    doc = _on_cluster(EXAMPLE)
    doc["spec"]["async"]["scaling"] = {"targetBacklogPerReplica": 5, "minReplicas": 0,
                                       "maxReplicas": 4, "scaleOutCooldown": 0,
                                       "scaleInCooldown": 0}
    kube.create_namespace(NS)
    r = kube.create(doc, NS)
    assert r.status_code == 201, r.text

    # Idle: the workers go to zero.
    wait_for(lambda: _replicas(kube) == 0, 15, "workers scaled to zero while idle")

    keys = AsyncQueueKeys(queue=f"{NS}.{NAME}")
    rds = redis.client()
    rds.xgroup_create(keys.stream, keys.group, id="$", mkstream=True)
    for i in range(12):
        rds.xadd(keys.stream, {"id": f"req-{i}"})
    # 12 queued / 5 per replica -> 3 workers, from zero.
    wait_for(lambda: _replicas(kube) == 3, 15, "workers scaled out to 3 for 12 queued")

    # A worker takes everything and acknowledges it: the backlog is gone.
    entries = rds.xreadgroup(keys.group, "test-worker", {keys.stream: ">"}, count=100)
    ids = [entry_id for _, batch in entries for entry_id, _ in batch]
    assert len(ids) == 12
    rds.xack(keys.stream, keys.group, *ids)
    wait_for(lambda: _replicas(kube) == 0, 15, "workers scaled back to zero when drained")


@pytest.mark.parametrize(("field", "value"), [
    ("outputPath", "file:///tmp/kubeinfer-async/out"),
    ("failurePath", "file:///tmp/kubeinfer-async/failed"),
])
def test_a_file_location_is_invalid_on_a_cluster(kube: Kube, field: str, value: str) -> None:
    ns = f"async-file-{field.lower()}"
    kube.create_namespace(ns)
    doc = _on_cluster(EXAMPLE)
    doc["spec"]["async"][field] = value
    assert kube.create(doc, ns).status_code == 201
    ready = wait_for(lambda: (c := _ready(kube, ns, NAME)).get("reason") == "InvalidSpec" and c,
                     10, f"InvalidSpec for a file:// {field}")
    assert ready["status"] == "False"
    assert f"spec.async.{field}: {value} is a file:// path; on Kubernetes" in ready["message"]
    assert "use s3://bucket/prefix" in ready["message"]
    assert kube.list("Deployment", ns) == []


def test_the_namespace_gets_its_own_redis_user(kube: Kube, redis: RedisServer) -> None:
    """The runtime Secret names the namespace's Redis user, not the operator's URL, and the
    operator has set that user: it reaches this namespace's queues and no other's."""
    import base64

    import redis as redis_py

    ns = "async-tenant"
    kube.create_namespace(ns)
    assert kube.create(_on_cluster(EXAMPLE), ns).status_code == 201
    secret = wait_for(lambda: kube.get("Secret", ns, "kubeinfer-runtime"), 15,
                      "the runtime Secret")
    url = base64.b64decode(secret["data"]["redis-url"]).decode()
    assert url.startswith(f"redis://kubeinfer-ns-{ns}:") and url != redis.url
    mine = AsyncQueueKeys(queue=f"{ns}.{NAME}")
    theirs = AsyncQueueKeys(queue=f"{NS}.{NAME}")
    tenant = redis_py.Redis.from_url(url, decode_responses=True)
    # The user may be set a moment after the Secret is written (same reconcile).
    wait_for(lambda: _can_ping(tenant), 15, "the namespace's Redis user")
    tenant.xadd(mine.stream, {"id": "req-0"})
    with pytest.raises(redis_py.exceptions.ResponseError, match="permission"):
        tenant.xadd(theirs.stream, {"id": "forged"})
    with pytest.raises(redis_py.exceptions.ResponseError, match="permission"):
        tenant.execute_command("KEYS", "*")

    # A Redis restarted without its users (ACL SETUSER lives in memory) gets it back.
    redis.client().execute_command("ACL", "DELUSER", f"kubeinfer-ns-{ns}")
    wait_for(lambda: _can_ping(tenant), 15, "the namespace's Redis user set again")


def _can_ping(client: Any) -> bool:
    import redis.exceptions

    try:
        return bool(client.ping())
    except redis.exceptions.ConnectionError:
        # No such user yet (AuthenticationError, a ConnectionError), or ACL DELUSER has
        # just closed this user's connections and the ping met the reset.
        return False


def _worker_env(kube: Kube, ns: str) -> dict[str, str]:
    dep = kube.get("Deployment", ns, WORKERS) or {}
    containers = dep.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])
    return {e["name"]: e.get("value", "") for c in containers for e in c.get("env", [])}


def test_a_changed_output_path_keeps_the_old_one_writable_for_queued_requests(
        kube: Kube) -> None:
    """Requests queued before outputPath/failurePath changed were told the old locations:
    the workers rendered after the change carry the old pair (read from the workers that
    ran). That re-rendering keeps the deadline is tests/unit/test_async_paths.py's."""
    ns = "async-moved"
    kube.create_namespace(ns)
    assert kube.create(_on_cluster(EXAMPLE), ns).status_code == 201
    wait_for(lambda: _worker_env(kube, ns).get("KUBEINFER_OUTPUT_PATH") == "s3://async-bucket/out",
             15, "the workers rendered")
    assert "KUBEINFER_FORMER_PATHS" not in _worker_env(kube, ns)
    kube.patch("Endpoint", ns, NAME, {"spec": {"async": {
        "outputPath": "s3://new-bucket/out", "failurePath": "s3://new-bucket/failed"}}})
    env = wait_for(lambda: (e := _worker_env(kube, ns)).get("KUBEINFER_OUTPUT_PATH")
                   == "s3://new-bucket/out" and e, 15, "the workers rendered again")
    former = parse_former_paths(env["KUBEINFER_FORMER_PATHS"])
    assert [(p.outputPath, p.failurePath) for p in former] == [
        ("s3://async-bucket/out", "s3://async-bucket/failed")]
    assert former[0].until > time.time() + FORMER_PATHS_GRACE_S - 120


def test_a_deleted_endpoint_leaves_no_queue_in_redis(kube: Kube, redis: RedisServer) -> None:
    """Nothing reads a deleted Endpoint's queue again: its stream (a backlog of up to
    maxQueuedRequests) and dead letters go with it, from a Redis every namespace shares.
    Another Endpoint's queue stays."""
    ns = "async-deleted"
    kube.create_namespace(ns)
    assert kube.create(_on_cluster(EXAMPLE), ns).status_code == 201
    wait_for(lambda: kube.get("Deployment", ns, WORKERS), 15, "the workers' Deployment")
    gone = AsyncQueueKeys(queue=f"{ns}.{NAME}")
    kept = AsyncQueueKeys(queue=f"{NS}.{NAME}")
    rds = redis.client()
    for i in range(5):
        rds.xadd(gone.stream, {"id": f"req-{i}"})
    rds.xadd(gone.dead_letter, {"id": "dead"})
    rds.xadd(kept.stream, {"id": "someone-elses"})
    assert kube.delete("Endpoint", ns, NAME).status_code == 200
    wait_for(lambda: kube.get("Endpoint", ns, NAME) is None, 15, "Endpoint gone")
    wait_for(lambda: not rds.exists(gone.stream, gone.dead_letter), 30,
             "the deleted Endpoint's queue removed")
    assert rds.exists(kept.stream)
    rds.xdel(kept.stream, *[i for i, _ in rds.xrange(kept.stream)
                            if _.get("id") == "someone-elses"])


def test_the_namespace_user_goes_with_its_last_endpoint(kube: Kube, redis: RedisServer) -> None:
    """The namespace's Redis user stays while an Endpoint of the namespace remains, and is
    removed with the last one (its runtime Secret goes then too)."""
    ns = "async-last"
    user = f"kubeinfer-ns-{ns}"
    kube.create_namespace(ns)
    second = copy.deepcopy(_on_cluster(EXAMPLE))
    second["metadata"]["name"] = "second"
    for doc in (_on_cluster(EXAMPLE), second):
        assert kube.create(doc, ns).status_code == 201
    rds = redis.client()
    wait_for(lambda: user in rds.execute_command("ACL", "USERS"), 15, "the namespace's user")
    assert kube.delete("Endpoint", ns, NAME).status_code == 200
    wait_for(lambda: kube.get("Endpoint", ns, NAME) is None, 15, "the first Endpoint gone")
    assert user in rds.execute_command("ACL", "USERS")  # the second still uses it
    assert kube.delete("Endpoint", ns, "second").status_code == 200
    wait_for(lambda: user not in rds.execute_command("ACL", "USERS"), 30,
             "the namespace's user removed with its last Endpoint")
