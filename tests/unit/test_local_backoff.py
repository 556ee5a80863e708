"""Restart backoff of crashed local processes (pure, explicit clock)."""

from __future__ import annotations

from kubeinfer_operator.local.backoff import BackoffPolicy, CrashRecord, on_crash, restart_due


def test_delay_doubles_then_caps() -> None:
    policy = BackoffPolicy(initial_s=0.5, factor=2, cap_s=10)
    assert [policy.delay(n) for n in range(0, 8)] == [0, 0.5, 1, 2, 4, 8, 10, 10]


def test_quick_crashes_grow_a_streak() -> None:
    policy = BackoffPolicy(initial_s=1, reset_after_s=30)
    rec = CrashRecord()
    rec = on_crash(policy, rec, started_at=100, now=101)
    assert (rec.streak, rec.restart_at) == (1, 102)
    rec = on_crash(policy, rec, started_at=102, now=103)
    assert (rec.streak, rec.restart_at) == (2, 105)


def test_long_uptime_starts_a_new_streak() -> None:
    policy = BackoffPolicy(initial_s=1, reset_after_s=30)
    rec = CrashRecord(streak=5, restart_at=None)
    rec = on_crash(policy, rec, started_at=0, now=31)
    assert (rec.streak, rec.restart_at) == (1, 32)


def test_restart_due_only_after_the_delay() -> None:
    rec = CrashRecord(streak=1, restart_at=10.0)
    assert not restart_due(rec, 9.99)
    assert restart_due(rec, 10.0)
    assert not restart_due(CrashRecord(), 1e9)
