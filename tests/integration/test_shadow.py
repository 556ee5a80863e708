"""Shadow variants end to end: a real gateway process and real upstream processes.

Production and the shadows are ``tests.support.label_upstream`` (uvicorn
processes answering ``[i % 3]`` for a CSV row ``i``); the "flip" shadow answers
differently for exactly 10 % of rows, so its agreement must be exactly 90 %
when every request is copied. The operator's parser
(``reconcile.shadow_status``) reads the gateway's metrics, as it does for
status.shadow, so the whole path is checked.
"""

from __future__ import annotations

import itertools
import json
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kubeinfer_operator.reconcile import shadow_status
from kubeinfer_runtime.contract import EndpointRoute, RouteTable, VariantRoute
from kubeinfer_runtime.contract.capture import CaptureRoute
from kubeinfer_runtime.contract.shadow import MirrorRoute, ShadowRoute
from tests.support.label_upstream import start_label_upstream
from tests.support.ports import wait_until
from tests.support.procs import RuntimeProcess, start_runtime

_revisions = itertools.count(1)


@pytest.fixture(scope="module")
def upstreams(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, RuntimeProcess]]:
    logs = tmp_path_factory.mktemp("upstreams")
    procs: dict[str, RuntimeProcess] = {}
    try:
        procs["production"] = start_label_upstream("production", logs)
        procs["flip"] = start_label_upstream("flip", logs, FLIP_PERCENT="10")
        procs["slow"] = start_label_upstream("slow", logs, SLEEP_S="5")
        procs["failing"] = start_label_upstream("failing", logs, STATUS="500")
        yield procs
    finally:
        for proc in procs.values():
            proc.stop()


def _gateway(tmp_path: Path, endpoints: dict[str, EndpointRoute]) -> RuntimeProcess:
    routes = tmp_path / "routes.json"
    RouteTable(revision=next(_revisions), endpoints=endpoints).write_atomic(routes)
    return start_runtime("gateway", {
        "KUBEINFER_ROUTE_TABLE_PATH": str(routes),
        "KUBEINFER_ROUTE_RELOAD_INTERVAL_S": "0.1",
        "KUBEINFER_HEALTH_INTERVAL_S": "0.2",
        "KUBEINFER_CAPTURE_FLUSH_INTERVAL_S": "0.2"}, tmp_path / "logs")


def _route(name: str, production: RuntimeProcess, shadows: list[ShadowRoute],
           capture: CaptureRoute | None = None) -> EndpointRoute:
    return EndpointRoute(name=name, variants=[VariantRoute(
        name="primary", weight=1, upstreams=[production.url])], shadows=shadows,
        capture=capture)


def _invoke(client: httpx.Client, gateway: RuntimeProcess, endpoint: str,
            i: int) -> httpx.Response:
    return client.post(f"{gateway.url}/endpoints/{endpoint}/invocations",
                       content=f"{i},5.1\n".encode(), headers={"Content-Type": "text/csv"})


def _totals(gateway: RuntimeProcess, endpoint: str) -> dict[str, shadow_status.PeerTotals]:
    return shadow_status.parse(httpx.get(gateway.url + "/metrics", timeout=5).text, endpoint)


def test_copies_at_the_rate_compared_and_captured(
        tmp_path: Path, upstreams: dict[str, RuntimeProcess]) -> None:
    captures = tmp_path / "captures"
    flip = upstreams["flip"].url
    gateway = _gateway(tmp_path, {"iris": _route("iris", upstreams["production"], [
        ShadowRoute(name="flip", sampling_percentage=100, upstreams=[flip]),
        ShadowRoute(name="sampled", sampling_percentage=25, upstreams=[flip])],
        CaptureRoute(destination=f"file://{captures}", sampling_percentage=50))})
    # 4,000 draws: ±3 points around 25 % is then 4.4 standard deviations (at the issue's
    # 2,000 it was 3.1, a failure in about 500 runs of a correct sampler).
    n = 4000
    try:
        with httpx.Client(timeout=10) as client:
            for i in range(n):
                r = _invoke(client, gateway, "iris", i)
                assert r.status_code == 200 and r.json() == [i % 3]

        def done() -> bool:
            t = _totals(gateway, "iris")
            return ("flip" in t and t["flip"].copies.get("sent", 0) == n
                    and "sampled" in t and sum(t["sampled"].copies.values()) > 0
                    and t["sampled"].compared == t["sampled"].copies.get("sent", -1))
        wait_until(done, 20, "every copy answered and compared")
        totals = _totals(gateway, "iris")
        flipped = totals["flip"]
        assert flipped.compared == n and flipped.agreed == 0.9 * n
        assert flipped.disagreed == 0.1 * n and flipped.copies.get("dropped", 0) == 0
        sampled = totals["sampled"]
        share = 100 * sum(sampled.copies.values()) / n
        assert abs(share - 25) <= 3, share
        entry = shadow_status.entries(["flip"], totals)[0]
        assert entry["agreementPercent"] == 90.0 and entry["requestsCompared"] == n
        assert entry["shadowErrors"] == 0 and entry["productionErrors"] == 0
        assert entry["shadowLatencyP50Ms"] > 0 and entry["productionLatencyP99Ms"] > 0

        # Capture: each flip record pairs with production's record by eventId.
        def records(variant: str) -> dict[str, dict[str, object]]:
            out: dict[str, dict[str, object]] = {}
            for path in (captures / "iris" / variant).rglob("*.jsonl"):
                for line in path.read_text().splitlines():
                    rec = json.loads(line)
                    out[rec["eventMetadata"]["eventId"]] = rec
            return out
        wait_until(lambda: len(records("flip")) > 0
                   and set(records("flip")) == set(records("primary")), 20,
                   "the shadow's records paired with production's")
        production, shadow = records("primary"), records("flip")
        assert abs(len(production) - n / 2) < 0.1 * n
        for event_id, rec in shadow.items():
            data = rec["captureData"]
            assert isinstance(data, dict)
            assert data["endpointInput"] == production[event_id]["captureData"][  # type: ignore[index]
                "endpointInput"]
    finally:
        gateway.stop()


def test_a_slow_or_failing_shadow_never_hurts_production(
        tmp_path: Path, upstreams: dict[str, RuntimeProcess]) -> None:
    production = upstreams["production"]
    gateway = _gateway(tmp_path, {
        "plain": _route("plain", production, []),
        "shadowed": _route("shadowed", production, [
            ShadowRoute(name="slow", upstreams=[upstreams["slow"].url], timeout_s=10,
                        queue_size=16, concurrency=2),
            ShadowRoute(name="failing", upstreams=[upstreams["failing"].url]),
            ShadowRoute(name="absent", upstreams=["http://127.0.0.1:9"])])})
    latencies: dict[str, list[float]] = {"plain": [], "shadowed": []}
    try:
        with httpx.Client(timeout=10) as client:
            for i in range(600):
                for endpoint in ("plain", "shadowed"):
                    started = time.perf_counter()
                    r = _invoke(client, gateway, endpoint, i)
                    latencies[endpoint].append(time.perf_counter() - started)
                    assert r.status_code == 200, r.text
        plain = statistics.median(latencies["plain"][100:])
        shadowed = statistics.median(latencies["shadowed"][100:])
        assert shadowed <= plain * 1.5 + 0.001, (plain, shadowed)

        def counted() -> bool:
            t = _totals(gateway, "shadowed")
            return (t["failing"].copies.get("sent", 0) == 600
                    and t["absent"].copies.get("failed", 0) == 600)
        wait_until(counted, 20, "the failing and absent shadows' copies counted")
        totals = _totals(gateway, "shadowed")
        assert totals["failing"].errors.get("peer") == 600
        assert totals["failing"].errors.get("production", 0) == 0
        assert totals["slow"].copies.get("dropped", 0) > 500  # a queue of 16, 2 at a time
        assert "plain" not in _totals(gateway, "plain")  # no shadow: no series
    finally:
        gateway.stop()


def test_a_mirror_counts_disagreeing_pairs_for_the_rollout_alarm(
        tmp_path: Path, upstreams: dict[str, RuntimeProcess]) -> None:
    """Blue answers; a copy of every blue request goes to green (weight 0 here)."""
    gateway = _gateway(tmp_path, {"iris": EndpointRoute(name="iris", variants=[
        VariantRoute(name="blue", weight=1, upstreams=[upstreams["production"].url]),
        VariantRoute(name="green", weight=0, upstreams=[upstreams["flip"].url])],
        mirrors=[MirrorRoute(source="blue", peer="green", sampling_percentage=100)])})
    try:
        with httpx.Client(timeout=10) as client:
            for i in range(500):
                assert _invoke(client, gateway, "iris", i).status_code == 200
        wait_until(lambda: _totals(gateway, "iris").get(
            "green", shadow_status.PeerTotals()).compared == 500, 20, "500 pairs compared")
        green = _totals(gateway, "iris")["green"]
        assert green.disagreed == 50 and green.agreed == 450
    finally:
        gateway.stop()
