"""The status mechanics both batch kinds (TransformJob, CompilationJob) share: PURE.

Both kinds end in the same two conditions (Complete, Failed) and build each new
status from the old one, so that what was learnt (times, counters, the report)
stays and conditions keep their transition times. Each kind's ``*_status`` module
decides its own phases, reasons and fields on top of this.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, Generic, Protocol, TypeVar

from kubeinfer_operator.reconcile.status import merge_conditions

#: The conditions (and phases) every batch kind ends in; its ``*_status`` re-exports them.
COMPLETE = "Complete"
FAILED = "Failed"


class JobInfoBase(Protocol):
    """What the builder needs of a kind's ``JobInfo``."""

    @property
    def generation(self) -> int: ...

    @property
    def status(self) -> Mapping[str, Any]: ...

    @property
    def model(self) -> str: ...


InfoT = TypeVar("InfoT", bound=JobInfoBase)


def _true(status: Mapping[str, Any], type_: str) -> bool:
    return any(c.get("type") == type_ and c.get("status") == "True"
               for c in status.get("conditions") or [] if isinstance(c, Mapping))


def is_terminal(status: Mapping[str, Any] | None) -> bool:
    return bool(status) and (_true(status or {}, COMPLETE) or _true(status or {}, FAILED))


class StatusBuilder(Generic[InfoT]):
    """The new status, built from the old one (what was learnt stays)."""

    def __init__(self, info: InfoT, now: datetime) -> None:
        self.info = info
        self.now = now
        old = dict(info.status or {})
        self.old_conditions = list(old.pop("conditions", None) or [])
        self.status: dict[str, Any] = old
        self.status["observedGeneration"] = info.generation
        if info.model:
            self.status["model"] = info.model

    def finish(self, conditions: list[dict[str, Any]], phase: str) -> dict[str, Any]:
        self.status["phase"] = phase
        self.status["conditions"] = merge_conditions(self.old_conditions, conditions, self.now)
        return self.status
