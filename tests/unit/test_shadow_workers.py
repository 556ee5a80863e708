"""A shadow's copies follow its model servers: pods resolved one by one, and
``concurrency`` workers per server, resized in place when it scales (no copy lost).

In-process: ``Peer`` with a stand-in upstream client that holds each request
until the test lets it answer, so how many copies are in flight is observable.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from kubeinfer_runtime.contract import EndpointRoute, RouteTable, VariantRoute
from kubeinfer_runtime.contract.shadow import ShadowRoute
from kubeinfer_runtime.gateway import shadow as shadow_module
from kubeinfer_runtime.gateway.discovery import dns_upstreams, expand
from kubeinfer_runtime.gateway.shadow import Peer, PeerConfig
from kubeinfer_runtime.gateway.taps import Exchange
from kubeinfer_runtime.gateway.upstream import UpstreamResponse

SVC = "http://iris-cand.ns.svc:8080"
#: Its own endpoint name: the metrics are process-wide, counted from zero here.
ENDPOINT = "shadow-workers-test"


def config(*upstreams: str, concurrency: int = 2, revision: str = "",
           sampling: float = 100.0) -> PeerConfig:
    return PeerConfig(name="cand", upstreams=upstreams, sampling_percentage=sampling,
                      timeout_s=5.0, queue_size=1000, concurrency=concurrency,
                      revision=revision)


def exchange(i: int) -> Exchange:
    return Exchange(endpoint=ENDPOINT, variant="primary", request_body=b"%d" % i, status=200,
                    response_body=b"[0]", response_content_type="application/json",
                    upstream_latency_s=0.001, event_id=str(i), wall_time=0.0)


class HeldClient:
    """Answers each request only when ``release`` is called; counts them by URL."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.by_url: Counter[str] = Counter()
        self.gate = asyncio.Event()

    async def request(self, url: str, *args: Any, **kw: Any) -> UpstreamResponse:
        self.by_url[url] += 1
        self.in_flight += 1
        try:
            await self.gate.wait()
        finally:
            self.in_flight -= 1
        return UpstreamResponse(200, [(b"content-type", b"application/json")], b"[0]")


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def test_workers_are_concurrency_per_model_server_capped() -> None:
    assert config().workers == 2  # no server yet: still one set (copies fail fast)
    assert config("a", "b", "c").workers == 6
    assert config(*(f"u{i}" for i in range(300)), concurrency=8).workers == \
        shadow_module.MAX_WORKERS


async def test_a_scaled_shadow_gets_workers_for_its_new_servers_and_loses_no_copy() -> None:
    client = HeldClient()
    peer = Peer(ENDPOINT, config("http://a"), client)  # type: ignore[arg-type]
    for i in range(40):
        peer.offer(exchange(i), None)
    await settle()
    assert (len(peer.workers), client.in_flight) == (2, 2)

    # Scaled out to three servers: six in flight, spread round-robin over them.
    peer.config = config("http://a", "http://b", "http://c")
    peer.resize()
    await settle()
    assert (len(peer.workers), client.in_flight) == (6, 6)

    # Back to one: the surplus workers finish the copy in hand, then leave.
    peer.config = config("http://a")
    peer.resize()
    assert len(peer.workers) == 2
    client.gate.set()
    for _ in range(200):
        await settle()
        if peer.queue.empty() and client.in_flight == 0:
            break
    sent = peer._series("primary").sent
    assert sent._value.get() == 40  # every copy sent once: none lost to the resize
    assert len(peer._retiring) == 0 or all(t.done() for t in peer._retiring)
    assert {url for url in client.by_url} >= {"http://a", "http://b", "http://c"}
    await peer.stop()
    assert not peer.workers and not peer._retiring


def test_shadows_behind_headless_services_are_resolved_per_pod() -> None:
    table = RouteTable(revision=1, endpoints={"iris": EndpointRoute(
        name="iris",
        variants=[VariantRoute(name="primary", weight=1, upstreams=["http://p:8080"])],
        shadows=[ShadowRoute(name="cand", upstreams=[SVC], discovery="dns")])})
    assert dns_upstreams(table) == {SVC}
    out = expand(table, {SVC: ("http://10.0.0.1:8080", "http://10.0.0.2:8080")})
    [shadow] = out.endpoints["iris"].shadows
    assert shadow.upstreams == ["http://10.0.0.1:8080", "http://10.0.0.2:8080"]
    assert out.endpoints["iris"].variants[0].upstreams == ["http://p:8080"]


async def test_a_new_shadow_version_starts_its_comparison_over() -> None:
    """The shadow's counts describe one version of it: a new revision (its servers'
    spec changed) drops the peer's series; other config changes keep them."""
    from prometheus_client import REGISTRY

    from kubeinfer_runtime.gateway.shadow import ShadowTap, ShadowTaps

    endpoint = "shadow-revision-test"
    taps = ShadowTaps()
    tap = ShadowTap(endpoint, taps.rng)
    key = ("shadow", "cand")
    client = HeldClient()
    client.gate.set()

    def sent() -> float | None:
        return REGISTRY.get_sample_value("kubeinfer_shadow_copies_total", {
            "endpoint": endpoint, "variant": "primary", "peer": "cand", "result": "sent"})

    async def copies(n: int, expected: float) -> None:
        peer = tap.peers[key]
        peer.client = client  # type: ignore[assignment]
        for i in range(n):
            peer.offer(exchange(i)._replace(endpoint=endpoint), None)
        for _ in range(200):
            await settle()
            if sent() == expected:
                return
        raise AssertionError(f"sent {sent()}, expected {expected}")

    taps._update(tap, {key: config("http://a", revision="r1")})
    await copies(5, 5.0)
    taps._update(tap, {key: config("http://a", "http://b", revision="r1", sampling=50.0)})
    assert sent() == 5.0  # scaled, resampled: the same version, the same comparison
    taps._update(tap, {key: config("http://a", revision="r2")})
    assert sent() is None  # a new version: its series start over
    await copies(2, 2.0)
    for peer in tap.peers.values():
        await peer.stop()


async def test_a_peer_holds_a_bounded_number_of_bytes_not_only_of_copies() -> None:
    """256 copies of 6 MiB bodies would be 1.5 GiB: past the byte bound (queued or
    being sent) copies are dropped and counted; a copy done with frees its room."""
    from prometheus_client import REGISTRY

    endpoint = "shadow-bytes-test"

    def dropped() -> float:
        return REGISTRY.get_sample_value("kubeinfer_shadow_copies_total", {
            "endpoint": endpoint, "variant": "primary", "peer": "cand",
            "result": "dropped"}) or 0.0

    def big(i: int, size: int = 1000) -> Exchange:
        return exchange(i)._replace(endpoint=endpoint, request_body=bytes(size - 3))

    client = HeldClient()  # response body b"[0]": each copy holds 1000 bytes
    peer = Peer(endpoint, config("http://a", concurrency=2), client,  # type: ignore[arg-type]
                max_held_bytes=5000)
    for i in range(10):
        peer.offer(big(i), None)
    await settle()
    # Five held (two being sent, three queued), five dropped: the queue takes 1000.
    assert (client.in_flight, peer.queue.qsize(), peer.held_bytes) == (2, 3, 5000)
    assert dropped() == 5.0
    client.gate.set()
    for _ in range(200):
        await settle()
        if peer.held_bytes == 0 and client.in_flight == 0:
            break
    assert peer.held_bytes == 0 and peer._series("primary").sent._value.get() == 5
    # A copy larger than the bound alone goes out when the peer holds nothing else.
    client.gate.clear()
    peer.offer(big(10, 9000), None)
    peer.offer(big(11), None)
    await settle()
    assert (peer.held_bytes, dropped()) == (9000, 6.0)
    client.gate.set()
    for _ in range(200):
        await settle()
        if peer.held_bytes == 0:
            break
    # Stopping lets go of the copies queued at once, and of those in hand as each
    # worker ends.
    client.gate.clear()
    for i in range(4):
        peer.offer(big(20 + i), None)
    await settle()
    assert (client.in_flight, peer.queue.qsize(), peer.held_bytes) == (2, 2, 4000)
    peer.cancel()
    assert peer.queue.empty() and peer.held_bytes == 2000
    await settle()
    assert peer.held_bytes == 0
