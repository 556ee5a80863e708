"""The lock-free loop metrics export exactly what prometheus_client would."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from kubeinfer_runtime import metrics


def _lines(text: str, prefix: str) -> list[str]:
    return sorted(line for line in text.splitlines() if line.startswith(prefix))


def test_loop_histogram_matches_prometheus_client() -> None:
    values = [0.00001, 0.00005, 0.0001, 0.0003, 0.002, 0.5, 1.0, 75.0]
    fam = metrics.LoopHistogramFamily("kubeinfer_test_loop_seconds", "test", ("a",))
    ref_registry = CollectorRegistry()
    ref = Histogram("kubeinfer_test_loop_seconds", "test", ("a",),
                    buckets=metrics.LATENCY_BUCKETS, registry=ref_registry)
    for v in values:
        fam.labels("x").observe(v)
        ref.labels("x").observe(v)
    ours = metrics.render_latest()[0].decode()
    theirs = generate_latest(ref_registry).decode()
    for suffix in ("_bucket", "_count", "_sum"):
        assert _lines(ours, "kubeinfer_test_loop_seconds" + suffix) == \
            _lines(theirs, "kubeinfer_test_loop_seconds" + suffix)
    assert 'kubeinfer_test_loop_seconds_bucket{a="x",le="+Inf"} 8.0' in ours


def test_model_server_metrics_are_bound_once_and_counted() -> None:
    m = metrics.ModelServerMetrics("ep", "v1", "m1")
    m.invocations.inc()
    m.invocations.inc(2)
    m.error(400)
    m.error(400)
    m.error(503)
    m.model_latency.observe(0.001)
    text = metrics.render_latest()[0].decode()
    labels = 'endpoint="ep",model="m1",variant="v1"'
    assert f"kubeinfer_invocations_total{{{labels}}} 3.0" in text
    assert f'kubeinfer_invocation_errors_total{{code="400",{labels}}} 2.0' in text
    assert f'kubeinfer_invocation_errors_total{{code="503",{labels}}} 1.0' in text
    assert f"kubeinfer_model_latency_seconds_count{{{labels}}} 1.0" in text
    # Binding the same labels again reuses the same children (no reset, no duplicate).
    again = metrics.ModelServerMetrics("ep", "v1", "m1")
    assert again.invocations is m.invocations


def test_wrong_label_count_is_refused() -> None:
    with pytest.raises(ValueError, match="takes labels"):
        metrics.INVOCATIONS.labels("only-one")
