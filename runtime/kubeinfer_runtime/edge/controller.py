"""The fleet server's rollout loop: the I/O around ``waves.step``.

Every replica runs the loop; only the one holding the Redis lease (``SET NX PX``
with a random token, renewed each tick) calls ``waves.step`` and writes, and its write
checks the token in the same Lua script (``FleetStore.write_rollout``), so two
replicas never disagree on a wave even when a paused leader wakes up after losing
its lease. The others only serve heartbeats from the stored assignments. When the
leader dies its lease expires (``controller_lease_seconds``) and another replica
takes over from the persisted state: nothing lives only in memory.

The fleet config is re-read when its file changes (a mounted ConfigMap is swapped
by kubelet through a symlink; the operator's local mode replaces it atomically): a
file that does not parse or validate keeps the last good config in force and is
logged, never crashing the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
import statistics
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from pydantic import ValidationError

from kubeinfer_runtime import metrics
from kubeinfer_runtime.contract.edge import FleetConfig, FleetStatus, RolloutPhase
from kubeinfer_runtime.edge.errors import EdgeError
from kubeinfer_runtime.edge.store import FleetStore
from kubeinfer_runtime.edge.waves import (
    DeviceView,
    RolloutState,
    StepResult,
    desired_state,
    fleet_status,
    step,
)

log = logging.getLogger("kubeinfer.edge")

#: Largest fleet config file read (a few hundred targets' package references).
MAX_CONFIG_BYTES = 4 * 1024 * 1024


class FleetConfigError(EdgeError):
    """The fleet config file is missing, unreadable or invalid."""


def load_fleet_config(path: str | Path) -> FleetConfig:
    """Read and validate the fleet config; FleetConfigError says what is wrong."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise FleetConfigError(f"Fleet config {path} cannot be read ({e.strerror}): set "
                               "KUBEINFER_FLEET_CONFIG_FILE to the mounted config") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise FleetConfigError(f"Fleet config {path} is over {MAX_CONFIG_BYTES} bytes")
    try:
        return FleetConfig.model_validate_json(raw)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}"
            for err in e.errors()[:5])
        raise FleetConfigError(f"Fleet config {path} is invalid ({problems}): fix the "
                               "EdgeFleet's spec") from None


class ConfigWatcher:
    """The fleet config in force: the last good content of the file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._signature: tuple[int, int, int, int] | None = None
        self._digest = ""
        #: Raises FleetConfigError: a server never starts without a valid config.
        self.config, self._digest = self._load()
        #: Files rejected since the start (invalid, or naming another fleet).
        self.rejected = 0

    def _stat(self) -> tuple[int, int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns

    def _load(self) -> tuple[FleetConfig, str]:
        # The signature is taken first: a bad file is reported once, not on every poll,
        # and read again when it changes.
        self._signature = self._stat()
        config = load_fleet_config(self.path)
        return config, hashlib.sha256(config.model_dump_json().encode()).hexdigest()

    def poll(self) -> bool:
        """Re-read the file if it changed; True when a new config came into force."""
        signature = self._stat()
        if signature is None or signature == self._signature:
            return False  # a vanished file keeps the config in force
        try:
            config, digest = self._load()
        except FleetConfigError as e:
            self.rejected += 1
            log.error("%s: keeping version %s in force", e.message, self.config.current.version)
            return False
        if digest == self._digest:
            return False
        if config.name != self.config.name or config.namespace != self.config.namespace:
            log.error("Fleet config %s renames the fleet %s to %s: a fleet server serves one "
                      "fleet; keeping the old config, restart the server for another fleet",
                      self.path, self.config.name, config.name)
            self.rejected += 1
            return False
        log.info("Fleet config %s reloaded: version %s (previous %s)", self.path,
                 config.current.version,
                 config.previous.version if config.previous else "none")
        self.config, self._digest = config, digest
        return True


#: Most of the server's time the controller's ticks take (a 200 ms tick: one every 2 s).
TICK_SHARE = 0.1
#: Ticks whose median sets the pause: one slowed by a busy CPU or a slow Redis answer
#: must not stretch the next pause nine times over (a rollout would stall that long).
TICK_WINDOW = 5


def tick_pause(recent_s: Sequence[float], interval_s: float) -> float:
    """PURE: seconds to wait before the next tick, given the last ticks' durations: the
    interval, or longer so ticks take at most ``TICK_SHARE`` of the time, judged by the
    median of ``recent_s`` (a big fleet's ticks are all long; a hiccup is one)."""
    typical = statistics.median(recent_s) if recent_s else 0.0
    return max(interval_s, typical * (1 - TICK_SHARE) / TICK_SHARE)


def _decide(config: FleetConfig, state: RolloutState | None, views: list[DeviceView],
            now: float) -> tuple[StepResult, dict[str, str]]:
    """The step, and each device's desired state as stored (JSON; "" for none)."""
    result = step(config, state, views, now)
    targets = {v.device_id: v.target for v in views}
    encoded: dict[tuple[str | None, str], str] = {}  # a few versions x targets, not per device
    desired = {}
    for device_id, version in result.desired.items():
        key = (version, targets[device_id])
        if key not in encoded:
            ds = desired_state(config, version, key[1])
            encoded[key] = ds.model_dump_json() if ds is not None else ""
        desired[device_id] = encoded[key]
    return result, desired


class Controller:
    """The loop: one ``waves.step`` per interval on the lease holder, status on every replica."""

    def __init__(self, store: FleetStore, watcher: ConfigWatcher, *, interval_s: float,
                 lease_s: float, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.watcher = watcher
        self.interval_s = interval_s
        self.lease_s = lease_s
        self.clock = clock
        #: This replica's lease token (random: two replicas never share one).
        self.token = secrets.token_hex(16)
        self.leader = False
        self.status: FleetStatus | None = None
        #: The desired states this replica last wrote as leader (None: read them from Redis,
        #: as after taking the lease: another replica may have written since).
        self._written: dict[str, str] | None = None
        #: Device views of the last tick, by their stored JSON (``_views``); None for a
        #: record that does not parse (not parsed again until it changes).
        self._view_cache: dict[str, DeviceView | None] = {}
        #: Seconds the last ticks took: the loop waits a multiple of them (``tick_pause``).
        self.recent_ticks_s: deque[float] = deque(maxlen=TICK_WINDOW)
        self._stop = asyncio.Event()
        fleet = watcher.config.name
        self._leader_gauge = metrics.EDGE_CONTROLLER_LEADER.labels(fleet)

    async def tick(self) -> bool:
        """One step; True when this replica held the lease and wrote."""
        self.watcher.poll()
        config = self.watcher.config
        wrote = False
        leader = await self.store.acquire_lease(self.token, self.lease_s)
        if leader != self.leader:
            self._written = None
            log.info("Fleet %s: this replica %s the rollout controller's lease", config.name,
                     "took" if leader else "lost")
        self.leader = leader
        self._leader_gauge.set(1 if leader else 0)
        state = await self.store.rollout()
        raw = await self.store.raw_devices()
        # Everything over every device (parsing, views, the step, the status) is CPU work,
        # tens of ms at 10,000 devices: in a thread, so the event loop keeps answering
        # heartbeats between its GIL slices instead of queueing them behind a tick.
        views = await asyncio.to_thread(self._views, raw)
        now = self.clock()
        if leader:
            stored = self._written if self._written is not None \
                else await self.store.all_desired()
            result, desired = await asyncio.to_thread(_decide, config, state, views, now)
            if result.state != state or desired != stored:
                if await self.store.write_rollout(self.token, result.state, desired, stored):
                    self._written = desired
                    wrote = True
                    state = result.state
                    for event in result.events:
                        log.info("Fleet %s: %s", config.name, event)
                else:
                    self.leader, self._written = False, None
                    self._leader_gauge.set(0)
                    log.warning("Fleet %s: lost the controller's lease before writing; the "
                                "new holder decides", config.name)
        self.status = await asyncio.to_thread(fleet_status, config, state, views, now)
        self._export(self.status)
        return wrote

    def _views(self, raw: Mapping[str, str]) -> list[DeviceView]:
        """Every device's view; only the devices that changed since the last tick (those
        that heartbeated) are parsed again. A record that does not parse is left out (the
        store warns once, naming the device): one device's bad record must not stop the
        rollout of the whole fleet."""
        cache: dict[str, DeviceView | None] = self._view_cache
        fresh: dict[str, DeviceView | None] = {}
        views = []
        for device_id, value in sorted(raw.items()):
            if value in cache:
                view = cache[value]
            else:
                record = self.store.parse_record(device_id, value)
                view = record.view() if record is not None else None
            fresh[value] = view
            if view is not None:
                views.append(view)
        self._view_cache = fresh
        return views

    def _export(self, status: FleetStatus) -> None:
        fleet = status.fleet
        for name, count in status.byState.items():
            metrics.EDGE_DEVICES.labels(fleet, name).set(count)
        if status.rollout is not None:
            metrics.EDGE_ROLLOUT_WAVE.labels(fleet).set(status.rollout.wave)
            for phase in RolloutPhase:
                metrics.EDGE_ROLLOUT_PHASE.labels(fleet, phase.value).set(
                    1 if status.rollout.phase is phase else 0)

    async def run(self) -> None:
        """Tick until :meth:`stop`; an error (Redis down) is logged and retried next tick."""
        failures = 0
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                await self.tick()
                if failures:
                    log.info("Fleet %s: controller recovered", self.watcher.config.name)
                failures = 0
            except Exception as e:  # never die: the next tick retries
                failures += 1
                if failures == 1 or failures % 60 == 0:
                    log.warning("Fleet %s: controller step failed (%s: %s); retrying",
                                self.watcher.config.name, type(e).__name__, e)
            self.recent_ticks_s.append(time.monotonic() - started)
            # A big fleet's tick reads and decides over every device: keep it to a share of
            # the server's time, so heartbeats are not queued behind back-to-back ticks.
            pause = tick_pause(self.recent_ticks_s, self.interval_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), pause)

    async def stop(self) -> None:
        """Stop the loop; hand the lease over at once (another replica need not wait)."""
        self._stop.set()
        if self.leader:
            with contextlib.suppress(Exception):
                await self.store.release_lease(self.token)
            self.leader = False
            self._leader_gauge.set(0)
