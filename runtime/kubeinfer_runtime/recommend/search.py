"""Stepped rates, successive halving and ranking, over an injected measurer.

The search decides; a :class:`Measurer` does the I/O (start a candidate's
servers or reach its Service, run one open-loop step, stop it). Tests drive
the search with a fake measurer; the CLI and the Job with real ones.

Per candidate and round: warm up, then rates ``r0, r0·f, r0·f², …`` up to
``maxRate``; a step *holds* when its p99 is within the SLO, errors are within
0.1% and the generator kept to its schedule (sending took at most ~5% longer
than the step). The first step that does not
hold ends the candidate's round; max throughput is the highest rate that held.

Successive halving (the default): round 0 screens every candidate with
``stepSeconds`` steps; the better half (by the ranking below) goes on to the
next round with steps twice as long (capped at 4x), starting two steps below
its previous max, until one is left or the time budget is spent. Exhaustive:
one round, every candidate, with the longest steps.

Ranking: candidates measured in more rounds first (survivors beat those
screened out, whose numbers come from shorter runs); within a tier, lowest cost
per 1M inferences at max throughput, then highest max throughput; candidates
that never held the SLO next; failed ones last.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from kubeinfer_runtime.contract.recommend import (
    MAX_ERROR_RATE,
    Candidate,
    CandidateResult,
    LoadSettings,
    RecommendReport,
    RecommendRequest,
    StepResult,
)
from kubeinfer_runtime.recommend import pricing

#: A step held only if the generator sent at least this share of the rate.
GENERATOR_TOLERANCE = 0.95
#: Later rounds' steps are at most this many times the screening step.
MAX_STEP_MULTIPLIER = 4


class CandidateFailed(Exception):
    """A candidate could not start or answer its probe (message: why, with its log tail)."""


class Measurer(Protocol):
    async def start(self, candidate: Candidate) -> None: ...

    async def step(self, candidate: Candidate, rate: float, seconds: float,
                   *, warmup: bool = False) -> StepResult: ...

    async def stop(self, candidate: Candidate) -> None: ...


def rates(load: LoadSettings, start: float | None = None) -> list[float]:
    """The rate grid ``startRate · rateFactor^k`` up to ``maxRate``, from ``start`` on."""
    out = []
    r = load.startRate
    while r <= load.maxRate * (1 + 1e-9):
        out.append(round(r, 3))
        r *= load.rateFactor
    grid = out or [load.maxRate]
    if start is None:
        return grid
    return [x for x in grid if x >= start * (1 - 1e-9)] or grid[-1:]


def judge(step: StepResult, slo_p99_ms: float) -> StepResult:
    """The step with ``held`` / ``limitedBy`` set."""
    limited: str | None = None
    sending = step.requests / step.achievedRate if step.achievedRate > 0 else 0.0
    if step.seconds > 0 and sending * GENERATOR_TOLERANCE > step.seconds:
        limited = "generator"
    elif step.errors > MAX_ERROR_RATE * max(step.requests, 1):
        limited = "errors"
    elif step.p99.value > slo_p99_ms:
        limited = "slo"
    return step.model_copy(update={"held": limited is None, "limitedBy": limited})


def rank_key(r: CandidateResult) -> tuple[int, int, float, float]:
    if r.state == "Failed":
        return (3, 0, 0.0, 0.0)
    if r.maxThroughput <= 0:
        return (2, -r.rounds, 0.0, 0.0)
    cost = r.costPerMillion if r.costPerMillion is not None else math.inf
    return (0 if r.state == "Measured" else 1, -r.rounds, cost, -r.maxThroughput)


def rank(results: list[CandidateResult]) -> list[CandidateResult]:
    return sorted(results, key=rank_key)


def autoscaling_target(result: CandidateResult, headroom: float) -> float:
    """InvocationsPerReplica target per minute: max throughput per replica x headroom x 60."""
    return round(result.maxThroughput / result.candidate.replicas * headroom * 60.0, 1)


def reason(best: CandidateResult | None, ranked: list[CandidateResult], slo: float) -> str:
    if best is None:
        failed = sum(r.state == "Failed" for r in ranked)
        return (f"No candidate held p99 <= {slo:g} ms with errors <= 0.1% at any rate tried "
                f"({failed} of {len(ranked)} failed to start or answer); raise "
                "load.sloP99Ms, lower load.startRate or try larger resources")
    cost = (f"{best.costPerMillion:.4f} per 1M inferences ({best.costPerHour:.3f}/h as "
            f"{best.candidate.replicas} x {best.instanceType})"
            if best.costPerMillion is not None else "no price (no instance type fits)")
    others = [r for r in ranked if r is not best and r.maxThroughput > 0]
    versus = ""
    if others:
        nxt = others[0]
        nxt_cost = (f"{nxt.costPerMillion:.4f}" if nxt.costPerMillion is not None
                    else "unpriced")
        versus = (f"; next best {nxt.name}: {nxt.maxThroughput:.0f} req/s at {nxt_cost} "
                  "per 1M")
    p99 = best.atMax.p99.value if best.atMax else float("nan")
    top = best.steps[-1].held if best.steps else False
    if top:
        versus += (" (the highest rate tried held: raise load.maxRate to find its limit)")
    return (f"{best.name} has the lowest cost per inference of the candidates measured "
            f"longest: {cost}, holding p99 {p99:.2f} ms <= {slo:g} ms up to "
            f"{best.maxThroughput:.0f} req/s{versus}")


@dataclass
class Search:
    request: RecommendRequest
    measurer: Measurer
    clock: Callable[[], float] = time.monotonic
    progress: Callable[[str], None] = lambda _msg: None
    results: dict[str, CandidateResult] = field(default_factory=dict)

    async def _round(self, cand: Candidate, seconds: float, start_rate: float | None) -> None:
        load = self.request.load
        res = self.results[cand.name]
        try:
            await self.measurer.start(cand)
        except CandidateFailed as e:
            self.results[cand.name] = res.model_copy(update={"state": "Failed",
                                                             "error": str(e)})
            self.progress(f"{cand.name}: failed: {str(e).splitlines()[0]}")
            return
        try:
            if load.warmupSeconds > 0:
                await self.measurer.step(cand, start_rate or load.startRate,
                                         load.warmupSeconds, warmup=True)
            steps: list[StepResult] = []
            best: StepResult | None = None
            for rate in rates(load, start_rate):
                step = judge(await self.measurer.step(cand, rate, seconds), load.sloP99Ms)
                steps.append(step)
                self.progress(f"{cand.name}: {rate:.0f} req/s p99 {step.p99.value:.2f} ms "
                              f"errors {step.errors} -> "
                              f"{'held' if step.held else step.limitedBy}")
                if not step.held:
                    break
                best = step
        finally:
            await self.measurer.stop(cand)
        max_rps = best.targetRate if best else 0.0
        itype, per_hour = pricing.cost_per_hour(cand, self.request.instanceTypes)
        self.results[cand.name] = res.model_copy(update={
            "rounds": res.rounds + 1, "steps": steps, "maxThroughput": max_rps, "atMax": best,
            "instanceType": itype, "costPerHour": per_hour,
            "costPerMillion": pricing.cost_per_million(cand, self.request.instanceTypes,
                                                       max_rps)})

    async def run(self) -> RecommendReport:
        load = self.request.load
        t0 = self.clock()
        deadline = t0 + load.maxMinutes * 60.0
        cands = {c.name: c for c in self.request.candidates}
        for c in cands.values():
            self.results[c.name] = CandidateResult(name=c.name, candidate=c, state="Screened")
        if load.search == "exhaustive":
            alive = list(cands)
            for name in alive:
                await self._round(cands[name], load.stepSeconds * MAX_STEP_MULTIPLIER, None)
        else:
            alive = list(cands)
            round_no = 0
            while alive:
                seconds = load.stepSeconds * min(2 ** round_no, MAX_STEP_MULTIPLIER)
                self.progress(f"round {round_no + 1}: {len(alive)} candidate(s), "
                              f"{seconds:g} s steps")
                for name in alive:
                    prev = self.results[name].maxThroughput
                    start = prev / load.rateFactor ** 2 if round_no and prev > 0 else None
                    await self._round(cands[name], seconds, start)
                ranked = rank([self.results[n] for n in alive])
                live = [r.name for r in ranked if r.state != "Failed" and r.maxThroughput > 0]
                if len(live) <= 1 or self.clock() > deadline:
                    alive = live
                    break
                alive = live[:math.ceil(len(live) / 2)]
                round_no += 1
        for name in alive:
            r = self.results[name]
            if r.state != "Failed":
                self.results[name] = r.model_copy(update={"state": "Measured"})
        ranked = rank(list(self.results.values()))
        best = ranked[0] if ranked and ranked[0].maxThroughput > 0 else None
        return RecommendReport(
            sloP99Ms=load.sloP99Ms, search=load.search, seconds=round(self.clock() - t0, 2),
            ranking=[r.name for r in ranked], recommended=best.name if best else None,
            reason=reason(best, ranked, load.sloP99Ms),
            autoscalingTarget=autoscaling_target(best, load.headroom) if best else None,
            results=ranked)
