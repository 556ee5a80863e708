"""Children of local mode never outlive their parent, even a SIGKILLed one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kubeinfer_operator.local.process import (
    load_libc,
    signal_exit_name,
    spawn,
    stop_popen,
    tail,
    wait_exit,
)
from kubeinfer_operator.local.state import process_alive


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process_alive(pid, None):
            return True
        time.sleep(0.02)
    return False


def test_child_dies_when_its_parent_is_sigkilled(tmp_path: Path) -> None:
    # A parent process spawns `sleep` like the supervisor spawns servers, prints
    # its pid, and is then SIGKILLed: the kernel must take the child down too.
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from kubeinfer_operator.local.process import spawn
        p = spawn(["sleep", "60"], env={{"PATH": "/usr/bin:/bin"}},
                  log_path=Path({str(tmp_path / 'child.log')!r}))
        print(p.pid, flush=True)
        time.sleep(60)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    try:
        assert parent.stdout is not None
        child_pid = int(parent.stdout.readline())
        assert process_alive(child_pid, None)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert wait_gone(child_pid), "child outlived its SIGKILLed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def test_stop_popen_stops_the_whole_group_and_logs_are_tailed(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    # The leader starts a grandchild in its group and ignores SIGTERM: stop_popen
    # must escalate to SIGKILL and leave nothing of the group behind.
    proc = spawn(["sh", "-c", "trap '' TERM; sleep 60 & echo started; echo $!; wait"],
                 env={"PATH": "/usr/bin:/bin"}, log_path=log)
    deadline = time.monotonic() + 5
    while len(log.read_text().splitlines()) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    grandchild = int(log.read_text().splitlines()[1])
    code = stop_popen(proc, timeout=0.5)
    assert code == -signal.SIGKILL
    assert wait_gone(grandchild, timeout=5)
    assert tail(log, lines=2).splitlines()[0] == "started"
    assert tail(tmp_path / "missing.log") == ""
    assert os.getpgid(os.getpid()) != proc.pid  # it really ran in its own group


def test_exit_names() -> None:
    assert signal_exit_name(3) == "exit code 3"
    assert signal_exit_name(-9) == "killed by SIGKILL"
    assert signal_exit_name(None) == "still running"


def test_wait_exit_returns_when_the_child_exits_not_at_the_timeout(tmp_path: Path) -> None:
    proc = spawn([sys.executable, "-c", "import sys; sys.stdin.readline()"], env=os.environ,
                 log_path=tmp_path / "child.log", stdin_pipe=True)
    try:
        assert not wait_exit(proc, 0.05)  # still waiting on its stdin
        assert proc.stdin is not None
        proc.stdin.close()  # EOF: it exits now
        started = time.monotonic()
        assert wait_exit(proc, 30.0)
        assert time.monotonic() - started < 10.0
        assert proc.returncode == 0
        assert wait_exit(proc, 0.0)  # an exited child answers at once
    finally:
        stop_popen(proc)


def test_libc_loads_without_running_ldconfig(monkeypatch: pytest.MonkeyPatch) -> None:
    import ctypes.util

    def no_ldconfig(name: str) -> str | None:
        raise AssertionError("find_library runs ldconfig -p: glibc's soname comes first")

    monkeypatch.setattr(ctypes.util, "find_library", no_ldconfig)
    libc = load_libc()
    assert libc is not None and libc.getpid() == os.getpid()
