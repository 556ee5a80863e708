"""A variant split between its blue and green fleets (deployment guardrails) as the
gateway routes it: clients see the production variant's name, TargetVariant reaches
both fleets by their split, metrics stay per fleet."""

from __future__ import annotations

import random
from collections import Counter

from kubeinfer_runtime.contract import EndpointRoute, VariantRoute
from kubeinfer_runtime.errors import NotFound
from kubeinfer_runtime.gateway.routing import EndpointState, Pick, choose, compile_endpoint

BLUE, GREEN, OTHER = "http://blue:8080", "http://green:8080", "http://other:8080"


def rolling(blue_weight: float = 0.75, green_weight: float = 0.25) -> EndpointState:
    return compile_endpoint(EndpointRoute(name="iris", variants=[
        VariantRoute(name="primary", weight=blue_weight, upstreams=[BLUE],
                     production_variant="primary"),
        VariantRoute(name="primary-green", weight=green_weight, upstreams=[GREEN],
                     production_variant="primary"),
        VariantRoute(name="other", weight=0.0, upstreams=[OTHER]),
    ]))


def picks(ep: EndpointState, target: str | None, n: int = 4000,
          down: frozenset[str] = frozenset()) -> Counter[str]:
    rng = random.Random(7)
    out: Counter[str] = Counter()
    for _ in range(n):
        pick = choose(ep, target, down, rng)
        assert isinstance(pick, Pick)
        out[pick.upstream] += 1
    return out


def test_green_answers_carry_the_production_variant_name() -> None:
    ep = rolling()
    assert {v.name: v.header_value for v in ep.variants} == {
        "primary": b"primary", "primary-green": b"primary", "other": b"other"}


def test_fleets_keep_their_own_route_names_for_metrics() -> None:
    # The proxy labels invocations, errors and latency by VariantState.name: the rollback
    # alarms read green's series alone.
    ep = rolling()
    assert [v.name for v in ep.variants] == ["primary", "primary-green", "other"]
    assert len({v.name for v in ep.variants}) == 3


def test_target_variant_reaches_blue_and_green_by_their_split() -> None:
    got = picks(rolling(0.75, 0.25), "primary")
    assert set(got) == {BLUE, GREEN}
    assert abs(got[GREEN] / 4000 - 0.25) < 0.03


def test_unpinned_traffic_splits_the_same_way() -> None:
    got = picks(rolling(0.75, 0.25), None)
    assert abs(got[GREEN] / 4000 - 0.25) < 0.03 and OTHER not in got


def test_target_variant_skips_a_fleet_with_nothing_healthy() -> None:
    assert picks(rolling(0.5, 0.5), "primary", 200, frozenset({GREEN})) == {BLUE: 200}


def test_zero_weight_variant_under_rollout_pins_to_its_first_healthy_fleet() -> None:
    assert picks(rolling(0.0, 0.0), "primary", 50) == {BLUE: 50}


def test_fleet_slot_names_are_not_targets_and_errors_list_production_variants() -> None:
    ep = rolling()
    refusal = choose(ep, "primary-green", frozenset(), random.Random(1))
    assert isinstance(refusal, NotFound)
    assert "one of primary, other" in str(refusal)


def test_a_route_without_production_variant_is_its_own_target() -> None:
    assert picks(rolling(), "other", 10) == {OTHER: 10}
