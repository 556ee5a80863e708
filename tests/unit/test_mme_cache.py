"""The multi-model cache's rules, against a loader whose timing the test controls.

``ScriptedLoader`` is a test implementation of the ``Loader`` protocol (the
real one downloads from S3 and builds onnxruntime sessions, exercised in
tests/integration/test_multimodel.py): sizes come from a dict, loads wait on
events the test sets, and every call is recorded.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from kubeinfer_runtime.errors import InsufficientStorage, ModelError, NotFound, NotReady
from kubeinfer_runtime.models.cache import ModelCache


class ScriptedLoader:
    def __init__(self, sizes: dict[str, int]) -> None:
        self.sizes = sizes
        self.loads: list[str] = []
        self.unloads: list[str] = []
        self.gates: dict[str, asyncio.Event] = {}
        self.fail: dict[str, Exception] = {}

    async def size(self, name: str) -> int:
        await asyncio.sleep(0)
        if name not in self.sizes:
            raise NotFound(f"no {name}")
        return self.sizes[name]

    async def load(self, name: str, size: int) -> str:
        assert size == self.sizes[name]
        self.loads.append(name)
        gate = self.gates.get(name)
        if gate is not None:
            await gate.wait()
        if name in self.fail:
            raise self.fail.pop(name)
        return f"model:{name}"

    def unload(self, name: str, value: str) -> None:
        assert value == f"model:{name}"
        self.unloads.append(name)


def run(fn: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(fn())


def test_hit_after_miss_and_lru_eviction_by_bytes() -> None:
    async def go() -> None:
        loader = ScriptedLoader({"a": 40, "b": 40, "c": 30, "d": 50})
        cache = ModelCache(loader, budget_bytes=100)
        for name in ("a", "b", "a"):  # a is now more recently used than b
            (await cache.acquire(name)).release()
        assert (cache.stats.misses, cache.stats.hits) == (2, 1)
        (await cache.acquire("c")).release()  # 110 > 100: evicts b (LRU), not a
        assert loader.unloads == ["b"]
        assert [n for n, _ in cache.loaded()] == ["a", "c"]
        assert cache.resident_bytes == 70
        (await cache.acquire("d")).release()  # 120 > 100: evicting a (LRU) is enough
        assert loader.unloads == ["b", "a"]
        assert [n for n, _ in cache.loaded()] == ["c", "d"]
        assert cache.resident_bytes == 80 <= cache.budget_bytes
        assert cache.stats.evictions == 2 and cache.stats.loads == 4
    run(go)


def test_concurrent_cold_requests_share_one_load() -> None:
    async def go() -> None:
        loader = ScriptedLoader({"m": 10})
        loader.gates["m"] = asyncio.Event()
        cache = ModelCache(loader, budget_bytes=100)
        tasks = [asyncio.create_task(cache.acquire("m")) for _ in range(25)]
        await asyncio.sleep(0.01)
        assert cache.inflight("m") == 25 and not cache.is_loaded("m")
        loader.gates["m"].set()
        leases = await asyncio.gather(*tasks)
        assert loader.loads == ["m"]
        assert {lease.value for lease in leases} == {"model:m"}
        assert cache.stats.misses == 25 and cache.stats.loads == 1
        for lease in leases:
            lease.release()
        assert cache.inflight("m") == 0
    run(go)


def test_a_failed_load_reaches_every_waiter_and_is_not_cached() -> None:
    async def go() -> None:
        loader = ScriptedLoader({"m": 10})
        loader.gates["m"] = asyncio.Event()
        loader.fail["m"] = ModelError("corrupt model")
        cache = ModelCache(loader, budget_bytes=100)
        tasks = [asyncio.create_task(cache.acquire("m")) for _ in range(5)]
        await asyncio.sleep(0.01)
        loader.gates["m"].set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, ModelError) and r.message == "corrupt model" for r in results)
        assert loader.loads == ["m"] and not cache.is_loaded("m")
        assert cache.resident_bytes == 0 and cache.stats.load_failures == 1
        # The next request tries again, and this time it works.
        lease = await cache.acquire("m")
        assert lease.value == "model:m" and loader.loads == ["m", "m"]
        lease.release()
    run(go)


def test_unknown_model_is_not_found_and_too_big_is_507_without_loading() -> None:
    async def go() -> None:
        loader = ScriptedLoader({"huge": 101})
        cache = ModelCache(loader, budget_bytes=100)
        with pytest.raises(NotFound):
            await cache.acquire("absent")
        with pytest.raises(InsufficientStorage) as info:
            await cache.acquire("huge")
        assert info.value.status == 507 and "101 bytes" in info.value.message
        assert "multiModel.cacheBytes" in info.value.message
        assert loader.loads == [] and cache.resident_bytes == 0
    run(go)


def test_models_with_requests_in_flight_are_never_evicted() -> None:
    async def go() -> None:
        loader = ScriptedLoader({"a": 60, "b": 60})
        cache = ModelCache(loader, budget_bytes=100, wait_s=5)
        held = await cache.acquire("a")
        waiting = asyncio.create_task(cache.acquire("b"))
        await asyncio.sleep(0.05)
        # b cannot fit without evicting a, which is in use: b waits, a stays.
        assert not waiting.done() and loader.unloads == [] and cache.is_loaded("a")
        assert cache.resident_bytes == 60
        held.release()
        lease = await asyncio.wait_for(waiting, 1)
        assert lease.value == "model:b" and loader.unloads == ["a"]
        assert cache.resident_bytes == 60
        lease.release()
    run(go)


def test_waiting_for_room_gives_up_with_503() -> None:
    async def go() -> None:
        loader = ScriptedLoader({"a": 60, "b": 60})
        cache = ModelCache(loader, budget_bytes=100, wait_s=0.05)
        held = await cache.acquire("a")
        with pytest.raises(NotReady) as info:
            await cache.acquire("b")
        assert "requests in flight" in info.value.message
        assert cache.resident_bytes == 60 and not cache.is_loaded("b")
        held.release()
    run(go)


def test_unload_waits_for_requests_in_flight() -> None:
    async def go() -> None:
        loader = ScriptedLoader({"a": 10})
        cache = ModelCache(loader, budget_bytes=100)
        lease = await cache.acquire("a")
        assert cache.unload("a") is True
        assert not cache.is_loaded("a") and loader.unloads == []  # still in use
        assert cache.resident_bytes == 10
        lease.release()
        assert loader.unloads == ["a"] and cache.resident_bytes == 0
        assert cache.unload("a") is False
        assert await cache.preload("a") is True and await cache.preload("a") is False
    run(go)
