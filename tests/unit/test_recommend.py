"""Inference Recommender's pure parts: quantile CIs, pricing, judging steps, successive
halving and ranking (with a fake measurer), and the Endpoint it writes."""

from __future__ import annotations

import asyncio

import pytest

from kubeinfer_operator.api.endpoint import Endpoint
from kubeinfer_operator.render.recommend_plan import (
    RecommendPlanError,
    recommend_request,
    recommended_endpoint,
)
from kubeinfer_runtime.contract.recommend import (
    Candidate,
    CandidateGrid,
    CandidateSearch,
    InstanceType,
    LoadSettings,
    Quantile,
    RecommendRequest,
    Resources,
    StepResult,
)
from kubeinfer_runtime.recommend import pricing, servers, stats
from kubeinfer_runtime.recommend.search import CandidateFailed, Search, judge, rank_key, rates

TYPES = [InstanceType(name="s", cpu=1, memory="2Gi", pricePerHour=1.0),
         InstanceType(name="m", cpu=2, memory="4Gi", pricePerHour=2.0)]


def test_quantile_ci_brackets_the_value_and_narrows_with_samples() -> None:
    widths = []
    for n in (200, 20000):
        h = stats.new_histogram()
        for i in range(n):
            stats.record_seconds(h, (i * 1000 // n + 1) / 1e4)  # 0.1 .. 100 ms, uniform
        q = stats.quantile(h, 0.99)
        assert q.low <= q.value <= q.high
        assert q.value == pytest.approx(99.0, rel=0.02)
        widths.append(q.high - q.low)
    assert widths[1] < widths[0]
    assert stats.quantile(stats.new_histogram(), 0.5) == Quantile(value=0, low=0, high=0)


def test_order_statistic_ranks() -> None:
    assert stats.order_statistic_ranks(100, 0.5) == (40, 61)
    # Ranks are clamped to the samples there are, at both ends.
    assert stats.order_statistic_ranks(10, 0.999) == (9, 10)
    assert stats.order_statistic_ranks(10, 0.001) == (1, 2)


def test_pricing_picks_the_cheapest_fitting_type_times_replicas() -> None:
    c = Candidate(name="a", replicas=3, resources=Resources(requests={"cpu": "1500m",
                                                                      "memory": "1Gi"}))
    assert pricing.cost_per_hour(c, TYPES) == ("m", 6.0)
    assert pricing.cost_per_million(c, TYPES, 1000) == pytest.approx(6.0 / 3.6e6 * 1e6)
    assert pricing.cost_per_hour(Candidate(name="b", threads=4), TYPES) == (None, None)
    assert pricing.cost_per_hour(Candidate(name="c", instanceType="m"), TYPES) == ("m", 2.0)


def test_grid_expands_and_request_checks_names() -> None:
    grid = CandidateGrid(threads=[1, 2], workers=[1, 2], replicas=[1])
    assert len(grid.expand()) == 4
    with pytest.raises(ValueError, match="duplicate"):
        RecommendRequest(modelUri="file:///m", candidates=[Candidate(name="a")] * 2)
    with pytest.raises(ValueError, match="compiledModelUri"):
        RecommendRequest(modelUri="file:///m",
                         candidates=[Candidate(name="a", artifact="compiled")])


def _step(rate: float, p99: float, errors: int = 0, achieved: float | None = None) -> StepResult:
    q = Quantile(value=p99, low=p99, high=p99)
    return StepResult(targetRate=rate, achievedRate=achieved or rate, seconds=1.0,
                      requests=int(rate), errors=errors, p50=q, p90=q, p99=q, p999=q,
                      cpuPercent=0, memoryBytes=0, held=False)


def test_judge() -> None:
    assert judge(_step(100, 5), 10).held
    assert judge(_step(100, 50), 10).limitedBy == "slo"
    assert judge(_step(1000, 5, errors=2), 10).limitedBy == "errors"
    assert judge(_step(1000, 5, errors=1), 10).held
    assert judge(_step(1000, 5, achieved=900), 10).limitedBy == "generator"
    assert rates(LoadSettings(startRate=100, rateFactor=2, maxRate=800)) == [100, 200, 400, 800]


class FakeMeasurer:
    """Each candidate holds p99 10 ms up to ``limit`` req/s, then 1 s."""

    def __init__(self, limits: dict[str, float], broken: set[str]) -> None:
        self.limits = limits
        self.broken = broken
        self.started: list[str] = []

    async def start(self, c: Candidate) -> None:
        if c.name in self.broken:
            raise CandidateFailed(f"{c.name}: exited\nlast log line")
        self.started.append(c.name)

    async def step(self, c: Candidate, rate: float, seconds: float, *,
                   warmup: bool = False) -> StepResult:
        return _step(rate, 10 if rate <= self.limits[c.name] else 1000)

    async def stop(self, c: Candidate) -> None:
        pass


def test_successive_halving_ranks_by_cost_per_inference() -> None:
    cands = [Candidate(name=n, instanceType=t) for n, t in
             (("cheap-slow", "s"), ("dear-fast", "m"), ("cheap-fast", "s"), ("bad", "s"))]
    req = RecommendRequest(modelUri="file:///m", candidates=cands, instanceTypes=TYPES,
                           load=LoadSettings(startRate=100, rateFactor=2, maxRate=1600,
                                             sloP99Ms=50, warmupSeconds=0))
    fake = FakeMeasurer({"cheap-slow": 200, "dear-fast": 1200, "cheap-fast": 800, "bad": 0},
                        {"bad"})
    report = asyncio.run(Search(request=req, measurer=fake).run())
    assert report.ranking == ["cheap-fast", "dear-fast", "cheap-slow", "bad"]
    assert report.recommended == "cheap-fast"
    best = report.result("cheap-fast")
    assert best.state == "Measured" and best.maxThroughput == 800 and best.rounds == 3
    assert report.result("bad").state == "Failed" and "last log line" in (
        report.result("bad").error or "")
    assert report.autoscalingTarget == 800 * 0.7 * 60
    assert [rank_key(r) for r in report.results] == sorted(rank_key(r) for r in report.results)
    # Round 1: all four tried; survivors halve: cheap-fast and dear-fast, then cheap-fast.
    assert fake.started == ["cheap-slow", "dear-fast", "cheap-fast", "cheap-fast",
                            "dear-fast", "cheap-fast"]


def test_no_candidate_holds() -> None:
    req = RecommendRequest(modelUri="file:///m", candidates=[Candidate(name="a")],
                           load=LoadSettings(startRate=100, maxRate=100, warmupSeconds=0))
    report = asyncio.run(Search(request=req, measurer=FakeMeasurer({"a": 0}, set())).run())
    assert report.recommended is None and "No candidate held" in report.reason


def test_payload_from_metadata() -> None:
    body = servers.payload_from_metadata(
        {"inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 3]}]})
    assert body == '{"instances": [[0.5, 0.5, 0.5]]}'
    assert servers.payload_from_metadata({"inputs": []}) is None


def test_load_failed_marker_matches_the_server() -> None:
    from kubeinfer_runtime.server.state import LOAD_FAILED_MARKER

    assert servers.LOAD_FAILED == LOAD_FAILED_MARKER


def test_cpu_sets_pin_replicas_round_robin() -> None:
    c = Candidate(name="a", replicas=2, resources=Resources(limits={"cpu": "1"}))
    assert servers.cpu_sets(c, 2) == [{0}, {1}]
    assert servers.cpu_sets(Candidate(name="b"), 2) is None


ENDPOINT = {"apiVersion": "kubeinfer.io/v1alpha1", "kind": "Endpoint",
            "metadata": {"name": "mlp"},
            "spec": {"variants": [{"name": "main", "model": {"uri": "file://mlp.onnx"},
                                   "env": [{"name": "KUBEINFER_WORKERS", "value": "4"}]}]}}


def test_request_and_recommended_endpoint_round_trip() -> None:
    ep = Endpoint.model_validate(ENDPOINT)
    req = recommend_request(ep, CandidateSearch(), base_dir="/models", slo_p99_ms=25)
    assert req.modelUri == "file:///models/mlp.onnx" and req.load.sloP99Ms == 25
    assert [c.name for c in req.candidates] == ["threads-1", "threads-2", "workers-2"]
    with pytest.raises(RecommendPlanError, match="no variant"):
        recommend_request(ep, CandidateSearch(), variant="nope")
    cands = [Candidate(name="w2", workers=2, replicas=2,
                       resources=Resources(requests={"cpu": "2", "memory": "1Gi"}))]
    req2 = RecommendRequest(modelUri="file:///m", candidates=cands, instanceTypes=TYPES,
                            load=LoadSettings(startRate=100, rateFactor=2, maxRate=400,
                                              warmupSeconds=0))
    report = asyncio.run(Search(request=req2, measurer=FakeMeasurer({"w2": 400},
                                                                    set())).run())
    doc = recommended_endpoint(ENDPOINT, report)
    out = Endpoint.model_validate(doc)
    v = out.spec.variants[0]
    assert v.replicas == 2 and v.resources.requests == {"cpu": "2", "memory": "1Gi"}
    assert [(e.name, e.value) for e in v.env] == [("KUBEINFER_INTRA_OP_THREADS", "1"),
                                                  ("KUBEINFER_WORKERS", "2")]
    assert v.autoscaling is not None and v.autoscaling.maxReplicas == 8
    assert v.autoscaling.targetTracking[0].target == pytest.approx(400 / 2 * 0.7 * 60)
    assert ENDPOINT["spec"]["variants"][0]["env"] == [  # type: ignore[index]
        {"name": "KUBEINFER_WORKERS", "value": "4"}]


def test_example_candidates_file_is_valid() -> None:
    from pathlib import Path

    import yaml

    repo = Path(__file__).resolve().parents[2]
    search = CandidateSearch.model_validate(
        yaml.safe_load((repo / "examples" / "recommend-candidates.yaml").read_text()))
    assert len(search.expand()) == 5 and search.load.search == "halving"
