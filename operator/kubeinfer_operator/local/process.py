"""Start and stop local child processes so that none can outlive its parent.

Every child gets its own session (process group), so stopping it signals the
whole group (a uvicorn with several workers included) and a Ctrl-C in the
user's terminal reaches only the CLI, which then stops children in order.
Every child also asks the kernel (``prctl(PR_SET_PDEATHSIG)``, Linux) to send
it SIGTERM when its parent dies, so even a SIGKILLed supervisor leaves no
orphans. That signal fires when the *thread* that forked the child exits, so
children must be spawned from a thread that lives as long as the parent: the
supervisor spawns from its main (event loop) thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import select
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def load_libc() -> ctypes.CDLL | None:
    """The C library; glibc's soname first, because ``find_library`` runs ``ldconfig -p``
    (a process start, at every import of this module: every CLI command and runner)."""
    with contextlib.suppress(OSError):
        return ctypes.CDLL("libc.so.6", use_errno=True)
    name = ctypes.util.find_library("c")
    if name:
        with contextlib.suppress(OSError):
            return ctypes.CDLL(name, use_errno=True)
    return None


# Loaded once here: a preexec function should not import or load libraries.
_LIBC = load_libc()


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    def setup() -> None:
        if _LIBC is not None:
            _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        # The parent may have died between fork and prctl: then nobody would
        # ever signal us, so give up now.
        if os.getppid() != parent_pid:
            os._exit(1)

    return setup


def spawn(argv: Sequence[str], *, env: Mapping[str, str], log_path: Path,
          die_with_parent: bool = True, cwd: str | None = None,
          stdin_pipe: bool = False) -> subprocess.Popen[bytes]:
    """Start ``argv`` in a new session, stdout+stderr appended to ``log_path``; its stdin
    is a pipe from us with ``stdin_pipe`` (a start gate), else /dev/null."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            list(argv), env=dict(env),
            stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True, cwd=cwd,
            preexec_fn=_die_with_parent(os.getpid()) if die_with_parent else None,
        )


def wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Wait up to ``timeout`` for ``proc`` to exit; whether it has.

    ``Popen.wait(timeout)`` polls with sleeps growing to 50 ms, so a step's end
    was seen up to 50 ms late; a pidfd (Linux 5.3+) wakes us the moment it exits.
    """
    if proc.poll() is not None:
        return True
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)
        return proc.poll() is not None
    try:
        select.select([fd], [], [], max(0.0, timeout))
    finally:
        os.close(fd)
    return proc.poll() is not None


def signal_group(pid: int, sig: int) -> bool:
    """Send ``sig`` to the process group led by ``pid``; False when it is gone."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False
    return True


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def stop_popen(proc: subprocess.Popen[bytes], *, timeout: float = 10.0) -> int | None:
    """SIGTERM the child's group, wait, then SIGKILL what is left; the exit status."""
    if proc.poll() is None:
        signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
    # Workers of a multi-process server may still be exiting after the leader.
    deadline = time.monotonic() + 2.0
    while group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    if group_alive(proc.pid):
        signal_group(proc.pid, signal.SIGKILL)
    return proc.returncode


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def tail(path: Path, lines: int = 10, max_bytes: int = 16384) -> str:
    """The last ``lines`` lines of a log file ("" when missing)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            data = fh.read()
    except OSError:
        return ""
    text = data.decode(errors="replace")
    return "\n".join(text.splitlines()[-lines:])


def signal_exit_name(returncode: int | None) -> str:
    """``exit code 3`` or ``killed by SIGKILL`` for a Popen return code."""
    if returncode is None:
        return "still running"
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-returncode).name}"
        return f"killed by signal {-returncode}"
    return f"exit code {returncode}"
