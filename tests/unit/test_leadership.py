"""Which replica acts: the same rule kopf's peering applies (reconcile.leadership)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from kubeinfer_operator.k8s.peering import Peering
from kubeinfer_operator.reconcile.leadership import is_active, live_peers

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


def beat(priority: int, ago_s: float, lifetime: int = 10) -> dict[str, Any]:
    return {"priority": priority, "lifetime": lifetime,
            "lastseen": (NOW - timedelta(seconds=ago_s)).isoformat()}


def test_highest_live_priority_is_active() -> None:
    status = {"a": beat(200, 1), "b": beat(100, 1)}
    assert is_active(status, "a", 200, NOW)
    assert not is_active(status, "b", 100, NOW)


def test_an_expired_or_departed_peer_does_not_count() -> None:
    status = {"a": beat(200, 11), "b": beat(100, 1), "c": None}
    assert live_peers(status, NOW) == {"b": 100}
    assert is_active(status, "b", 100, NOW)


def test_a_tie_pauses_both_as_kopf_does() -> None:
    status = {"a": beat(100, 1), "b": beat(100, 1)}
    assert not is_active(status, "a", 100, NOW)
    assert not is_active(status, "b", 100, NOW)


def test_no_heartbeat_yet_and_garbage_entries() -> None:
    assert is_active(None, "a", 1, NOW)
    assert is_active({"x": {"priority": "high", "lastseen": "yesterday"},
                      "y": "not a mapping"}, "a", 1, NOW)
    # Our own stale entry never outranks us.
    assert is_active({"a": beat(500, 1)}, "a", 1, NOW)


class FakeKube:
    def __init__(self, body: dict[str, Any] | None) -> None:
        self.body = body
        self.paths: list[str] = []

    async def get_path(self, path: str) -> dict[str, Any] | None:
        self.paths.append(path)
        return self.body


def test_peering_reads_the_right_object_and_caches_a_second() -> None:
    now = datetime.now(UTC).isoformat()
    kube = FakeKube({"status": {"other": {"priority": 9, "lifetime": 60, "lastseen": now}}})
    clock = [0.0]
    peering = Peering(kube, name="kubeinfer", identity="me", priority=5,  # type: ignore[arg-type]
                      clusterwide=False, clock=lambda: clock[0])
    assert not asyncio.run(peering.active("team-a"))
    assert kube.paths == ["/apis/kopf.dev/v1/namespaces/team-a/kopfpeerings/kubeinfer"]
    clock[0] = 0.5
    assert not asyncio.run(peering.active("team-a"))
    assert len(kube.paths) == 1
    kube.body = None  # the other replica's object is gone: we act
    clock[0] = 2.0
    assert asyncio.run(peering.active("team-a"))
    assert Peering(None, name="k", identity="me", priority=1, clusterwide=True)._path("x") == (
        "/apis/kopf.dev/v1/clusterkopfpeerings/k")


@pytest.mark.parametrize("info", [
    {"lifetime": "1e400", "priority": 5}, {"lifetime": 1e12, "priority": 5},
    {"lifetime": "nan", "priority": 5}, {"lifetime": 60, "priority": 1e400},
    {"lifetime": 60, "priority": "nan"},
])
def test_a_garbled_heartbeat_counts_as_no_peer_instead_of_raising(info: dict[str, Any]) -> None:
    now = datetime.now(UTC)
    status = {"other": {"lastseen": now.isoformat(), **info}}
    assert is_active(status, "me", 0, now) is True
