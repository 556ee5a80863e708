"""Metric values the scaling policies see, from Prometheus text and counters: PURE.

Both scalers (local mode's supervisor and the operator) scrape the gateway's
and model servers' ``/metrics`` and feed the counters here; ``MetricWindow``
turns them into rates over a sliding window (invocations per replica per
minute, CPU percent), robust to replicas appearing, restarting (counter
resets) and leaving. ``CounterSum`` is the piece that makes that so: several
processes' counters (every model server's CPU seconds, every gateway pod's
invocations on Kubernetes) become one total that only ever grows by real
increments.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families


@dataclass
class CounterSum:
    """One growing total over the counters of several sources (processes, pods).

    Each source's counter adds only its non-negative increments since the
    previous reading of that same source. A source seen for the first time
    (a new pod, or every pod after the operator restarts) only sets its
    baseline: its counter holds traffic from before we looked. A counter that
    went down (the process restarted) also only sets a new baseline. So the
    total never goes backwards and never jumps by a whole counter, whatever
    the sources do; at worst a few increments around a restart are missed.
    """

    total: float = 0.0
    _last: dict[str, float] = field(default_factory=dict)

    def update(self, values: Mapping[str, float], keep: Collection[str] = ()) -> float:
        """Add this round's readings; return the total.

        ``values``: source -> counter, for the sources read successfully.
        ``keep``: sources still there but not read this round (a failed
        scrape): their last reading stays, so the next one adds both rounds'
        increments. Every other source is forgotten (it left).
        """
        for source, value in values.items():
            before = self._last.get(source)
            if before is not None and value >= before:
                self.total += value - before
        self._last = {s: v for s, v in self._last.items() if s in keep and s not in values}
        self._last.update(values)
        return self.total


#: A window's rates are None until its samples span this share of the window.
MIN_SPAN_FRACTION = 0.5


@dataclass
class MetricWindow:
    """Counter samples of one variant; rates over the last ``window_s`` seconds.

    Right after a scaler starts (operator or supervisor restart, first
    reading of a new variant) the samples span only a few seconds, and a rate
    over them reads a short burst as sustained load: 20 requests in the first
    second are 1,200 a minute. So the rates stay None (no decision from this
    metric) until the samples span half the window, as CloudWatch alarms need
    whole periods of data before they fire.
    """

    window_s: float
    samples: deque[tuple[float, float, float]] = field(default_factory=deque)
    #: CPU seconds summed over the model servers (by URL) across restarts/scaling.
    _cpu: CounterSum = field(default_factory=CounterSum)

    def add(self, t: float, invocations: float, cpu_by_url: dict[str, float]) -> None:
        """``invocations``: a counter that never goes down (a ``CounterSum`` total
        when several processes count)."""
        cpu_total = self._cpu.update(cpu_by_url)
        self.samples.append((t, invocations, cpu_total))
        # Keep one sample at or beyond the window's start as the baseline.
        while len(self.samples) > 2 and self.samples[1][0] <= t - self.window_s:
            self.samples.popleft()

    def _span(self) -> tuple[float, float, float] | None:
        if len(self.samples) < 2:
            return None
        (t0, inv0, cpu0), (t1, inv1, cpu1) = self.samples[0], self.samples[-1]
        dt = t1 - t0
        if dt <= 0 or dt < self.window_s * MIN_SPAN_FRACTION:
            return None
        return dt, max(inv1 - inv0, 0.0), max(cpu1 - cpu0, 0.0)

    def invocations_per_replica_per_minute(self, replicas: int) -> float | None:
        span = self._span()
        if span is None:
            return None
        dt, invocations, _ = span
        return invocations / dt * 60.0 / max(replicas, 1)

    def cpu_percent(self, replicas: int) -> float | None:
        span = self._span()
        if span is None or replicas == 0:
            return None if span is None else 0.0
        dt, _, cpu = span
        return cpu / dt * 100.0 / replicas


@dataclass(frozen=True)
class GatewayView:
    """What one scrape of the gateway says, per variant (and in flight per endpoint)."""

    invocations: dict[str, float]
    held: dict[str, float]
    in_flight: float
    #: Copies offered to each shadow (or mirror peer), whatever became of them: sent,
    #: failed or dropped on a full queue. A shadow's load, as invocations are a variant's
    #: (dropped copies count: they are load the shadow was too small to take).
    copies: dict[str, float] = field(default_factory=dict)

    def offered(self, variant: str, shadow: bool, routes: Sequence[str] = ()) -> float:
        """The counter a variant's InvocationsPerReplica comes from: the copies offered to
        a shadow, else the invocations of each of ``routes`` (default: the variant's own)
        summed (a guarded variant's two fleets; only the one serving moves at rest)."""
        if shadow:
            return self.copies.get(variant, 0.0)
        return sum(self.invocations.get(r, 0.0) for r in (routes or (variant,)))


#: Samples the gateway always labels with ``variant``.
_PER_VARIANT = frozenset({"kubeinfer_gateway_invocations_total",
                          "kubeinfer_gateway_held_requests"})


#: Above this a counter is not one a gateway counted (and would not fit a status int64).
MAX_SAMPLE = float(2 ** 53)


def usable_value(value: float) -> bool:
    """Whether a scraped counter or gauge value is one a gateway writes: finite, not
    negative, below ``MAX_SAMPLE``. A pod in a tenant's namespace can serve any /metrics
    text under the gateway's labels; ``+Inf`` or ``NaN`` there would make every decision
    from it (a replica count, a status integer) raise, so such samples are left out."""
    return math.isfinite(value) and 0.0 <= value < MAX_SAMPLE


def parse_gateway_metrics(text: str, endpoint: str) -> GatewayView:
    invocations: dict[str, float] = {}
    held: dict[str, float] = {}
    copies: dict[str, float] = {}
    in_flight = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if labels.get("endpoint") != endpoint or not usable_value(sample.value):
                continue
            if sample.name in _PER_VARIANT and not labels.get("variant"):
                continue  # not what a gateway writes: ignored, not a KeyError
            if sample.name == "kubeinfer_gateway_invocations_total":
                invocations[labels["variant"]] = sample.value
            elif sample.name == "kubeinfer_gateway_held_requests":
                held[labels["variant"]] = sample.value
            elif sample.name == "kubeinfer_gateway_in_flight_requests":
                in_flight = sample.value
            elif sample.name == "kubeinfer_shadow_copies_total" and "peer" in labels:
                # One series per (production variant, result): their sum still only grows.
                copies[labels["peer"]] = copies.get(labels["peer"], 0.0) + sample.value
    return GatewayView(invocations, held, in_flight, copies)


def sum_views(views: Iterable[GatewayView]) -> GatewayView:
    """Several gateway pods' views as one: every value summed per variant.

    Right for the gauges (held, in flight). Summing invocation counters is only
    a snapshot: rates need ``CounterSum`` per pod, since pods restart and leave.
    """
    invocations: dict[str, float] = {}
    held: dict[str, float] = {}
    copies: dict[str, float] = {}
    in_flight = 0.0
    for view in views:
        for name, value in view.invocations.items():
            invocations[name] = invocations.get(name, 0.0) + value
        for name, value in view.held.items():
            held[name] = held.get(name, 0.0) + value
        for name, value in view.copies.items():
            copies[name] = copies.get(name, 0.0) + value
        in_flight += view.in_flight
    return GatewayView(invocations, held, in_flight, copies)


def parse_cpu_seconds(text: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "process_cpu_seconds_total":
                return sample.value
    return None
