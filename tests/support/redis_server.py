"""A real Redis server for tests: ``redis-server`` on a free port in a temp dir.

Nothing is persisted (``--save "" --appendonly no``); the server is ready in a
few tens of milliseconds. scripts/setup installs redis-server (apt). fakeredis
is no substitute: blocking XREADGROUP returns at once there.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.support.ports import free_port, stop_process


@dataclass
class RedisServer:
    proc: subprocess.Popen[bytes]
    port: int
    workdir: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self):  # type: ignore[no-untyped-def]
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, decode_responses=True)

    def stop(self) -> None:
        stop_process(self.proc)


def start_redis(workdir: Path, timeout: float = 10.0) -> RedisServer:
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("`redis-server` not found: run scripts/setup test (apt package "
                           "redis-server)")
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = subprocess.Popen(
        [exe, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
         "--dir", str(workdir), "--logfile", str(workdir / "redis.log")],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )
    server = RedisServer(proc, port, workdir)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log = workdir / "redis.log"
            raise RuntimeError("redis-server exited:\n" + (log.read_text() if log.exists() else ""))
        try:
            if server.client().ping():
                return server
        except Exception:
            time.sleep(0.02)
    server.stop()
    raise TimeoutError(f"redis-server on port {port} did not become ready")
