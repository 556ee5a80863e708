"""/metrics text from a pod in a tenant's namespace (anything may carry the gateway's
labels): +Inf, NaN, negative or absurd values and missing labels are left out, never
an exception in the Endpoint's sync or scaler round (reconcile.autoscale_metrics,
reconcile.shadow_status, reconcile.rollout_alarms)."""

from __future__ import annotations

import json

import pytest

from kubeinfer_operator.reconcile import shadow_status as ss
from kubeinfer_operator.reconcile.autoscale_metrics import parse_gateway_metrics
from kubeinfer_operator.reconcile.rollout_alarms import parse_fleet_metrics

HOSTILE = ["+Inf", "-Inf", "NaN", "-1", "1e300"]


@pytest.mark.parametrize("value", HOSTILE)
def test_shadow_status_ignores_unusable_values(value: str) -> None:
    text = (f'kubeinfer_shadow_copies_total{{endpoint="e",peer="p",result="sent"}} {value}\n'
            f'kubeinfer_shadow_compared_total{{endpoint="e",peer="p"}} {value}\n'
            f'kubeinfer_shadow_copies_total{{endpoint="e",peer="p",result="failed"}} 2\n')
    [entry] = ss.entries(["p"], ss.add([ss.parse(text, "e")]))
    assert entry["copiesSent"] == 0 and entry["copiesFailed"] == 2
    json.dumps(entry, allow_nan=False)  # what the status write sends


@pytest.mark.parametrize("value", HOSTILE)
def test_gateway_view_ignores_unusable_values_and_unlabelled_samples(value: str) -> None:
    text = (f'kubeinfer_gateway_invocations_total{{endpoint="e",variant="v"}} {value}\n'
            f'kubeinfer_gateway_held_requests{{endpoint="e",variant="v"}} {value}\n'
            'kubeinfer_gateway_invocations_total{endpoint="e"} 3\n'
            'kubeinfer_gateway_held_requests{endpoint="e",variant="w"} 1\n')
    view = parse_gateway_metrics(text, "e")
    assert view.invocations == {} and view.held == {"w": 1.0}


@pytest.mark.parametrize("value", HOSTILE)
def test_fleet_counters_ignore_unusable_values_and_bad_bounds(value: str) -> None:
    text = (f'kubeinfer_gateway_invocations_total{{endpoint="e",variant="v"}} {value}\n'
            'kubeinfer_gateway_upstream_latency_seconds_bucket{endpoint="e",variant="v"} 1\n'
            'kubeinfer_gateway_upstream_latency_seconds_bucket{endpoint="e",variant="v",'
            'le="abc"} 1\n'
            'kubeinfer_gateway_invocations_total{endpoint="e",variant="w"} 4\n')
    counters = parse_fleet_metrics(text, "e")
    assert "v" not in counters and counters["w"].invocations == 4.0
