"""``status.shadow`` from the gateways' shadow metrics: PURE.

Every gateway process exports, per (endpoint, production variant, peer), the
counters, latency histograms and difference summaries named in
``kubeinfer_runtime.contract.shadow``. ``parse`` reads one gateway's
``/metrics`` text for one endpoint, summed over production variants; ``add``
sums several gateways (pods); ``entries`` turns the totals into
``status.shadow`` entries, one per shadow variant of the spec, in its order.

The numbers are totals since the gateways started or the shadow's version last
changed (a restarted gateway starts its counts again, and so does every gateway
when the route table gives the shadow a new ``revision``: its comparison then
describes the version running now), which is what a running comparison needs: requests
compared, agreement, each side's p50/p99 latency (from the histogram buckets,
interpolated as Prometheus' ``histogram_quantile`` does) and errors, and the
copies dropped. The same function serves ``kubeinfer shadow report`` in local
mode, over the local gateway's ``/metrics``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from kubeinfer_operator.reconcile.autoscale_metrics import usable_value
from kubeinfer_runtime.contract import shadow as names


@dataclass
class PeerTotals:
    """One peer's comparison, summed over production variants (and gateways)."""

    copies: dict[str, float] = field(default_factory=dict)
    compared: float = 0.0
    agreed: float = 0.0
    disagreed: float = 0.0
    errors: dict[str, float] = field(default_factory=dict)
    #: side -> upper bound (``le``) -> cumulative count.
    buckets: dict[str, dict[float, float]] = field(default_factory=dict)
    abs_sum: float = 0.0
    abs_count: float = 0.0
    rel_sum: float = 0.0
    rel_count: float = 0.0

    def add(self, other: PeerTotals) -> None:
        for k, v in other.copies.items():
            self.copies[k] = self.copies.get(k, 0.0) + v
        for k, v in other.errors.items():
            self.errors[k] = self.errors.get(k, 0.0) + v
        for side, buckets in other.buckets.items():
            mine = self.buckets.setdefault(side, {})
            for le, count in buckets.items():
                mine[le] = mine.get(le, 0.0) + count
        self.compared += other.compared
        self.agreed += other.agreed
        self.disagreed += other.disagreed
        self.abs_sum += other.abs_sum
        self.abs_count += other.abs_count
        self.rel_sum += other.rel_sum
        self.rel_count += other.rel_count


def parse(text: str, endpoint: str) -> dict[str, PeerTotals]:
    """One gateway's shadow and mirror totals for ``endpoint``, by peer.

    Raises ``ValueError`` for text that is not Prometheus' exposition format.
    """
    out: dict[str, PeerTotals] = {}
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("kubeinfer_shadow_"):
            continue
        for sample in family.samples:
            labels = sample.labels
            if (labels.get("endpoint") != endpoint or "peer" not in labels
                    or not usable_value(sample.value)):
                continue  # +Inf/NaN (any pod under the gateway's labels) would not int()
            totals = out.setdefault(labels["peer"], PeerTotals())
            _add_sample(totals, sample.name, labels, float(sample.value))
    return out


def _add_sample(t: PeerTotals, name: str, labels: dict[str, str], value: float) -> None:
    if name == names.COPIES:
        result = labels.get("result", "")
        t.copies[result] = t.copies.get(result, 0.0) + value
    elif name == names.COMPARED:
        t.compared += value
    elif name == names.AGREED:
        t.agreed += value
    elif name == names.DISAGREED:
        t.disagreed += value
    elif name == names.ERRORS:
        side = labels.get("side", "")
        t.errors[side] = t.errors.get(side, 0.0) + value
    elif name == names.LATENCY + "_bucket":
        try:
            le = float(labels.get("le", "+Inf"))
        except ValueError:
            return  # not a bucket bound a gateway writes
        buckets = t.buckets.setdefault(labels.get("side", ""), {})
        buckets[le] = buckets.get(le, 0.0) + value
    elif name == names.ABS_DIFF + "_sum":
        t.abs_sum += value
    elif name == names.ABS_DIFF + "_count":
        t.abs_count += value
    elif name == names.REL_DIFF + "_sum":
        t.rel_sum += value
    elif name == names.REL_DIFF + "_count":
        t.rel_count += value


def add(views: Iterable[dict[str, PeerTotals]]) -> dict[str, PeerTotals]:
    """Several gateways' totals, summed per peer."""
    out: dict[str, PeerTotals] = {}
    for view in views:
        for peer, totals in view.items():
            out.setdefault(peer, PeerTotals()).add(totals)
    return out


def quantile(buckets: dict[float, float], q: float) -> float | None:
    """``histogram_quantile(q, ...)`` over cumulative ``buckets`` (None: no observation).

    Linear within the bucket the rank falls in; the +Inf bucket answers the
    highest finite bound."""
    if not buckets:
        return None
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    rank = q * total
    lower_bound = 0.0
    lower_count = 0.0
    for le in bounds:
        count = buckets[le]
        if count >= rank:
            if math.isinf(le):
                return lower_bound
            if count == lower_count:
                return le
            return lower_bound + (le - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = le, count
    return lower_bound


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


def entry(name: str, totals: PeerTotals | None) -> dict[str, Any]:
    """One ``status.shadow`` entry (zeros and no latencies before any copy)."""
    t = totals or PeerTotals()
    production = t.buckets.get(names.SIDE_PRODUCTION, {})
    peer = t.buckets.get(names.SIDE_PEER, {})
    out: dict[str, Any] = {
        "name": name,
        "copiesSent": int(t.copies.get("sent", 0.0)),
        "copiesFailed": int(t.copies.get("failed", 0.0)),
        "copiesDropped": int(t.copies.get("dropped", 0.0)),
        "requestsCompared": int(t.compared),
        "agreementPercent": (round(100.0 * t.agreed / t.compared, 3) if t.compared else None),
        "productionErrors": int(t.errors.get(names.SIDE_PRODUCTION, 0.0)),
        "shadowErrors": int(t.errors.get(names.SIDE_PEER, 0.0)),
        "productionLatencyP50Ms": _ms(quantile(production, 0.5)),
        "productionLatencyP99Ms": _ms(quantile(production, 0.99)),
        "shadowLatencyP50Ms": _ms(quantile(peer, 0.5)),
        "shadowLatencyP99Ms": _ms(quantile(peer, 0.99)),
        "meanMaxAbsDiff": (t.abs_sum / t.abs_count if t.abs_count else None),
        "meanMaxRelDiff": (t.rel_sum / t.rel_count if t.rel_count else None),
    }
    return {k: v for k, v in out.items() if v is not None}


def entries(shadows: Sequence[str], totals: dict[str, PeerTotals]) -> list[dict[str, Any]]:
    """``status.shadow``: one entry per shadow variant, in the spec's order."""
    return [entry(name, totals.get(name)) for name in shadows]
