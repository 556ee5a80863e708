"""Shadow variants, the pure parts: comparison, status from metrics, plan, promote."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kubeinfer_operator.api.endpoint import Endpoint
from kubeinfer_operator.reconcile import shadow_status
from kubeinfer_operator.reconcile.promote import PromoteError, promote
from kubeinfer_operator.render.plan import plan_endpoint
from kubeinfer_runtime.gateway import compare as compare_module
from kubeinfer_runtime.gateway.compare import compare

JSON = "application/json"


@pytest.mark.parametrize(("a", "b", "agreed"), [
    (b"[0, 1, 2]", b"[0, 1, 2]", True),                      # labels
    (b"[0, 1, 2]", b"[0, 2, 2]", False),
    (b'["cat", "dog"]', b'["cat", "dog"]', True),
    (b"[[0.1, 0.9], [0.8, 0.2]]", b"[[0.3, 0.7], [0.6, 0.4]]", True),   # same argmax
    (b"[[0.1, 0.9], [0.8, 0.2]]", b"[[0.6, 0.4], [0.6, 0.4]]", False),
    (b"[1.5, 2.0]", b"[1.5000001, 2.0]", True),              # regression, within tolerance
    (b"[1.5, 2.0]", b"[1.6, 2.0]", False),
    (b'{"predictions": [1, 2]}', b'{"predictions": [1, 2]}', True),
    (b'{"outputs": [{"name": "label", "datatype": "INT64", "shape": [2], "data": [1, 0]}]}',
     b'{"outputs": [{"name": "label", "datatype": "INT64", "shape": [2], "data": [1, 1]}]}',
     False),
    (b'{"outputs": [{"name": "p", "datatype": "FP32", "shape": [2, 2], '
     b'"data": [0.1, 0.9, 0.7, 0.3]}]}',
     b'{"outputs": [{"name": "p", "datatype": "FP32", "shape": [2, 2], '
     b'"data": [0.2, 0.8, 0.9, 0.1]}]}', True),
    (b'[{"a": 0.9, "b": 0.1}]', b'[{"a": 0.2, "b": 0.8}]', False),    # ZipMap rows
    (b"[1, 2]", b"[1, 2, 3]", False),                        # shapes differ
])
def test_agreement_follows_the_answers_shape(a: bytes, b: bytes, agreed: bool) -> None:
    assert compare(a, JSON, b, JSON).agreed is agreed


_leaf = st.one_of(st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
                  st.booleans(), st.text(max_size=3), st.none())
_value = st.recursive(_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=2), inner, max_size=3)),
    max_leaves=12)


@settings(max_examples=400, deadline=None)
@given(value=_value, datatype=st.sampled_from([None, "FP32", "INT64", "BYTES", "bool"]))
@example(value=float("nan"), datatype="INT64")  # found by this test: NaN != NaN
def test_identical_answers_take_a_shortcut_to_the_same_verdict(value: Any,
                                                               datatype: str | None) -> None:
    """A shadow answering byte for byte as production does is compared in half the
    steps; the verdict (agreement and the 0 differences, or none) is the general one."""
    def general() -> Any:
        return compare_module._compare_output(value, value, datatype, compare_module.RTOL,
                                              compare_module.ATOL)

    def same() -> Any:
        return compare_module._same_output(value, datatype, compare_module.RTOL,
                                           compare_module.ATOL)

    try:
        expected = general()
    except (OverflowError, ValueError) as e:
        with pytest.raises(type(e)):
            same()
        return
    got = same()
    assert got.agreed == expected.agreed
    for field in ("max_abs", "max_rel"):
        a, b = getattr(got, field), getattr(expected, field)
        assert (a is None) == (b is None)
        if a is not None:
            assert a == b or (math.isnan(a) and math.isnan(b))


def test_numeric_differences() -> None:
    verdict = compare(b"[2.0, 4.0]", JSON, b"[2.5, 4.0]", JSON)
    assert verdict.max_abs == pytest.approx(0.5) and verdict.max_rel == pytest.approx(0.25)
    assert compare(b"1\n2\n", "text/csv", b"1\n2\n", "text/csv").agreed
    assert not compare(b"\x00\x01", "application/x-npy", b"\x00\x02", "application/x-npy").agreed


def test_quantile_interpolates_like_prometheus() -> None:
    buckets = {0.001: 0.0, 0.01: 50.0, 0.1: 100.0, float("inf"): 100.0}
    assert shadow_status.quantile(buckets, 0.5) == pytest.approx(0.01)
    assert shadow_status.quantile(buckets, 0.75) == pytest.approx(0.055)
    assert shadow_status.quantile({}, 0.5) is None


METRICS = """
# TYPE kubeinfer_shadow_copies_total counter
kubeinfer_shadow_copies_total{endpoint="iris",variant="a",peer="b",result="sent"} 90.0
kubeinfer_shadow_copies_total{endpoint="iris",variant="a",peer="b",result="dropped"} 10.0
kubeinfer_shadow_copies_total{endpoint="other",variant="a",peer="b",result="sent"} 5.0
# TYPE kubeinfer_shadow_compared_total counter
kubeinfer_shadow_compared_total{endpoint="iris",variant="a",peer="b"} 80.0
# TYPE kubeinfer_shadow_agreed_total counter
kubeinfer_shadow_agreed_total{endpoint="iris",variant="a",peer="b"} 72.0
# TYPE kubeinfer_shadow_errors_total counter
kubeinfer_shadow_errors_total{endpoint="iris",variant="a",peer="b",side="peer"} 10.0
"""


def test_status_entries_from_two_gateways() -> None:
    totals = shadow_status.add([shadow_status.parse(METRICS, "iris")] * 2)
    [entry] = shadow_status.entries(["b"], totals)
    assert entry == {"name": "b", "copiesSent": 180, "copiesFailed": 0, "copiesDropped": 20,
                     "requestsCompared": 160, "agreementPercent": 90.0,
                     "productionErrors": 0, "shadowErrors": 20}


def _endpoint(**spec: Any) -> Endpoint:
    return Endpoint.model_validate({
        "apiVersion": "kubeinfer.io/v1alpha1", "kind": "Endpoint", "metadata": {"name": "iris"},
        "spec": {"variants": [{"name": "a", "model": {"uri": "s3://m/a.onnx"}}], **spec}})


def test_shadows_get_model_servers_but_no_weight() -> None:
    plan = plan_endpoint(_endpoint(shadowVariants=[{
        "name": "b", "model": {"uri": "s3://m/b.onnx"}, "replicas": 2,
        "samplingPercentage": 30}]))
    assert [(v.name, v.replicas, v.shadow_sampling) for v in plan.variants] == [
        ("a", 1, None), ("b", 2, 30.0)]
    route = plan.route_table({"a": ["http://a:8080"], "b": ["http://b:8080"]}).endpoints["iris"]
    assert [v.name for v in route.variants] == ["a"]
    [shadow] = route.shadows
    assert (shadow.name, shadow.sampling_percentage, shadow.upstreams) == (
        "b", 30.0, ["http://b:8080"])
    # Its version: what restarts its servers restarts its comparison (not its replicas).
    assert shadow.revision == plan.variants[1].server_hash
    more = plan_endpoint(_endpoint(shadowVariants=[{
        "name": "b", "model": {"uri": "s3://m/b.onnx"}, "replicas": 5,
        "samplingPercentage": 60}]))
    assert more.route_table({}).endpoints["iris"].shadows[0].revision == shadow.revision
    newer = plan_endpoint(_endpoint(shadowVariants=[{
        "name": "b", "model": {"uri": "s3://m/b2.onnx"}, "samplingPercentage": 30}]))
    assert newer.route_table({}).endpoints["iris"].shadows[0].revision != shadow.revision


def test_promote_copies_the_model_and_keeps_the_variant() -> None:
    spec = {"variants": [{"name": "a", "weight": 2, "replicas": 3,
                          "model": {"uri": "s3://m/a.onnx"}, "env": [{"name": "X"}]}],
            "shadowVariants": [{"name": "b", "model": {"uri": "s3://m/b.onnx"},
                                "samplingPercentage": 10}]}
    out = promote(spec, "b")
    assert out == {"variants": [{"name": "a", "weight": 2, "replicas": 3,
                                 "model": {"uri": "s3://m/b.onnx"}}]}
    assert spec["shadowVariants"]  # the input is left alone
    with pytest.raises(PromoteError, match="no shadow 'c'"):
        promote(spec, "c")
    two = {**spec, "variants": [*spec["variants"], {"name": "z", "model": {"uri": "s3://z"}}]}
    with pytest.raises(PromoteError, match="--variant"):
        promote(two, "b")
    assert promote(two, "b", "z")["variants"][1]["model"] == {"uri": "s3://m/b.onnx"}
