"""Tenants' PromQL reads only their own namespace (``reconcile.promql_scope``), and
``validate_endpoint`` refuses an Endpoint whose queries could read another's.

The scaler's check as a query is sent is in tests/integration/test_outbound.py; the
operator reporting it as InvalidSpec in tests/integration/test_operator_security.py.
"""

from __future__ import annotations

from typing import Any

import pytest

from kubeinfer_operator.reconcile.promql_scope import scope_problem, with_namespace
from kubeinfer_operator.reconcile.validate import InvalidSpec, validate_endpoint

NS = "team-a"


def problem(query: str, label: str = "namespace") -> str | None:
    return scope_problem(query, NS, label, "q")


@pytest.mark.parametrize("query", [
    'up{namespace="team-a"}',
    'sum(rate(http_requests_total{namespace="team-a", code=~"5.."}[5m]))',
    'x{namespace="team-a"} / on() group_left y{namespace="team-a"}',
    'max_over_time(rate(x{namespace="team-a"}[1m])[10m:1m] offset 5m)',
    'histogram_quantile(0.99, sum by (le) (rate(b_bucket{namespace="team-a"}[5m])))',
    "x{namespace='team-a'}", "x{namespace=`team-a`}",           # other string quotes
    'x{namespace="te\\x61m-a"}',                                  # an escape, decoded
    '{"namespace"="team-a", __name__="up"}',                      # a quoted label name
    'x{namespace="team-a", namespace!="team-b"}',                 # narrower still
    "vector(1)", "time()", "scalar(vector(2)) * 3",               # reads no series
])
def test_queries_that_read_only_the_namespace_pass(query: str) -> None:
    assert problem(query) is None


@pytest.mark.parametrize(("query", "says"), [
    ("up", 'up does not select namespace="team-a"'),
    ('sum(rate(x{namespace="team-b"}[5m]))', 'x does not select namespace="team-a"'),
    ('x{namespace=~"team-a"}', "x does not select"),             # a regex is not a pin
    ('x{namespace=~"team-a|team-b"}', "x does not select"),
    ('x{namespace!="team-b"}', "x does not select"),
    ('x{namespace="team-a"} / on() y', "y does not select"),     # every selector counts
    ('x{namespace="team-a"} or y{job="z"}', "y does not select"),
    ('count(x{namespace="team-a"}) + absent(z)', "z does not select"),
    ('max_over_time(rate(z[1m])[10m:1m])', "z does not select"),  # inside a subquery
    ('x{namespace="team-a" or namespace="team-b"}', "uses `or` inside its braces"),
    ('info(x{namespace="team-a"})', "info() reads series no selector names"),
    ('x{namespace="team-a"} # a comment\n + y', "y does not select"),  # after a comment
    ("sum(", "not valid PromQL"),
    ('{__name__=~".+"}', 'a selector does not select namespace="team-a"'),
])
def test_queries_that_could_read_elsewhere_are_refused(query: str, says: str) -> None:
    found = problem(query)
    assert found is not None and found.startswith("q: ") and says in found, found


def test_the_label_is_the_settings_and_empty_turns_the_check_off() -> None:
    assert problem('x{kubernetes_namespace="team-a"}', "kubernetes_namespace") is None
    assert problem('x{namespace="team-a"}', "kubernetes_namespace") is not None
    assert problem('sum(x{namespace="team-b"})', "") is None


def test_the_placeholder_is_filled_with_the_namespace() -> None:
    assert with_namespace('x{namespace="{namespace}"}', NS) == 'x{namespace="team-a"}'
    assert problem(with_namespace('rate(x{namespace="{namespace}"}[1m])', NS)) is None


def endpoint(query: str | None = None, alarm: str | None = None,
             url: str = "http://prometheus.monitoring:9090") -> dict[str, Any]:
    variant: dict[str, Any] = {"name": "a", "model": {"uri": "s3://m/a.onnx"}}
    spec: dict[str, Any] = {"variants": [variant]}
    if query is not None:
        variant["autoscaling"] = {
            "maxReplicas": 3, "prometheusUrl": url,
            "targetTracking": [{"metric": "InvocationsPerReplica", "target": 10},
                               {"metric": "Custom", "query": query, "target": 1}],
            "stepScaling": [{"metric": "Custom", "query": query,
                             "steps": [{"lowerBound": 0, "change": 1}]}]}
    if alarm is not None:
        spec["deploymentConfig"] = {
            "blueGreen": {"trafficRouting": {"type": "AllAtOnce"}},
            "autoRollback": {"prometheusUrl": url, "alarms": [
                {"name": "e", "errorRate": 0.1},
                {"name": "p", "promQL": {"query": alarm, "threshold": 1}}]}}
    return spec


def test_an_endpoint_reading_another_namespace_is_invalid_naming_each_field() -> None:
    with pytest.raises(InvalidSpec) as caught:
        validate_endpoint("iris", NS, endpoint('sum(x{namespace="team-b"})',
                                               'up{job="{endpoint}"}'),
                          promql_label="namespace")
    fields = [p.split(":")[0] for p in caught.value.problems]
    assert fields == ["spec.variants[0].autoscaling.targetTracking[1].query",
                      "spec.variants[0].autoscaling.stepScaling[0].query",
                      "spec.deploymentConfig.autoRollback.alarms[1].promQL.query"]
    assert all('namespace="team-a"' in p for p in caught.value.problems)


def test_an_endpoint_using_the_placeholders_is_valid() -> None:
    validate_endpoint("iris", NS, endpoint(
        'sum(x{namespace="{namespace}"})',
        'rate(kubeinfer_gateway_errors_total{namespace="{namespace}", endpoint="{endpoint}", '
        'variant="{variant}"}[1m])'), promql_label="namespace")


def test_a_prometheus_url_carrying_a_query_of_its_own_is_invalid() -> None:
    """Prometheus runs the first ``query`` parameter: one in the URL would run instead of
    the checked query, which is appended after it."""
    smuggled = ('http://prometheus.monitoring:9090/api/v1/query'
                '?query=sum(x{namespace="team-b"})&x=')
    ok = 'sum(x{namespace="{namespace}"})'
    for url in (smuggled, "http://prometheus.monitoring:9090/#", "http://p:9090/?"):
        with pytest.raises(InvalidSpec) as caught:
            validate_endpoint("iris", NS, endpoint(ok, ok, url=url), promql_label="namespace")
        fields = [p.split(":")[0] for p in caught.value.problems]
        assert fields == ["spec.variants[0].autoscaling.prometheusUrl",
                          "spec.deploymentConfig.autoRollback.prometheusUrl"], url
    validate_endpoint("iris", NS, endpoint(ok, ok, url=smuggled))  # local mode: no check


def test_local_mode_and_a_cluster_without_the_check_accept_any_query() -> None:
    unscoped = endpoint('sum(x{namespace="team-b"})', "up")
    validate_endpoint("iris", NS, unscoped)  # local mode: no label given
    validate_endpoint("iris", NS, unscoped, promql_label="")
