"""Local mode's client of the runtime's fork server (``kubeinfer_runtime.prefork``).

A scaled or serverless endpoint starts model servers while requests wait, so
the supervisor keeps one fork server with the runtime already imported and
asks it for new model servers (about 1.5 s faster than a fresh Python on a
small machine). The fork server double-forks, and the supervisor is a child
subreaper (``prctl(PR_SET_CHILD_SUBREAPER)``), so the model server becomes the
supervisor's own child: ``Adopted`` waits on it like ``subprocess.Popen``
would, and stopping it signals its process group as usual.

Any failure (fork server not started yet, dead, or refusing) falls back to a
plain ``spawn``: slower, never wrong. ``KUBEINFER_LOCAL_PREFORK=0`` in the
environment of ``kubeinfer up`` switches the fork server off.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from kubeinfer_operator.local.process import load_libc, spawn, stop_popen

log = logging.getLogger("kubeinfer.local")

_PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Adopt orphaned descendants (Linux), so forked model servers are our children."""
    libc = load_libc()
    if libc is None:
        return False
    return bool(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)


class Adopted:
    """The ``subprocess.Popen`` surface local mode uses, for an adopted child pid."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                self.returncode = -1  # not ours (any more): gone
                return self.returncode
            if pid == self.pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired([str(self.pid)], timeout or 0.0)
            time.sleep(0.01)
        assert self.returncode is not None
        return self.returncode


class ForkServer:
    def __init__(self, socket_path: Path, log_path: Path) -> None:
        if len(str(socket_path)) > 100:  # AF_UNIX paths are limited to 108 bytes
            socket_path = Path(f"/tmp/kubeinfer-prefork-{os.getpid()}.sock")
        self.socket_path = socket_path
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.subreaper = False

    def start(self) -> None:
        """Start the fork server (returns at once; ``ready`` says when it serves)."""
        if self.proc is not None and self.proc.poll() is None:
            return
        if os.environ.get("KUBEINFER_LOCAL_PREFORK", "1") == "0":
            return  # switched off (e.g. to measure cold starts without it)
        self.subreaper = become_subreaper()
        if not self.subreaper:
            log.warning("Cannot become a child subreaper: model servers start without the "
                        "fork server (slower cold starts)")
            return
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        self.proc = spawn([sys.executable, "-m", "kubeinfer_runtime.prefork",
                           str(self.socket_path)], env=dict(os.environ),
                          log_path=self.log_path)

    @property
    def ready(self) -> bool:
        return (self.proc is not None and self.proc.poll() is None
                and self.socket_path.exists())

    def launch(self, argv: Sequence[str], *, env: Mapping[str, str],
               log_path: Path) -> subprocess.Popen[bytes] | Adopted:
        """A model server from the fork server, or a plain spawn when it cannot."""
        if self.ready:
            try:
                return Adopted(self._fork(list(argv), env, log_path))
            except (OSError, ValueError, KeyError) as exc:
                log.warning("Fork server failed (%s): starting %s the slow way", exc,
                            log_path.name)
        return spawn(argv, env=env, log_path=log_path)

    def _fork(self, argv: list[str], env: Mapping[str, str], log_path: Path) -> int:
        # argv is the full runtime command line; the fork server runs its
        # ``kubeinfer_runtime`` arguments in-process.
        args = argv[argv.index("kubeinfer_runtime") + 1:]
        log_path.parent.mkdir(parents=True, exist_ok=True)
        request = {"argv": args, "env": dict(env), "log_path": str(log_path),
                   "parent": os.getpid()}
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(5.0)
            conn.connect(str(self.socket_path))
            conn.sendall(json.dumps(request).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
        answer = json.loads(data)
        if "pid" not in answer:
            raise ValueError(answer.get("error", "no pid in the answer"))
        return int(answer["pid"])

    def stop(self) -> None:
        if self.proc is not None:
            stop_popen(self.proc, timeout=5.0)
            self.proc = None
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
