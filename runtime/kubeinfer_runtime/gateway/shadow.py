"""Shadow variants and mirrors, the I/O: a tap that copies, workers that send and compare.

``ShadowTap.observe`` runs on the request path (see ``taps``): for each peer
of the endpoint (a shadow variant, ``contract.ShadowRoute``, or a mirror,
``contract.MirrorRoute``) one sampling draw, then a ``put_nowait`` of the
shared ``Exchange`` on the peer's bounded queue; a full queue drops the copy
and counts it (``result="dropped"``), and so does a peer already holding
``MAX_HELD_BYTES`` of bodies (request plus response, queued or being sent):
the queue's length alone would let 256 copies of 6 MiB bodies take 1.5 GiB of
a gateway limited to 512 MiB. Nothing else happens there.

Each peer has ``concurrency`` worker tasks per model server (per upstream URL:
a shadow that scales out gets the workers to feed its new replicas, and its
pods are resolved one by one as a variant's are). A worker sends the copy (the
request body and the headers production got) to the peer's model servers
round-robin, with the peer's own ``UpstreamClient`` (its own connections:
never production's pool, admission slots or health table) and the peer's
``timeout_s`` around the whole attempt. Then it records, labelled
(endpoint, production variant, peer): the copy's outcome, each side's latency
and errors, and, when both answered 2xx, the comparison (``compare``):
compared / agreed / disagreed pairs and the numeric differences. The peer's
answer is read up to twice production's answer to the same request (at least
``PEER_ANSWER_FLOOR_BYTES``, at most the gateway's ``max_response_bytes``):
a larger one fails the copy as soon as it passes the bound, so a peer that
answers without end costs the gateway that much, not its memory. What a
comparison costs grows with the values it parses, not with bytes: a pair of
at most ``INLINE_COMPARE_BYTES`` and ``compare.INLINE_COMPARE_VALUES``
(``compare.cost``) is compared on the event loop; any other in a thread, one
at a time in the whole gateway (``ShadowTaps.compare_gate``: a pair of large
answers takes tens of MiB and a share of the GIL, and the default executor's
few threads also write captures), where a pair over
``compare.MAX_COMPARE_VALUES`` or ``MAX_COMPARE_BYTES`` is not parsed at all:
byte-for-byte equal answers agree, others are counted as not compared
(``kubeinfer_shadow_uncompared_total``). So a slow, failing,
absent or hostile peer costs production one draw and one queue append per
request, nothing more.

Capture of comparisons: when the endpoint captures (``capture_writer``) and
captured this request's production answer, a shadow's answer to the copy is
captured too, as a record of the shadow (``<destination>/<endpoint>/<shadow>/
yyyy/mm/dd/hh/``) with the same ``eventMetadata.eventId`` as production's
record: join the two folders on eventId. Mirrors are not captured (their peer
is a production variant, whose own records are in its folder).

Metrics: ``metrics.SHADOW_*`` (names in ``contract.shadow``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import dataclass
from typing import Any, NamedTuple

from kubeinfer_runtime import metrics
from kubeinfer_runtime.contract import RouteTable
from kubeinfer_runtime.contract.shadow import (
    SIDE_PEER,
    SIDE_PRODUCTION,
    MirrorRoute,
    ShadowRoute,
)
from kubeinfer_runtime.gateway.capture_writer import CaptureTap
from kubeinfer_runtime.gateway.compare import (
    INLINE_COMPARE_VALUES,
    Verdict,
    compare,
    compare_bounded,
    cost,
)
from kubeinfer_runtime.gateway.routing import RouteState
from kubeinfer_runtime.gateway.taps import Exchange, Tap
from kubeinfer_runtime.gateway.upstream import UpstreamClient, UpstreamError

log = logging.getLogger("kubeinfer.gateway")

_INVOCATIONS_PATH = b"/invocations"
_CONTENT_TYPE = b"content-type"
#: Pairs whose bodies together exceed this are compared in a thread (so are pairs of
#: more than ``compare.INLINE_COMPARE_VALUES`` values): counting a pair's values on the
#: event loop costs a few microseconds at this size.
INLINE_COMPARE_BYTES = 4 << 10
#: A peer's answer is read up to twice production's answer, and at least this.
PEER_ANSWER_FLOOR_BYTES = 1 << 20

#: Workers of one peer at most, however many model servers it has.
MAX_WORKERS = 1024
#: Request plus response bytes one peer holds at most (copies queued or being sent);
#: past it new copies are dropped and counted. A copy larger than this is taken only
#: when the peer holds nothing else, so one peer holds at most this or one copy.
MAX_HELD_BYTES = 64 << 20
#: The metric series created for each (endpoint, peer), by every ``Peer`` that counted
#: for it (a peer restarted for a new queue size included): what ``restart_counts`` drops.
_SERIES: dict[tuple[str, str], set[tuple[Any, tuple[str, ...]]]] = {}

SENT = "sent"
FAILED = "failed"
DROPPED = "dropped"


@dataclass(frozen=True, slots=True)
class PeerConfig:
    """Where one peer's copies go and how (a shadow or a mirror, resolved)."""

    #: The shadow's name, or the mirror's peer variant.
    name: str
    upstreams: tuple[str, ...]
    sampling_percentage: float
    timeout_s: float
    queue_size: int
    concurrency: int
    #: Mirrors only: the production variant whose requests are copied (None: any).
    source: str | None = None
    #: Capture the peer's answers when production's were (shadows only).
    capture: bool = False
    #: Shadows: what its model servers run (``ShadowRoute.revision``).
    revision: str = ""

    @property
    def workers(self) -> int:
        """Copies in flight at most: ``concurrency`` per model server."""
        return min(MAX_WORKERS, self.concurrency * max(1, len(self.upstreams)))


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one copy: the peer's answer (or none) and the comparison."""

    result: str
    status: int | None = None
    latency_s: float | None = None
    verdict: Verdict | None = None
    #: Both answered 2xx, too large to compare, and not byte for byte equal.
    uncompared: bool = False


def answer_limit(production_bytes: int, max_response_bytes: int | None) -> int:
    """The largest answer read from a peer for a copy whose production answer was
    ``production_bytes`` long: twice that, at least ``PEER_ANSWER_FLOOR_BYTES``, at most
    ``max_response_bytes`` (the gateway's bound on every answer)."""
    limit = max(PEER_ANSWER_FLOOR_BYTES, 2 * production_bytes)
    return limit if max_response_bytes is None else min(limit, max_response_bytes)


class Peer:
    """One peer of one endpoint: its queue, its workers and its counters."""

    def __init__(self, endpoint: str, config: PeerConfig, client: UpstreamClient, *,
                 max_held_bytes: int = MAX_HELD_BYTES, max_response_bytes: int | None = None,
                 compare_gate: asyncio.Semaphore | None = None) -> None:
        self.endpoint = endpoint
        self.config = config
        self.client = client
        self.max_held_bytes = max_held_bytes
        self.max_response_bytes = max_response_bytes
        #: Held while a pair is compared in a thread (``ShadowTaps``: one per gateway).
        self.compare_gate = compare_gate or asyncio.Semaphore(1)
        #: Body bytes of the copies queued or being sent (the exchange is shared with
        #: other peers and taps, so this counts what this peer keeps alive).
        self.held_bytes = 0
        self.queue: asyncio.Queue[tuple[Exchange, CaptureTap | None]] = asyncio.Queue(
            config.queue_size)
        #: The worker tasks in service; one leaves this set to retire after its copy.
        self.workers: set[asyncio.Task[None]] = set()
        #: Retired workers still finishing a copy (referenced until done).
        self._retiring: set[asyncio.Task[None]] = set()
        self._cursor = 0
        self._children: dict[tuple[Any, ...], Any] = {}
        self._by_variant: dict[str, _Series] = {}
        #: Copies let go unsent or unanswered when the workers were cancelled (shutdown, or
        #: the peer left the table): counted as dropped, and ``ShadowTaps.close`` logs them.
        self.abandoned = 0

    # -- the request path ------------------------------------------------------------------

    def offer(self, exchange: Exchange, capture: CaptureTap | None) -> None:
        """Queue a copy of ``exchange`` (never blocks: a full queue, or one holding
        ``max_held_bytes`` already, drops and counts)."""
        if not self.workers:
            self.resize()  # started on its first copy
        size = _size(exchange)
        if self.held_bytes and self.held_bytes + size > self.max_held_bytes:
            self._counter(metrics.SHADOW_COPIES, exchange.variant, DROPPED).inc()
            return
        try:
            self.queue.put_nowait((exchange, capture))
        except asyncio.QueueFull:
            self._counter(metrics.SHADOW_COPIES, exchange.variant, DROPPED).inc()
            return
        self.held_bytes += size

    # -- the workers -----------------------------------------------------------------------

    def resize(self) -> None:
        """Match the workers to the config (its model servers came or went): add them,
        or retire the surplus, each once its copy in hand is done (none is lost)."""
        want = self.config.workers
        while len(self.workers) < want:
            self.workers.add(asyncio.create_task(
                self._work(), name=f"shadow-{self.config.name}-{len(self.workers)}"))
        while len(self.workers) > want:
            task = self.workers.pop()
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    def cancel(self) -> list[asyncio.Task[None]]:
        """Cancel every worker (copies still queued are not sent, and let go of at
        once: an old table's tap may still be referenced); the tasks."""
        tasks = [*self.workers, *self._retiring]
        for task in tasks:
            task.cancel()
        self.workers, self._retiring = set(), set()
        while not self.queue.empty():
            exchange, _ = self.queue.get_nowait()
            self.held_bytes -= _size(exchange)
            self._abandon(exchange)
        return tasks

    def _abandon(self, exchange: Exchange) -> None:
        """A copy that will never be sent or answered: dropped, and counted so (a copy may
        be dropped, but never silently)."""
        self._counter(metrics.SHADOW_COPIES, exchange.variant, DROPPED).inc()
        self.abandoned += 1

    async def stop(self) -> None:
        for task in self.cancel():
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _work(self) -> None:
        me = asyncio.current_task()
        while me in self.workers:
            exchange, capture = await self.queue.get()
            try:
                outcome = await self.send(exchange, capture)
                self.record(exchange, outcome)
            except asyncio.CancelledError:
                self._abandon(exchange)  # cancelled (``cancel``) with this copy in hand
                raise
            except Exception:
                log.exception("Endpoint %s: comparing with %s failed unexpectedly (reported "
                              "per copy; production is unaffected)", self.endpoint,
                              self.config.name)
            finally:  # the bodies stay alive until the copy is done with
                self.held_bytes -= _size(exchange)

    def _next_upstream(self) -> str | None:
        upstreams = self.config.upstreams
        if not upstreams:
            return None
        url = upstreams[self._cursor % len(upstreams)]
        self._cursor += 1
        return url

    async def send(self, exchange: Exchange, capture: CaptureTap | None) -> Outcome:
        """Send the copy, compare the answers; never raises for the peer's failures."""
        config = self.config
        url = self._next_upstream()
        if url is None:
            return Outcome(FAILED)
        started = time.perf_counter()
        try:
            response = await self.client.request(
                url, b"POST", _INVOCATIONS_PATH, exchange.forwarded, exchange.request_body,
                config.timeout_s, total=True,
                max_body=answer_limit(len(exchange.response_body), self.max_response_bytes))
        except (TimeoutError, UpstreamError, OSError):
            return Outcome(FAILED, latency_s=time.perf_counter() - started)
        latency = time.perf_counter() - started
        content_type_raw = response.header(_CONTENT_TYPE)
        content_type = content_type_raw.decode("latin-1") if content_type_raw else None
        if capture is not None and not capture.retired:
            capture.add(exchange._replace(variant=config.name, status=response.status,
                                response_body=response.body,
                                response_content_type=content_type, upstream_latency_s=latency))
        if exchange.status >= 300 or response.status >= 300:
            return Outcome(SENT, response.status, latency)
        args = (exchange.response_body, exchange.response_content_type, response.body,
                content_type)
        if (len(exchange.response_body) + len(response.body) <= INLINE_COMPARE_BYTES
                and cost(*args) <= INLINE_COMPARE_VALUES):
            return Outcome(SENT, response.status, latency, compare(*args))
        async with self.compare_gate:
            verdict = await asyncio.to_thread(compare_bounded, *args)
        return Outcome(SENT, response.status, latency, verdict, uncompared=verdict is None)

    def _counter(self, family: Any, variant: str, *extra: str) -> Any:
        key = (family, variant, *extra)
        child = self._children.get(key)
        if child is None:
            labels = (self.endpoint, variant, self.config.name, *extra)
            child = self._children[key] = family.labels(*labels)
            _SERIES.setdefault((self.endpoint, self.config.name), set()).add((family, labels))
        return child

    def restart_counts(self) -> None:
        """Drop every series of this peer (a new shadow version: its comparison starts
        over, as after a gateway restart; Prometheus reads it as a counter reset)."""
        for family, labels in _SERIES.pop((self.endpoint, self.config.name), set()):
            with contextlib.suppress(KeyError):
                family.remove(*labels)
        self._children.clear()
        self._by_variant.clear()

    def _series(self, variant: str) -> _Series:
        series = self._by_variant.get(variant)
        if series is None:
            c = self._counter
            series = self._by_variant[variant] = _Series(
                sent=c(metrics.SHADOW_COPIES, variant, SENT),
                failed=c(metrics.SHADOW_COPIES, variant, FAILED),
                latency_production=c(metrics.SHADOW_LATENCY_SECONDS, variant, SIDE_PRODUCTION),
                latency_peer=c(metrics.SHADOW_LATENCY_SECONDS, variant, SIDE_PEER),
                errors_production=c(metrics.SHADOW_ERRORS, variant, SIDE_PRODUCTION),
                errors_peer=c(metrics.SHADOW_ERRORS, variant, SIDE_PEER),
                compared=c(metrics.SHADOW_COMPARED, variant),
                uncompared=c(metrics.SHADOW_UNCOMPARED, variant),
                agreed=c(metrics.SHADOW_AGREED, variant),
                disagreed=c(metrics.SHADOW_DISAGREED, variant),
                abs_diff=c(metrics.SHADOW_ABS_DIFF, variant),
                rel_diff=c(metrics.SHADOW_REL_DIFF, variant))
        return series

    def record(self, exchange: Exchange, outcome: Outcome) -> None:
        m = self._series(exchange.variant)
        (m.sent if outcome.result == SENT else m.failed).inc()
        m.latency_production.observe(exchange.upstream_latency_s)
        if exchange.status >= 400:
            m.errors_production.inc()
        if outcome.latency_s is not None:
            m.latency_peer.observe(outcome.latency_s)
        if outcome.result == FAILED or (outcome.status or 0) >= 400:
            m.errors_peer.inc()
        if outcome.uncompared:
            m.uncompared.inc()
        verdict = outcome.verdict
        if verdict is None:
            return
        m.compared.inc()
        (m.agreed if verdict.agreed else m.disagreed).inc()
        if verdict.max_abs is not None:
            m.abs_diff.observe(verdict.max_abs)
        if verdict.max_rel is not None:
            m.rel_diff.observe(verdict.max_rel)


def _size(exchange: Exchange) -> int:
    """What one copy keeps alive: the request and production's response bodies."""
    return len(exchange.request_body) + len(exchange.response_body)


class _Series(NamedTuple):
    """One variant's shadow metrics, looked up once (each copy updates up to nine)."""

    sent: Any
    failed: Any
    latency_production: Any
    latency_peer: Any
    errors_production: Any
    errors_peer: Any
    compared: Any
    uncompared: Any
    agreed: Any
    disagreed: Any
    abs_diff: Any
    rel_diff: Any


class ShadowTap:
    """One endpoint's shadows and mirrors: samples and queues on the request path."""

    def __init__(self, endpoint: str, rng: random.Random) -> None:
        self.endpoint = endpoint
        self.peers: dict[tuple[str, str], Peer] = {}
        self.capture: CaptureTap | None = None
        self._rng = rng

    def observe(self, exchange: Exchange) -> None:
        capture = self.capture
        captured = capture if (capture is not None
                               and capture.last_event_id == exchange.event_id) else None
        rng = self._rng
        for peer in self.peers.values():
            config = peer.config
            if config.source is not None and config.source != exchange.variant:
                continue
            if rng.random() * 100.0 < config.sampling_percentage:
                peer.offer(exchange, captured if config.capture else None)


def _shadow_config(route: ShadowRoute) -> PeerConfig:
    return PeerConfig(name=route.name, upstreams=tuple(dict.fromkeys(route.upstreams)),
                      sampling_percentage=route.sampling_percentage, timeout_s=route.timeout_s,
                      queue_size=route.queue_size, concurrency=route.concurrency, capture=True,
                      revision=route.revision)


def _mirror_config(route: MirrorRoute, upstreams: tuple[str, ...]) -> PeerConfig:
    return PeerConfig(name=route.peer, upstreams=upstreams,
                      sampling_percentage=route.sampling_percentage, timeout_s=route.timeout_s,
                      queue_size=route.queue_size, concurrency=route.concurrency,
                      source=route.source)


class ShadowTaps:
    """The gateway's shadow taps, by endpoint: a tap provider for ``GatewayCore.apply``.

    ``apply`` keeps an endpoint's tap, and each peer's queue and workers, across
    reloads (a peer whose settings changed gets them in place, its workers resized
    to its model servers; a new queue size restarts them); peers and endpoints that
    went away are stopped.
    """

    def __init__(self, *, rng: random.Random | None = None, max_idle: int = 32,
                 max_response_bytes: int | None = None) -> None:
        self.rng = rng or random.Random()
        self.taps: dict[str, ShadowTap] = {}
        #: The peers' own connections (never production's ``GatewayCore.client``).
        self.client = UpstreamClient(max_idle=max_idle, max_response_bytes=max_response_bytes)
        self.max_response_bytes = max_response_bytes
        #: One comparison in a thread at a time, for every peer of the gateway.
        self.compare_gate = asyncio.Semaphore(1)

    def apply(self, table: RouteTable, routes: RouteState,
              capture: dict[str, CaptureTap]) -> dict[str, tuple[Tap, ...]]:
        """Each endpoint's shadow tap under ``table`` (endpoints with shadows or mirrors)."""
        out: dict[str, tuple[Tap, ...]] = {}
        seen: set[str] = set()
        for route in table.endpoints.values():
            compiled = routes.endpoints.get(route.name)
            configs: dict[tuple[str, str], PeerConfig] = {}
            for shadow in route.shadows:
                configs[("shadow", shadow.name)] = _shadow_config(shadow)
            for mirror in route.mirrors:
                peer_variant = compiled.by_name.get(mirror.peer) if compiled else None
                if peer_variant is None or mirror.source == mirror.peer:
                    log.warning("Endpoint %s: mirror %s -> %s names no other variant: skipped",
                                route.name, mirror.source, mirror.peer)
                    continue
                configs[("mirror", f"{mirror.source}>{mirror.peer}")] = _mirror_config(
                    mirror, peer_variant.upstreams)
            if not configs:
                continue
            seen.add(route.name)
            tap = self.taps.get(route.name)
            if tap is None:
                tap = self.taps[route.name] = ShadowTap(route.name, self.rng)
            self._update(tap, configs)
            tap.capture = capture.get(route.name)
            out[route.name] = (tap,)
        for name in [n for n in self.taps if n not in seen]:
            for peer in self.taps.pop(name).peers.values():
                self._stop(peer)
        # The peers' client keeps an origin (and its idle connections) per model server
        # it sent to: pods come and go (each scale-up of a DNS-discovered shadow or
        # mirrored variant brings new addresses), so the ones no peer sends to any more
        # are let go, as ``GatewayCore.apply`` does for production's client.
        self.client.forget({url for tap in self.taps.values() for peer in tap.peers.values()
                            for url in peer.config.upstreams})
        return out

    def _update(self, tap: ShadowTap, configs: dict[tuple[str, str], PeerConfig]) -> None:
        for key in [k for k in tap.peers if k not in configs]:
            self._stop(tap.peers.pop(key))
        for key, config in configs.items():
            peer = tap.peers.get(key)
            if peer is not None and peer.config.revision != config.revision:
                log.info("Endpoint %s: shadow %s runs a new version (%s): its comparison "
                         "starts over", tap.endpoint, config.name, config.revision)
                peer.restart_counts()
            if peer is not None and peer.config.queue_size == config.queue_size:
                if peer.config != config:
                    peer.config = config
                    if peer.workers:  # started (lazily, by its first copy)
                        peer.resize()
                continue
            if peer is not None:
                self._stop(peer)
            else:
                log.info("Endpoint %s: %s gets %g%% of answered requests as copies (%d "
                         "upstream(s), timeout %gs)", tap.endpoint, config.name,
                         config.sampling_percentage, len(config.upstreams), config.timeout_s)
            tap.peers[key] = Peer(tap.endpoint, config, self.client,
                                  max_response_bytes=self.max_response_bytes,
                                  compare_gate=self.compare_gate)

    @staticmethod
    def _stop(peer: Peer) -> None:
        """Cancel ``peer``'s workers (copies still queued are not sent)."""
        peer.cancel()

    async def close(self) -> None:
        """Stop every worker; copies still queued or being sent are dropped, counted and
        logged (the process is about to exit: its metrics go with it, the log stays)."""
        for tap in self.taps.values():
            for peer in tap.peers.values():
                await peer.stop()
                if peer.abandoned:
                    log.warning("Endpoint %s: %d cop%s to %s dropped at shutdown (not sent "
                                "or not answered yet)", tap.endpoint, peer.abandoned,
                                "y" if peer.abandoned == 1 else "ies", peer.config.name)
        self.taps = {}
        await self.client.close()
