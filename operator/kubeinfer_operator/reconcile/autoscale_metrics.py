"""Metric values the scaling policies see, from Prometheus text and counters: PURE.

Both scalers (local mode's supervisor and the operator) scrape the gateway's
and model servers' ``/metrics`` and feed the counters here; ``MetricWindow``
turns them into rates over a sliding window (invocations per replica per
minute, CPU percent), robust to replicas appearing, restarting (counter
resets) and leaving.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families


@dataclass
class MetricWindow:
    """Counter samples of one variant; rates over the last ``window_s`` seconds."""

    window_s: float
    samples: deque[tuple[float, float, float]] = field(default_factory=deque)
    #: Last CPU seconds per model-server URL, to sum deltas across restarts/scaling.
    _cpu_last: dict[str, float] = field(default_factory=dict)
    _cpu_total: float = 0.0

    def add(self, t: float, invocations: float, cpu_by_url: dict[str, float]) -> None:
        for url, seconds in cpu_by_url.items():
            before = self._cpu_last.get(url)
            if before is not None and seconds >= before:
                self._cpu_total += seconds - before
        self._cpu_last = dict(cpu_by_url)
        self.samples.append((t, invocations, self._cpu_total))
        # Keep one sample at or beyond the window's start as the baseline.
        while len(self.samples) > 2 and self.samples[1][0] <= t - self.window_s:
            self.samples.popleft()

    def _span(self) -> tuple[float, float, float] | None:
        if len(self.samples) < 2:
            return None
        (t0, inv0, cpu0), (t1, inv1, cpu1) = self.samples[0], self.samples[-1]
        dt = t1 - t0
        if dt <= 0:
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


def parse_gateway_metrics(text: str, endpoint: str) -> GatewayView:
    invocations: dict[str, float] = {}
    held: dict[str, float] = {}
    in_flight = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if labels.get("endpoint") != endpoint:
                continue
            if sample.name == "kubeinfer_gateway_invocations_total":
                invocations[labels["variant"]] = sample.value
            elif sample.name == "kubeinfer_gateway_held_requests":
                held[labels["variant"]] = sample.value
            elif sample.name == "kubeinfer_gateway_in_flight_requests":
                in_flight = sample.value
    return GatewayView(invocations, held, in_flight)


def parse_cpu_seconds(text: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "process_cpu_seconds_total":
                return sample.value
    return None
