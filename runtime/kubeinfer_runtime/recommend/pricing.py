"""Instance type and cost of a candidate: PURE.

A candidate's replica is priced as the instance type it names, else the
cheapest type whose CPUs and memory hold one replica's requests (limits when no
request is set). A candidate with no CPU size at all is priced as the cheapest
type with at least its intra-op threads x workers CPUs. Replicas multiply the
price: one instance per replica, as SageMaker prices instance counts.
"""

from __future__ import annotations

from collections.abc import Sequence

from kubeinfer_runtime.contract.recommend import Candidate, InstanceType, per_million, quantity


def instance_for(candidate: Candidate, types: Sequence[InstanceType]) -> InstanceType | None:
    if candidate.instanceType is not None:
        return next((t for t in types if t.name == candidate.instanceType), None)
    cpu = candidate.resources.cpu() or float(candidate.threads * candidate.workers)
    memory = candidate.resources.memory() or 0.0
    fitting = [t for t in types if t.cpu >= cpu and quantity(t.memory) >= memory]
    return min(fitting, key=lambda t: (t.pricePerHour, t.cpu), default=None)


def cost_per_hour(candidate: Candidate, types: Sequence[InstanceType]) -> tuple[str | None,
                                                                              float | None]:
    itype = instance_for(candidate, types)
    if itype is None:
        return None, None
    return itype.name, itype.pricePerHour * candidate.replicas


def cost_per_million(candidate: Candidate, types: Sequence[InstanceType],
                     rps: float) -> float | None:
    return per_million(cost_per_hour(candidate, types)[1], rps)
