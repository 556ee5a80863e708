"""Local mode's fork-server client: adopted children and the fallback to spawn."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kubeinfer_operator.local.prefork import Adopted, ForkServer


def test_adopted_waits_like_popen() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"])
    adopted = Adopted(proc.pid)  # our child: waitpid works on it
    assert adopted.wait(timeout=20) == 3
    assert adopted.poll() == 3 and adopted.returncode == 3


def test_adopted_wait_times_out() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    adopted = Adopted(proc.pid)
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            adopted.wait(timeout=0.1)
        assert adopted.poll() is None
    finally:
        proc.kill()
        assert adopted.wait(timeout=20) == -9


def test_launch_falls_back_to_spawn_when_not_started(tmp_path: Path) -> None:
    server = ForkServer(tmp_path / "prefork.sock", tmp_path / "prefork.log")
    assert not server.ready
    proc = server.launch([sys.executable, "-c", "print('spawned')"], env={},
                         log_path=tmp_path / "logs" / "child.log")
    assert isinstance(proc, subprocess.Popen)
    assert proc.wait(timeout=20) == 0
    assert (tmp_path / "logs" / "child.log").read_text().strip() == "spawned"


def test_long_socket_paths_move_to_tmp(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 120) / "prefork.sock"
    server = ForkServer(deep, tmp_path / "prefork.log")
    assert len(str(server.socket_path)) < 108
    assert server.socket_path.name.startswith("kubeinfer-prefork-")
