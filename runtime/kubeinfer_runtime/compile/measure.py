"""Timing a candidate: p50 and p99 of back-to-back calls, the same way for every candidate.

Every candidate is timed through the ``Backend`` interface the model server
serves it with (inputs as a dict of numpy arrays, outputs back as numpy), so
what is compared is what is served. A few warm-up calls first (allocators,
caches, lazy initialisation), then calls for ``seconds`` (at least
``min_calls``). The statistics are pure.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

WARMUP_CALLS = 5


@dataclass(frozen=True)
class Timing:
    p50_s: float
    p99_s: float
    calls: int


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q`` (0..1) percentile by nearest rank (``samples`` need not be sorted)."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    rank = max(1, min(len(ordered), math.ceil(q * len(ordered))))
    return ordered[rank - 1]


def summarize(samples: Sequence[float]) -> Timing:
    return Timing(percentile(samples, 0.5), percentile(samples, 0.99), len(samples))


def time_calls(fn: Callable[[], object], seconds: float, *, min_calls: int = 20,
               max_calls: int = 1_000_000,
               clock: Callable[[], float] = time.perf_counter) -> Timing:
    for _ in range(WARMUP_CALLS):
        fn()
    samples: list[float] = []
    deadline = clock() + seconds
    while len(samples) < max_calls:
        t0 = clock()
        fn()
        t1 = clock()
        samples.append(t1 - t0)
        if t1 >= deadline and len(samples) >= min_calls:
            break
    return summarize(samples)
