"""Start real runtime processes (uvicorn via ``kubeinfer-runtime``) for integration tests."""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.support.orphans import then_die_with_parent
from tests.support.ports import http_ok, reserve_port, stop_process, wait_until


@dataclass
class RuntimeProcess:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        stop_process(self.proc)


def start_runtime(role: str, env: dict[str, str], log_dir: Path, *,
                  ready_path: str = "/ping", expect_ready: bool = True,
                  timeout: float = 30.0, open_files: int | None = None,
                  port: int | None = None) -> RuntimeProcess:
    """Run ``python -m kubeinfer_runtime serve --role ROLE`` on a free port (or ``port``).

    ``env`` holds the role's ``KUBEINFER_*`` settings. When ``expect_ready`` is
    False only liveness (the port answering at all) is awaited, for tests of
    servers that must report not-ready. ``open_files`` sets the process's
    RLIMIT_NOFILE (soft and hard), as a container's ulimit would. ``port`` restarts a
    server at the address its clients already know (its log is appended to, so the earlier
    run's output stays readable).
    """
    restart = port is not None
    reservation: socket.socket | None = None
    if port is None:
        # Held until the server answers: picked and released, a port could be given to
        # another process (the other xdist worker's servers) before this one had bound it.
        reservation = reserve_port()
        port = int(reservation.getsockname()[1])
    try:
        return _start(role, env, log_dir, port, restart, ready_path=ready_path,
                      expect_ready=expect_ready, timeout=timeout, open_files=open_files)
    finally:
        if reservation is not None:
            reservation.close()


def _start(role: str, env: dict[str, str], log_dir: Path, port: int, restart: bool, *,
           ready_path: str, expect_ready: bool, timeout: float,
           open_files: int | None) -> RuntimeProcess:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{role}-{port}.log"
    full_env = {**os.environ, **env, "KUBEINFER_HOST": "127.0.0.1", "KUBEINFER_PORT": str(port)}
    with open(log_path, "ab" if restart else "wb") as log:
        def limit() -> None:
            if open_files is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))

        proc = subprocess.Popen(
            [sys.executable, "-m", "kubeinfer_runtime", "serve", "--role", role],
            env=full_env, stdout=log, stderr=subprocess.STDOUT,
            preexec_fn=then_die_with_parent(limit if open_files is not None else None),
        )
    rp = RuntimeProcess(proc, port, log_path)

    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"{role} exited with {proc.returncode}:\n{rp.log()}")
        if expect_ready:
            return http_ok(rp.url + ready_path)
        return http_ok(rp.url + "/v2/health/live")

    try:
        wait_until(up, timeout, f"{role} on port {port}")
    except BaseException:
        rp.stop()
        raise
    return rp
