"""Variant and upstream choice (gateway/routing.py): weights, targeting, health."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from kubeinfer_runtime.contract import EndpointRoute, RouteTable, VariantRoute
from kubeinfer_runtime.gateway.routing import (
    EndpointState,
    Pick,
    choose,
    compile_endpoint,
    compile_table,
    pick_weighted,
)

A1, A2, B1 = "http://a1:8080", "http://a2:8080", "http://b1:8080"


def endpoint(*variants: tuple[str, float, list[str]]) -> EndpointState:
    return compile_endpoint(EndpointRoute(
        name="iris",
        variants=[VariantRoute(name=n, weight=w, upstreams=u) for n, w, u in variants],
    ))


def two_variants(weight_a: float = 0.9, weight_b: float = 0.1) -> EndpointState:
    return endpoint(("a", weight_a, [A1, A2]), ("b", weight_b, [B1]))


@pytest.mark.parametrize(("weights", "r", "expected"), [
    ([1.0, 1.0], 0.0, 0),
    ([1.0, 1.0], 0.49, 0),
    ([1.0, 1.0], 0.5, 1),
    ([1.0, 1.0], 0.999999, 1),
    ([0.0, 2.0, 0.0, 2.0], 0.0, 1),
    ([0.0, 2.0, 0.0, 2.0], 0.75, 3),
    ([3.0, 0.0], 0.999999, 0),
    ([0.0, 0.0], 0.3, None),
    ([], 0.3, None),
])
def test_pick_weighted_maps_draw_to_index(weights: list[float], r: float,
                                          expected: int | None) -> None:
    assert pick_weighted(weights, r) == expected


def test_pick_weighted_survives_rounding_at_the_top() -> None:
    # r just below 1 times a total made of inexact floats must not fall off the end.
    assert pick_weighted([0.1, 0.2, 0.0], 1.0 - 1e-17) == 1


def test_weighted_choice_matches_weights_with_seeded_rng() -> None:
    ep = endpoint(("a", 0.7, [A1]), ("b", 0.2, [B1]), ("c", 0.1, ["http://c1"]))
    rng = random.Random(42)
    n = 20_000
    counts: Counter[str] = Counter()
    for _ in range(n):
        pick = choose(ep, None, set(), rng)
        assert isinstance(pick, Pick)
        counts[pick.variant.name] += 1
    assert counts["a"] / n == pytest.approx(0.7, abs=0.015)
    assert counts["b"] / n == pytest.approx(0.2, abs=0.015)
    assert counts["c"] / n == pytest.approx(0.1, abs=0.015)


def test_zero_weight_variant_gets_no_unpinned_traffic_but_can_be_targeted() -> None:
    ep = endpoint(("a", 1.0, [A1]), ("shadowish", 0.0, [B1]))
    rng = random.Random(1)
    names = {choose(ep, None, set(), rng).variant.name for _ in range(500)}  # type: ignore[union-attr]
    assert names == {"a"}
    pick = choose(ep, "shadowish", set(), rng)
    assert isinstance(pick, Pick)
    assert (pick.variant.name, pick.upstream) == ("shadowish", B1)


def test_targeted_variant_ignores_weights() -> None:
    ep = two_variants(1.0, 0.0001)
    rng = random.Random(3)
    for _ in range(50):
        pick = choose(ep, "b", set(), rng)
        assert isinstance(pick, Pick) and pick.variant.name == "b"


def test_unknown_target_variant_is_404_listing_valid_ones() -> None:
    refusal = choose(two_variants(), "nope", set(), random.Random(0))
    assert not isinstance(refusal, Pick)
    assert (refusal.status, refusal.code) == (404, "ValidationError")
    assert '"nope"' in refusal.message and "a, b" in refusal.message
    assert '"iris"' in refusal.message


def test_round_robin_over_healthy_upstreams() -> None:
    ep = endpoint(("a", 1.0, [A1, A2, "http://a3"]))
    rng = random.Random(0)
    seen = [choose(ep, None, set(), rng).upstream for _ in range(6)]  # type: ignore[union-attr]
    assert seen == [A1, A2, "http://a3", A1, A2, "http://a3"]
    seen = [choose(ep, None, {A2}, rng).upstream for _ in range(4)]  # type: ignore[union-attr]
    assert A2 not in seen and set(seen) == {A1, "http://a3"}


def test_unhealthy_drawn_variant_falls_back_to_healthy_one() -> None:
    ep = two_variants(0.5, 0.5)
    rng = random.Random(7)
    for _ in range(200):
        pick = choose(ep, None, {B1}, rng)
        assert isinstance(pick, Pick) and pick.variant.name == "a"


def test_fallback_draw_respects_weights_of_the_healthy_variants() -> None:
    ep = endpoint(("a", 0.5, [A1]), ("b", 0.3, [B1]), ("c", 0.2, ["http://c1"]))
    rng = random.Random(11)
    counts = Counter(choose(ep, None, {A1}, rng).variant.name  # type: ignore[union-attr]
                     for _ in range(10_000))
    assert set(counts) == {"b", "c"}
    assert counts["b"] / 10_000 == pytest.approx(0.6, abs=0.02)


def test_targeted_variant_with_nothing_healthy_is_503_naming_it() -> None:
    refusal = choose(two_variants(), "b", {B1}, random.Random(0))
    assert not isinstance(refusal, Pick)
    assert (refusal.status, refusal.code) == (503, "ServiceUnavailable")
    assert '"b"' in refusal.message


def test_nothing_healthy_at_all_is_503() -> None:
    refusal = choose(two_variants(), None, {A1, A2, B1}, random.Random(0))
    assert not isinstance(refusal, Pick)
    assert refusal.status == 503


def test_variant_without_upstreams_counts_as_unhealthy() -> None:
    ep = endpoint(("a", 0.5, []), ("b", 0.5, [B1]))
    rng = random.Random(5)
    assert {choose(ep, None, set(), rng).variant.name for _ in range(100)} == {"b"}  # type: ignore[union-attr]
    assert choose(ep, "a", set(), rng).status == 503  # type: ignore[union-attr]


def test_all_weights_zero_is_503_saying_to_target_a_variant() -> None:
    refusal = choose(endpoint(("a", 0.0, [A1])), None, set(), random.Random(0))
    assert not isinstance(refusal, Pick)
    assert refusal.status == 503 and "TargetVariant" in refusal.message


def test_compile_table_keys_by_endpoint_name_and_dedupes_upstreams() -> None:
    table = RouteTable(revision=4, endpoints={"iris": EndpointRoute(
        name="iris", variants=[VariantRoute(name="a", weight=1, upstreams=[A1, A1, A2])])})
    state = compile_table(table)
    assert state.revision == 4
    assert state.endpoints["iris"].by_name["a"].upstreams == (A1, A2)
    assert state.upstreams() == {A1, A2}
    assert state.endpoints["iris"].by_name["a"].header_value == b"a"


def test_zero_weight_variant_is_no_fallback_for_unpinned_traffic() -> None:
    ep = endpoint(("a", 1.0, [A1]), ("dark", 0.0, [B1]))
    refusal = choose(ep, None, {A1}, random.Random(0))
    assert not isinstance(refusal, Pick)
    assert refusal.status == 503 and '"a"' in refusal.message
