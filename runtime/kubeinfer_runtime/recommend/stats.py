"""Latency quantiles with 95% confidence intervals, from an HDR histogram: PURE.

Latencies are recorded in microseconds into ``hdrh``'s HdrHistogram (3
significant digits, 1 µs .. 10 min). The interval of a quantile ``p`` over
``n`` samples is the distribution-free order-statistic one: the samples of
rank ``n·p ± 1.96·sqrt(n·p·(1-p))`` bound it with ~95% confidence (normal
approximation of the binomial), read back from the same histogram.
"""

from __future__ import annotations

import math

from hdrh.histogram import HdrHistogram

from kubeinfer_runtime.contract.recommend import Quantile

LOWEST_US = 1
HIGHEST_US = 600_000_000
SIGNIFICANT_DIGITS = 3
Z95 = 1.959964


def new_histogram() -> HdrHistogram:
    return HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_DIGITS)


def record_seconds(hist: HdrHistogram, seconds: float) -> None:
    hist.record_value(min(max(int(seconds * 1e6), LOWEST_US), HIGHEST_US))


def order_statistic_ranks(n: int, p: float) -> tuple[int, int]:
    """1-based ranks (low, high) bounding quantile ``p`` of ``n`` samples with ~95% confidence."""
    half = Z95 * math.sqrt(n * p * (1.0 - p))
    low = max(1, math.floor(n * p - half))
    high = min(n, math.ceil(n * p + half) + 1)
    return low, high


def _at_rank(hist: HdrHistogram, n: int, rank: int) -> float:
    return float(hist.get_value_at_percentile(100.0 * rank / n)) / 1e3


def quantile(hist: HdrHistogram, p: float) -> Quantile:
    """Quantile ``p`` (0..1) in ms with its 95% interval; zeros when empty."""
    n = int(hist.get_total_count())
    if n == 0:
        return Quantile(value=0.0, low=0.0, high=0.0)
    value = float(hist.get_value_at_percentile(100.0 * p)) / 1e3
    low, high = order_statistic_ranks(n, p)
    return Quantile(value=value, low=min(value, _at_rank(hist, n, low)),
                    high=max(value, _at_rank(hist, n, high)))
