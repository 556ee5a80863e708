"""The supervision of local mode's private redis-server, without starting one.

Its exit is collected, reported and scheduled for a restart with the crash
backoff; the endpoint is not Ready while it is down. The restart itself (a
real redis-server SIGKILLed with 100 requests queued) is in
tests/integration/test_async_local.py.
"""

from __future__ import annotations

from pathlib import Path

from kubeinfer_operator.local.backoff import BackoffPolicy
from kubeinfer_operator.local.private_redis import PrivateRedis
from kubeinfer_operator.local.state import Phase, ProcessState, ProcState, VariantState
from kubeinfer_operator.local.view import summarize


class DeadProc:
    """A Popen stand-in that exited with ``code``."""

    def __init__(self, pid: int, code: int) -> None:
        self.pid = pid
        self.code = code

    def poll(self) -> int:
        return self.code


def server(tmp_path: Path) -> PrivateRedis:
    s = PrivateRedis("redis-server", tmp_path / "redis", tmp_path / "redis.log", 6390, env={},
                     policy=BackoffPolicy(initial_s=0.5, cap_s=10.0, reset_after_s=30.0))
    s.state = ProcState.READY
    return s


def test_a_killed_redis_is_reported_and_restarted_after_backoff(tmp_path: Path) -> None:
    s = server(tmp_path)
    s.started_at = 100.0
    s.proc = DeadProc(4242, -9)  # type: ignore[assignment]
    report = s.collect_exit(101.0)
    assert report is not None
    assert "Private redis-server (pid 4242) exited (killed by SIGKILL)" in report
    assert "restarting it in 0.5s on port 6390" in report
    assert s.state is ProcState.BACKOFF and "restarting in 0.5s" in s.reason
    assert s.collect_exit(101.1) is None  # reported once
    snap = s.snapshot()
    assert snap.role == "redis" and snap.pid is None and snap.state is ProcState.BACKOFF
    assert snap.last_exit == -9 and snap.port == 6390


def test_a_redis_that_keeps_dying_backs_off_longer(tmp_path: Path) -> None:
    s = server(tmp_path)
    delays = []
    now = 100.0
    for _ in range(5):
        s.state = ProcState.READY
        s.started_at = now
        s.proc = DeadProc(1, 1)  # type: ignore[assignment]
        s.collect_exit(now + 1)
        assert s.crash.restart_at is not None
        delays.append(round(s.crash.restart_at - (now + 1), 2))
        now += 2
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0]
    # Up for longer than reset_after_s: a new streak.
    s.state, s.started_at = ProcState.READY, now
    s.proc = DeadProc(1, 1)  # type: ignore[assignment]
    s.collect_exit(now + 60)
    assert s.crash.streak == 1


def test_the_endpoint_is_not_ready_while_its_redis_is_down() -> None:
    gateway = ProcessState(name="gateway", role="gateway", port=1, url="http://x",
                           state=ProcState.READY, log="/x")
    worker = ProcessState(name="main-0", role="async-worker", variant="main", port=2,
                          url="http://y", state=ProcState.READY, routed=True, log="/y")
    redis = ProcessState(name="redis", role="redis", port=3, url="redis://z",
                         state=ProcState.BACKOFF, reason="exited (killed by SIGKILL)", log="/z")
    variants = [VariantState(name="main", weight=1, replicas=1, ready=1)]
    down = summarize(gateway=gateway, variants=variants, processes=[gateway, worker, redis],
                     applying=False, started=True)
    assert down.phase is Phase.DEGRADED
    assert "redis: exited (killed by SIGKILL)" in down.message
    back = redis.model_copy(update={"state": ProcState.READY, "reason": ""})
    up = summarize(gateway=gateway, variants=variants, processes=[gateway, worker, back],
                   applying=False, started=True)
    assert up.phase is Phase.READY


def test_the_private_redis_asks_a_password_kept_in_its_data_dir(tmp_path: Path) -> None:
    """127.0.0.1 is every local user's: the server asks a password, made once per data
    directory (0600) so a restart keeps it, never on its command line."""
    s = server(tmp_path)
    password = (tmp_path / "redis" / "password").read_text().strip()
    assert len(password) == 64 and int(password, 16) >= 0
    assert (tmp_path / "redis" / "password").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "redis").stat().st_mode & 0o077 == 0
    assert s.url == f"redis://:{password}@127.0.0.1:6390/0"
    assert password not in " ".join(s.argv())
    assert s.argv()[1] == str(tmp_path / "redis" / "redis.conf")
    # What is shown never carries it.
    assert password not in s.shown_url and password not in s.snapshot().model_dump_json()
    # Another instance on the same data (a restarted supervisor) uses the same one.
    assert server(tmp_path).password == password


def test_a_damaged_password_file_is_replaced(tmp_path: Path) -> None:
    (tmp_path / "redis").mkdir()
    (tmp_path / "redis" / "password").write_text("short\n")
    s = server(tmp_path)
    assert len(s.password) == 64 and s.password != "short"
    assert (tmp_path / "redis" / "password").read_text().strip() == s.password
