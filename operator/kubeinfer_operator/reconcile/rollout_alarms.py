"""Rollback alarms over a green fleet's gateway metrics: PURE.

The gateway labels its metrics by route name, and a green fleet is a route of
its own (``<variant>-green`` or ``<variant>``, see ``reconcile.rollout``), so
``kubeinfer_gateway_invocations_total``, ``kubeinfer_gateway_errors_total`` and
the ``kubeinfer_gateway_upstream_latency_seconds`` histogram of that route are
green's alone. Each scrape (every gateway pod, summed per pod with
``CounterSum`` so restarts never count twice) adds a sample; an alarm looks at
the increase over its ``windowSeconds`` and is evaluable only with at least
``minRequests`` requests in it.

A ``disagreement`` alarm reads the gateway's mirror comparison instead:
while a step bakes, ``mirrors`` has the gateway copy each fleet's requests to
the other fleet of the variant (``contract.shadow.MirrorRoute``, both ways, so
pairs are made whatever the split, AllAtOnce included), and
``kubeinfer_shadow_compared_total`` / ``kubeinfer_shadow_disagreed_total``
labelled ``variant=<one fleet>, peer=<the other>`` count the pairs both
answered and those whose answers differ. ``parse_fleet_metrics`` credits a
pair to both fleets' routes (the pair is the same seen from either side), and
only pairs between the two fleets of one variant: a shadow variant's pairs
never count. The alarm's rate is ``disagreed / compared`` (a fraction, as errorRate's) over its
window, evaluable from ``minRequests`` compared pairs.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from kubeinfer_operator.api.deployment_config import Alarm, Comparison, DeploymentConfig
from kubeinfer_operator.reconcile.autoscale_metrics import CounterSum, usable_value
from kubeinfer_operator.reconcile.promql_scope import with_namespace
from kubeinfer_operator.reconcile.rollout import (
    GREEN_SUFFIX,
    AlarmEvaluation,
    Phase,
    RolloutState,
)
from kubeinfer_runtime.contract.shadow import COMPARED, DISAGREED, MirrorRoute

#: Latency histogram bounds read per route (a gateway writes about fifteen). The gateway
#: pods are found by their labels, which anyone who may edit pods in the namespace can
#: put on a pod of their own: its /metrics may carry new bounds on every scrape, and
#: each bound would be remembered by a baking step's window (a ``CounterSum`` each, and
#: a place in every sample) for as long as it bakes, in the operator every tenant shares.
MAX_BUCKETS = 64

#: Error codes that are the caller's fault, not the model's: never count toward errorRate.
CLIENT_ERROR_CODES = frozenset({"ValidationError", "ThrottlingException", "AccessDenied",
                                "AccessDeniedException", "UnknownOperationException",
                                "NotFound", "PayloadTooLarge"})


@dataclass(frozen=True)
class FleetCounters:
    """One route's counters in one scrape (or summed over pods)."""

    invocations: float = 0.0
    errors: float = 0.0
    #: Upstream latency histogram: (upper bound in seconds, cumulative count).
    buckets: tuple[tuple[float, float], ...] = ()
    #: Mirrored pairs between this route and the other fleet of its variant that both
    #: answered (compared), and those whose answers differ (``disagreement`` alarms).
    compared: float = 0.0
    disagreed: float = 0.0


def _server_error(code: str) -> bool:
    return code not in CLIENT_ERROR_CODES and not code.startswith("HTTP4")


def _fleet_pair(a: str, b: str) -> bool:
    """Whether routes ``a`` and ``b`` are the two fleets of one variant."""
    return a + GREEN_SUFFIX == b or b + GREEN_SUFFIX == a


def parse_fleet_metrics(text: str, endpoint: str) -> dict[str, FleetCounters]:
    """Per route of ``endpoint``: invocations, server-side errors, latency buckets and
    the mirrored pairs it took part in (see the module docstring)."""
    inv: dict[str, float] = {}
    err: dict[str, float] = {}
    buckets: dict[str, dict[float, float]] = {}
    pairs: dict[str, dict[str, float]] = {COMPARED: {}, DISAGREED: {}}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if (labels.get("endpoint") != endpoint or not labels.get("variant")
                    or not usable_value(sample.value)):
                continue
            route = labels["variant"]
            if sample.name == "kubeinfer_gateway_invocations_total":
                inv[route] = sample.value
            elif sample.name == "kubeinfer_gateway_errors_total" and _server_error(
                    labels.get("code", "")):
                err[route] = err.get(route, 0.0) + sample.value
            elif sample.name == "kubeinfer_gateway_upstream_latency_seconds_bucket":
                try:
                    le = float(labels.get("le", ""))
                except ValueError:
                    continue  # not a bound a gateway writes
                bounds = buckets.setdefault(route, {})
                if le not in bounds and len(bounds) >= MAX_BUCKETS:
                    raise ValueError(f"route {route[:63]!r} has over {MAX_BUCKETS} latency "
                                     "histogram buckets: not a kubeinfer gateway's metrics")
                bounds[le] = sample.value
            elif sample.name in pairs and _fleet_pair(route, peer := labels.get("peer", "")):
                for r in (route, peer):
                    pairs[sample.name][r] = pairs[sample.name].get(r, 0.0) + sample.value
    compared, disagreed = pairs[COMPARED], pairs[DISAGREED]
    return {r: FleetCounters(inv.get(r, 0.0), err.get(r, 0.0),
                             tuple(sorted(buckets.get(r, {}).items())),
                             compared.get(r, 0.0), disagreed.get(r, 0.0))
            for r in set(inv) | set(err) | set(buckets) | set(compared) | set(disagreed)}


@dataclass
class FleetWindow:
    """Samples of one route's counters, summed over gateway pods without double counting."""

    samples: deque[tuple[float, FleetCounters]] = field(default_factory=deque)
    _sums: dict[str, CounterSum] = field(default_factory=dict)
    #: The histogram bounds summed, the first ``MAX_BUCKETS`` seen: pods may each send
    #: that many, and other ones in every round (see ``MAX_BUCKETS``).
    _bounds: set[float] = field(default_factory=set)
    #: Longest window kept, seconds.
    keep_s: float = 3600.0

    def _sum(self, key: str, values: Mapping[str, float], keep: set[str]) -> float:
        return self._sums.setdefault(key, CounterSum()).update(values, keep)

    def add(self, t: float, by_pod: Mapping[str, FleetCounters | None]) -> None:
        """One scrape round: each gateway pod's counters of this route (None: failed)."""
        read = {p: c for p, c in by_pod.items() if c is not None}
        failed = {p for p, c in by_pod.items() if c is None}
        seen = sorted({le for c in read.values() for le, _ in c.buckets})
        for le in seen:
            if le not in self._bounds and len(self._bounds) < MAX_BUCKETS:
                self._bounds.add(le)
        bounds = [le for le in seen if le in self._bounds]
        summed = FleetCounters(
            self._sum("inv", {p: c.invocations for p, c in read.items()}, failed),
            self._sum("err", {p: c.errors for p, c in read.items()}, failed),
            tuple((le, self._sum(f"le={le}", {p: dict(c.buckets).get(le, 0.0)
                                               for p, c in read.items()}, failed))
                  for le in bounds),
            self._sum("cmp", {p: c.compared for p, c in read.items()}, failed),
            self._sum("dis", {p: c.disagreed for p, c in read.items()}, failed))
        self.samples.append((t, summed))
        while len(self.samples) > 2 and self.samples[1][0] <= t - self.keep_s:
            self.samples.popleft()

    def delta(self, window_s: float, since: float) -> tuple[float, FleetCounters] | None:
        """(seconds covered, increase) over the last ``window_s`` seconds, not before
        ``since`` (the step's start); None with fewer than two samples in it."""
        if len(self.samples) < 2:
            return None
        t1, last = self.samples[-1]
        start = max(t1 - window_s, since)
        base = None
        for t, counters in self.samples:
            if t <= start or base is None:
                base = (t, counters)
            if t > start:
                break
        assert base is not None
        t0, first = base
        if t1 <= t0:
            return None
        before = dict(first.buckets)
        return t1 - t0, FleetCounters(
            max(last.invocations - first.invocations, 0.0),
            max(last.errors - first.errors, 0.0),
            tuple((le, max(n - before.get(le, 0.0), 0.0)) for le, n in last.buckets),
            max(last.compared - first.compared, 0.0),
            max(last.disagreed - first.disagreed, 0.0))


def quantile(q: float, buckets: tuple[tuple[float, float], ...]) -> float | None:
    """Prometheus' histogram_quantile over cumulative ``buckets`` (seconds)."""
    if not buckets:
        return None
    total = buckets[-1][1]
    if total <= 0:
        return None
    rank = q * total
    prev_le, prev_n = 0.0, 0.0
    for le, n in buckets:
        if n >= rank:
            if math.isinf(le):
                return prev_le
            if n == prev_n:
                return le
            return prev_le + (le - prev_le) * (rank - prev_n) / (n - prev_n)
        prev_le, prev_n = le, n
    return prev_le


def compare(value: float, threshold: float, how: Comparison) -> bool:
    return {Comparison.GREATER: value > threshold,
            Comparison.GREATER_OR_EQUAL: value >= threshold,
            Comparison.LESS: value < threshold,
            Comparison.LESS_OR_EQUAL: value <= threshold}[how]


def evaluate(alarm: Alarm, window: FleetWindow | None, *, since: float,
             promql_value: float | None = None) -> AlarmEvaluation:
    """One alarm's evaluation over green's ``window`` (since the step began)."""
    if alarm.promQL is not None:
        p = alarm.promQL
        if promql_value is None:
            return AlarmEvaluation(alarm.name, "promQL", p.threshold, None,
                                   detail="no answer from Prometheus")
        return AlarmEvaluation(alarm.name, "promQL", p.threshold, promql_value,
                               tripped=compare(promql_value, p.threshold, p.comparison))
    threshold = alarm.threshold
    got = window.delta(alarm.windowSeconds, since) if window is not None else None
    if got is None:
        return AlarmEvaluation(alarm.name, alarm.kind, threshold, None,
                               detail="no metrics from the gateway yet")
    _, d = got
    if alarm.disagreement is not None:
        pairs = int(d.compared)
        if pairs < alarm.minRequests:
            return AlarmEvaluation(alarm.name, "disagreement", threshold, None, requests=pairs,
                                   detail=f"{pairs}/{alarm.minRequests} mirrored pairs "
                                          "compared in the window")
        rate = d.disagreed / pairs
        return AlarmEvaluation(alarm.name, "disagreement", threshold, rate,
                               tripped=rate > threshold, requests=pairs)
    requests = int(max(d.invocations, d.errors))
    if requests < alarm.minRequests:
        return AlarmEvaluation(alarm.name, alarm.kind, threshold, None, requests=requests,
                               detail=f"{requests}/{alarm.minRequests} requests in the window")
    if alarm.errorRate is not None:
        rate = d.errors / requests
        return AlarmEvaluation(alarm.name, "errorRate", threshold, rate,
                               tripped=rate > threshold, requests=requests)
    p99 = quantile(0.99, d.buckets)
    if p99 is None:
        return AlarmEvaluation(alarm.name, "latencyP99Ms", threshold, None, requests=requests,
                               detail="no latency samples")
    ms = p99 * 1000
    return AlarmEvaluation(alarm.name, "latencyP99Ms", threshold, ms, tripped=ms > threshold,
                           requests=requests)


def render_query(query: str, endpoint: str, route: str, namespace: str) -> str:
    """A promQL alarm's query with its placeholders filled in."""
    return with_namespace(query.replace("{endpoint}", endpoint).replace("{variant}", route),
                          namespace)


def mirrors(config: DeploymentConfig | None, state: RolloutState | None) -> list[MirrorRoute]:
    """The gateway's mirrors for one variant's rollout: while a step bakes (or blue waits
    out terminationWait) under a ``disagreement`` alarm, each fleet's requests copied to
    the other at the alarm's ``mirrorSamplingPercentage``; none otherwise."""
    share = config.mirror_sampling if config is not None else None
    if (share is None or state is None or state.blue == state.green
            or state.phase not in (Phase.BAKING, Phase.TERMINATING)):
        return []
    return [MirrorRoute(source=state.blue, peer=state.green, sampling_percentage=share),
            MirrorRoute(source=state.green, peer=state.blue, sampling_percentage=share)]
