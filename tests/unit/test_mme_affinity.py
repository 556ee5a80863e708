"""Rendezvous hashing: a model sticks to one replica, and only a lost replica's models move."""

from __future__ import annotations

from collections import Counter

from kubeinfer_runtime.gateway.affinity import pick_for_key

UPSTREAMS = [f"http://10.0.0.{i}:8080" for i in range(4)]
MODELS = [f"tenant-{i}/model.onnx" for i in range(400)]


def test_same_model_same_replica_and_an_even_spread() -> None:
    first = {m: pick_for_key(UPSTREAMS, m, set()) for m in MODELS}
    assert first == {m: pick_for_key(list(reversed(UPSTREAMS)), m, set()) for m in MODELS}
    spread = Counter(first.values())
    assert set(spread) == set(UPSTREAMS)
    assert min(spread.values()) > len(MODELS) / len(UPSTREAMS) / 2


def test_only_the_models_of_a_down_replica_move() -> None:
    before = {m: pick_for_key(UPSTREAMS, m, set()) for m in MODELS}
    down = {UPSTREAMS[1]}
    after = {m: pick_for_key(UPSTREAMS, m, down) for m in MODELS}
    moved = {m for m in MODELS if before[m] != after[m]}
    assert moved == {m for m in MODELS if before[m] == UPSTREAMS[1]}
    assert UPSTREAMS[1] not in after.values()


def test_nothing_healthy_or_excluded() -> None:
    assert pick_for_key(UPSTREAMS, "m", set(UPSTREAMS)) is None
    chosen = pick_for_key(UPSTREAMS, "m", set())
    assert pick_for_key(UPSTREAMS, "m", set(), exclude=chosen) not in (None, chosen)
