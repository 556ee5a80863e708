"""Event-driven status: the operator watches its Deployments instead of polling them.

The operator here runs with slow timers (30 s scaler rounds and resyncs), so
anything that happens within a second is the Deployment watch's doing: Ready
comes up within 1 s of the last Deployment becoming available, a rollout's
progress shows at once, and an idle Endpoint costs no API request at all.
"""

from __future__ import annotations

import copy
import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubeinfer_operator.settings import OperatorSettings
from tests.support.kube_emulator import KubeEmulator
from tests.support.kube_harness import Kube, operator_on_emulator, wait_for

REPO = Path(__file__).resolve().parents[2]
EXAMPLE: dict[str, Any] = yaml.safe_load((REPO / "examples" / "realtime-endpoint.yaml").read_text())
SLOW_S = 30.0
SETTINGS = OperatorSettings(standalone=True, status_interval_s=SLOW_S, resync_interval_s=SLOW_S,
                            namespaces=[], runtime_image="example.test/runtime:1",
                            s3_secret_name=None)
DEPLOYMENTS = ("iris-gateway", "iris-primary", "iris-canary")
#: Ready after the last Deployment is available, at most (the issue's target).
READY_WITHIN_S = 1.0
_ids = itertools.count()


@dataclass
class Cluster:
    kube: Kube
    emulator: KubeEmulator


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with operator_on_emulator(SETTINGS, tmp_path_factory.mktemp("kube")) as (kube, emu):
        assert emu.emulator is not None
        yield Cluster(kube, emu.emulator)


@pytest.fixture
def ns(cluster: Cluster) -> str:
    name = f"ev{next(_ids)}"
    cluster.kube.create_namespace(name)
    return name


def _condition(kube: Kube, ns: str, type_: str) -> dict[str, Any]:
    obj = kube.get("Endpoint", ns, "iris") or {}
    return next((c for c in (obj.get("status") or {}).get("conditions", [])
                 if c["type"] == type_), {})


def _ready(kube: Kube, ns: str) -> dict[str, Any]:
    return _condition(kube, ns, "Ready")


def _other_namespace(path: str, ns: str) -> bool:
    """Whether an API path names a namespace other than ``ns``."""
    parts = path.split("?")[0].split("/")
    return any(a == "namespaces" and i + 1 < len(parts) and parts[i + 1] != ns
               for i, a in enumerate(parts))


def _created(kube: Kube, ns: str) -> None:
    assert kube.create(copy.deepcopy(EXAMPLE), ns).status_code == 201
    wait_for(lambda: all(kube.get("Deployment", ns, d) for d in DEPLOYMENTS), 10,
             "three Deployments")
    wait_for(lambda: _ready(kube, ns).get("reason") == "GatewayUnavailable", 10,
             "the first status")


def test_ready_within_a_second_of_the_last_deployment(cluster: Cluster, ns: str) -> None:
    kube = cluster.kube
    _created(kube, ns)
    kube.make_available(ns, "iris-gateway")
    kube.make_available(ns, "iris-primary")
    # Before the clock starts: both in status, so what is timed is the canary's reconcile
    # alone (a reconcile that saw only the gateway also says VariantsUnavailable).
    wait_for(lambda: _ready(kube, ns).get("reason") == "VariantsUnavailable"
             and _condition(kube, ns, "VariantReady-primary").get("status") == "True", 10,
             "the gateway's and the primary's availability in status")
    started = time.monotonic()
    kube.make_available(ns, "iris-canary")
    wait_for(lambda: _ready(kube, ns).get("status") == "True", READY_WITHIN_S,
             f"Ready within {READY_WITHIN_S}s of the last Deployment", interval=0.01)
    elapsed = time.monotonic() - started
    print(f"Ready {elapsed * 1000:.0f} ms after the last Deployment became available")
    assert elapsed <= READY_WITHIN_S


def test_a_rollout_shows_in_status_at_once(cluster: Cluster, ns: str) -> None:
    kube = cluster.kube
    _created(kube, ns)
    for name in DEPLOYMENTS:
        kube.make_available(ns, name)
    wait_for(lambda: _ready(kube, ns).get("status") == "True", 10, "Ready")
    # Pods of the canary go away (a node drained): status says so without a timer.
    kube.make_available(ns, "iris-canary", replicas=0)
    wait_for(lambda: _ready(kube, ns).get("reason") == "VariantsUnavailable", READY_WITHIN_S,
             "the canary's loss in status")


def test_an_idle_endpoint_costs_no_api_request(cluster: Cluster, ns: str) -> None:
    kube = cluster.kube
    _created(kube, ns)
    for name in DEPLOYMENTS:
        kube.make_available(ns, name)
    wait_for(lambda: _ready(kube, ns).get("status") == "True", 10, "Ready")

    def operator_requests() -> list[tuple[str, str, str]]:
        # The test's own client is httpx; kopf and the operator's client are not. The
        # Endpoints of the module's earlier tests are idle too, but their resync (every
        # SLOW_S, first SLOW_S after their creation) may fall into this window on a slow
        # run: requests about their namespaces are theirs, not this Endpoint's.
        return [r for r in cluster.emulator.requests if "python-httpx" not in r[2]
                and not _other_namespace(r[1], ns)]

    def settled() -> int | None:
        # Quiet once the last status write and its echo have passed. Half a second: the
        # reconcile's last requests (its Event, a coalesced re-read) follow each other
        # within milliseconds, unless a loaded machine stalls the operator's thread.
        before = len(operator_requests())
        time.sleep(0.5)
        return before if len(operator_requests()) == before else None

    baseline = wait_for(settled, 10, "the operator to go quiet")
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        made = operator_requests()[baseline:]
        assert made == [], f"an idle Endpoint made API requests: {made}"
        time.sleep(0.05)
