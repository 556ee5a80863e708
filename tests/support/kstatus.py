"""kstatus's verdict on a custom resource, as sigs.k8s.io/cli-utils computes it.

Flux, kpt and ``cli-utils`` decide whether an applied object is done with
kstatus. For a kind it has no built-in rules for (every CRD), ``status.Compute``
runs only its generic checks, in this order:

1. ``metadata.deletionTimestamp`` set → Terminating;
2. ``status.observedGeneration`` present and different from
   ``metadata.generation`` → InProgress (LatestGenerationNotObserved);
3. a condition ``Reconciling`` with status True → InProgress;
4. a condition ``Stalled`` with status True → Failed;
5. otherwise → Current ("Resource is current").

Kept here, in the tests, so the operator's status is checked against those
rules rather than against our own reading of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

IN_PROGRESS = "InProgress"
FAILED = "Failed"
CURRENT = "Current"
TERMINATING = "Terminating"


@dataclass(frozen=True)
class Result:
    status: str
    message: str


def compute(obj: Mapping[str, Any]) -> Result:
    metadata = obj.get("metadata") or {}
    status = obj.get("status") or {}
    if metadata.get("deletionTimestamp"):
        return Result(TERMINATING, "Resource scheduled for deletion")
    generation = metadata.get("generation")
    observed = status.get("observedGeneration")
    if generation is not None and observed is not None and observed != generation:
        return Result(IN_PROGRESS, f"{obj.get('kind')} generation is {generation}, but latest "
                                   f"observed generation is {observed}")
    for c in status.get("conditions") or []:
        if c.get("type") == "Reconciling" and c.get("status") == "True":
            return Result(IN_PROGRESS, str(c.get("message", "")))
        if c.get("type") == "Stalled" and c.get("status") == "True":
            return Result(FAILED, str(c.get("message", "")))
    return Result(CURRENT, "Resource is current")
