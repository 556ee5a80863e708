"""PURE restart policy for crashed local processes: exponential backoff with a cap.

A child that crashes right after starting (a typo in an env var, a port taken)
would otherwise be restarted in a tight loop and flood its log. Each crash in a
streak doubles the wait, up to ``cap_s``; a child that stayed up for
``reset_after_s`` starts a new streak, so a server that crashes once a day is
restarted at once. No clock is read here: callers pass times in.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BackoffPolicy:
    initial_s: float = 0.5
    factor: float = 2.0
    cap_s: float = 10.0
    #: Uptime after which a crash no longer counts as part of the previous streak.
    reset_after_s: float = 30.0

    def delay(self, streak: int) -> float:
        """Wait before restart number ``streak`` of a crash streak (1 = first crash)."""
        if streak <= 0:
            return 0.0
        return float(min(self.cap_s, self.initial_s * self.factor ** (streak - 1)))


@dataclass(frozen=True)
class CrashRecord:
    """What the policy remembers about one child between crashes."""

    streak: int = 0
    restart_at: float | None = None


def on_crash(policy: BackoffPolicy, record: CrashRecord, *, started_at: float,
             now: float) -> CrashRecord:
    """The record after a crash at ``now`` of a child started at ``started_at``."""
    uptime = now - started_at
    streak = 1 if uptime >= policy.reset_after_s else record.streak + 1
    return CrashRecord(streak=streak, restart_at=now + policy.delay(streak))


def restart_due(record: CrashRecord, now: float) -> bool:
    return record.restart_at is not None and now >= record.restart_at
