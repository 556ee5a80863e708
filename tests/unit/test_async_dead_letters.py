"""Dead letters are bounded per endpoint: each XADD to the dead-letter stream trims it
to ``DEAD_LETTER_MAX_ENTRIES`` (exactly, oldest first). Without it, every input that
fails on every try added an entry for good to a Redis every namespace may share."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from kubeinfer_runtime.contract import AsyncQueueKeys
from kubeinfer_runtime.queue.processing import DEAD_LETTER_MAX_ENTRIES, Processor


class _Pipe:
    def __init__(self, calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]]) -> None:
        self.calls = calls

    def __getattr__(self, name: str) -> Any:
        def record(*args: Any, **kwargs: Any) -> None:
            self.calls.append((name, args, kwargs))
        return record

    async def execute(self) -> list[Any]:
        return []


class _Redis:
    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def pipeline(self, transaction: bool = True) -> _Pipe:
        return _Pipe(self.calls)


class _Counter:
    def inc(self) -> None:
        pass


def test_every_dead_letter_trims_the_stream() -> None:
    assert 1_000 <= DEAD_LETTER_MAX_ENTRIES <= 100_000
    proc = Processor.__new__(Processor)
    proc.keys = AsyncQueueKeys(queue="ns.ep")
    proc.redis = redis = _Redis()
    proc._outcomes = {"dead_letter": _Counter()}  # type: ignore[dict-item]
    asyncio.run(proc._dead_letter_malformed("1-0", {"garbage": "1"}, "no fields"))
    [xadd] = [c for c in redis.calls if c[0] == "xadd"]
    assert xadd[1][0] == proc.keys.dead_letter
    assert xadd[2] == {"maxlen": DEAD_LETTER_MAX_ENTRIES, "approximate": False}
    # And the other path: a request that failed on every try.
    redis.calls.clear()
    proc.settings = SimpleNamespace(success_url=None, error_url=None)  # type: ignore[assignment]
    req = SimpleNamespace(to_fields=lambda: {"inference_id": "x"})
    asyncio.run(proc._notify_and_ack("2-0", req, ok=False, note=b"",  # type: ignore[arg-type]
                                     dead_letter=True, reason="failed", notify=False))
    [xadd] = [c for c in redis.calls if c[0] == "xadd"]
    assert xadd[2] == {"maxlen": DEAD_LETTER_MAX_ENTRIES, "approximate": False}
