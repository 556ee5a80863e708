"""The multi-model cache: an LRU of loaded models bounded by bytes, single-flight loads.

Used from the event loop only (every method runs on it), so its state needs no
locks; downloading and loading happen in the ``Loader``, which hands the slow
work to threads. The rules the multi-model endpoint relies on:

* the budget is in bytes of measured model size, not a model count, and it is
  never exceeded: a load reserves its bytes before it starts, and what is
  resident plus what is reserved stays within ``budget_bytes``;
* single-flight: any number of concurrent requests for a cold model share one
  size check, one download and one load (one task, awaited by all of them);
* a failed load is reported to every waiter and forgotten, so the next request
  tries again (a failure is never cached as a success);
* eviction (least recently used first) only ever takes models with no request
  in flight; when nothing can be evicted the load waits for a release, and
  gives up with 503 after ``wait_s``;
* a model bigger than the whole budget is refused at once with 507.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from kubeinfer_runtime.errors import InsufficientStorage, NotReady

log = logging.getLogger("kubeinfer.cache")

T = TypeVar("T")


class Loader(Protocol[T]):
    """The I/O side: how big a model is, how to load and unload it."""

    async def size(self, name: str) -> int:
        """The model's size in bytes (raise NotFound when it does not exist)."""

    async def load(self, name: str, size: int) -> T:
        """Download (if needed) and load the model; ``size`` is what :meth:`size` said (a
        download longer than that is refused)."""

    def unload(self, name: str, value: T) -> None:
        """Release a loaded model (called once, when nothing uses it any more)."""


@dataclass
class CacheStats:
    """Counters of the cache, read by the metrics collector at scrape time."""

    hits: int = 0
    misses: int = 0
    loads: int = 0
    load_failures: int = 0
    evictions: int = 0
    #: Total and count of the time requests waited for a model to load
    #: (SageMaker's ModelLoadingWaitTime).
    wait_seconds_sum: float = 0.0
    wait_count: int = 0


@dataclass(eq=False)
class _Entry(Generic[T]):
    name: str
    future: asyncio.Future[T]
    size: int = 0
    #: Bytes counted in ``resident`` for this entry (0 until reserved).
    reserved: int = 0
    value: T | None = None
    inflight: int = 0
    #: Removed from the index (evicted or unloaded) while requests were in
    #: flight: unload when the last one releases it.
    doomed: bool = False
    loaded_at: float = field(default_factory=time.monotonic)


class Lease(Generic[T]):
    """One request's hold on a loaded model; ``release`` exactly once."""

    __slots__ = ("_cache", "_entry", "value")

    def __init__(self, cache: ModelCache[T], entry: _Entry[T], value: T) -> None:
        self._cache = cache
        self._entry = entry
        self.value = value

    def release(self) -> None:
        self._cache._release(self._entry)


class ModelCache(Generic[T]):
    def __init__(self, loader: Loader[T], budget_bytes: int, *, wait_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.loader = loader
        self.budget_bytes = budget_bytes
        self.wait_s = wait_s
        self.clock = clock
        self.stats = CacheStats()
        #: Least recently used first.
        self._entries: OrderedDict[str, _Entry[T]] = OrderedDict()
        #: Bytes of loaded models plus reservations of loads under way.
        self.resident_bytes = 0
        self._released = asyncio.Event()

    # ------------------------------------------------------------------ reading

    def loaded(self) -> list[tuple[str, int]]:
        """``(name, size)`` of every loaded model, least recently used first."""
        return [(e.name, e.size) for e in self._entries.values() if e.value is not None]

    def is_loaded(self, name: str) -> bool:
        e = self._entries.get(name)
        return e is not None and e.value is not None

    def inflight(self, name: str) -> int:
        e = self._entries.get(name)
        return 0 if e is None else e.inflight

    # ------------------------------------------------------------------ using

    async def acquire(self, name: str) -> Lease[T]:
        """Hold ``name`` loaded for one request, loading it (once) when cold."""
        entry = self._entries.get(name)
        if entry is not None and entry.value is not None:
            self.stats.hits += 1
            entry.inflight += 1
            self._entries.move_to_end(name)
            return Lease(self, entry, entry.value)
        self.stats.misses += 1
        if entry is None:
            entry = _Entry(name, asyncio.get_running_loop().create_future())
            self._entries[name] = entry
            # One task does the work for everybody; a waiter that goes away
            # (cancelled) does not cancel the load the others wait for.
            asyncio.get_running_loop().create_task(self._load(entry))
        entry.inflight += 1
        started = self.clock()
        try:
            value = await asyncio.shield(entry.future)
        except BaseException:
            entry.inflight -= 1
            self._signal()
            raise
        finally:
            self.stats.wait_seconds_sum += self.clock() - started
            self.stats.wait_count += 1
        if self._entries.get(name) is entry:
            self._entries.move_to_end(name)
        return Lease(self, entry, value)

    async def preload(self, name: str) -> bool:
        """Load ``name`` without a request (the /models API); False if it already was."""
        if self.is_loaded(name):
            return False
        lease = await self.acquire(name)
        lease.release()
        return True

    def unload(self, name: str) -> bool:
        """Drop ``name`` (the /models API); in-flight requests finish first. False if absent."""
        entry = self._entries.get(name)
        if entry is None or entry.value is None:
            return False
        self._drop(entry)
        return True

    # ------------------------------------------------------------------ internals

    async def _load(self, entry: _Entry[T]) -> None:
        name = entry.name
        try:
            size = await self.loader.size(name)
            if size > self.budget_bytes:
                raise InsufficientStorage(
                    f'Model "{name}" needs {size} bytes but the multi-model cache holds '
                    f"{self.budget_bytes} bytes in all: raise multiModel.cacheBytes, or "
                    "serve this model from its own endpoint")
            entry.size = size
            await self._make_room(entry)
            value = await self.loader.load(name, size)
        except BaseException as exc:
            self.stats.load_failures += 1
            if self._entries.get(name) is entry:
                del self._entries[name]
            self.resident_bytes -= entry.reserved
            entry.reserved = 0
            entry.future.set_exception(exc)
            # Waiters read it; with none left, mark it retrieved (no asyncio warning).
            entry.future.exception()
            self._signal()
            if not isinstance(exc, Exception):
                raise
            return
        self.stats.loads += 1
        entry.value = value
        entry.loaded_at = self.clock()
        entry.future.set_result(value)

    async def _make_room(self, entry: _Entry[T]) -> None:
        """Reserve ``entry.size`` bytes, evicting idle models LRU first, waiting if needed."""
        deadline = self.clock() + self.wait_s
        while True:
            need = self.resident_bytes + entry.size - self.budget_bytes
            if need > 0:
                for victim in list(self._entries.values()):
                    if need <= 0:
                        break
                    if victim is entry or victim.value is None or victim.inflight:
                        continue
                    need -= victim.size
                    self.stats.evictions += 1
                    self._drop(victim)
            if self.resident_bytes + entry.size <= self.budget_bytes:
                self.resident_bytes += entry.size
                entry.reserved = entry.size
                return
            left = deadline - self.clock()
            if left <= 0:
                raise NotReady(
                    f'Model "{entry.name}" ({entry.size} bytes) cannot be loaded: the '
                    f"multi-model cache ({self.budget_bytes} bytes) is full of models with "
                    "requests in flight; retry, or raise multiModel.cacheBytes")
            self._released.clear()
            try:
                await asyncio.wait_for(self._released.wait(), timeout=left)
            except TimeoutError:
                continue

    def _drop(self, entry: _Entry[T]) -> None:
        if self._entries.get(entry.name) is entry:
            del self._entries[entry.name]
        if entry.inflight:
            entry.doomed = True
            return
        self._free(entry)

    def _free(self, entry: _Entry[T]) -> None:
        self.resident_bytes -= entry.reserved
        entry.reserved = 0
        value, entry.value = entry.value, None
        if value is not None:
            self.loader.unload(entry.name, value)
        self._signal()

    def _release(self, entry: _Entry[T]) -> None:
        entry.inflight -= 1
        if entry.inflight == 0:
            if entry.doomed:
                self._free(entry)
            else:
                self._signal()

    def _signal(self) -> None:
        self._released.set()
