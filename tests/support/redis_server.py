"""A real Redis server for tests: ``redis-server`` on a free port in a temp dir.

Nothing is persisted (``--save "" --appendonly no``) unless ``persistent``
(an append-only file fsynced on every write, so ``down`` + ``up`` — a SIGKILL
and a start on the same port — keeps every acknowledged write); the server is
ready in a few tens of milliseconds. scripts/setup installs redis-server (apt).
fakeredis is no substitute: blocking XREADGROUP returns at once there.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.support.orphans import die_with_parent
from tests.support.ports import reserve_port, stop_process


@dataclass
class RedisServer:
    proc: subprocess.Popen[bytes]
    port: int
    workdir: Path
    persistent: bool = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self):  # type: ignore[no-untyped-def]
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, decode_responses=True)

    def stop(self) -> None:
        stop_process(self.proc)

    def down(self) -> None:
        """An outage: SIGKILL (no goodbye, no final save)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def up(self, timeout: float = 10.0) -> None:
        """Start it again on the same port and directory (a persistent one reloads its data)."""
        if self.proc.poll() is None:
            raise RuntimeError("redis-server is still running: call down() first")
        self.proc = _launch(self.workdir, self.port, self.persistent)
        _wait_ready(self, timeout)


def _launch(workdir: Path, port: int, persistent: bool) -> subprocess.Popen[bytes]:
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("`redis-server` not found: run scripts/setup test (apt package "
                           "redis-server)")
    durability = ["--appendonly", "yes", "--appendfsync", "always"] if persistent else \
        ["--appendonly", "no"]
    return subprocess.Popen(
        [exe, "--bind", "127.0.0.1", "--port", str(port), "--save", "", *durability,
         "--dir", str(workdir), "--logfile", str(workdir / "redis.log")],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
    )


def start_redis(workdir: Path, timeout: float = 10.0, *, persistent: bool = False
                ) -> RedisServer:
    workdir.mkdir(parents=True, exist_ok=True)
    reservation = reserve_port()  # held until it answers (redis-server sets SO_REUSEADDR)
    port = int(reservation.getsockname()[1])
    try:
        server = RedisServer(_launch(workdir, port, persistent), port, workdir, persistent)
        _wait_ready(server, timeout)
    finally:
        reservation.close()
    return server


def _wait_ready(server: RedisServer, timeout: float) -> None:
    proc, port, workdir = server.proc, server.port, server.workdir
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log = workdir / "redis.log"
            raise RuntimeError("redis-server exited:\n" + (log.read_text() if log.exists() else ""))
        try:
            if server.client().ping():
                return
        except Exception:
            time.sleep(0.02)
    server.stop()
    raise TimeoutError(f"redis-server on port {port} did not become ready")
