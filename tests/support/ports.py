"""Free loopback ports and readiness polling."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable

import httpx


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def reserve_port() -> socket.socket:
    """A loopback port held for a process started later: bound with SO_REUSEADDR, never
    listening. ``free_port`` forgets its port at once, so a later ``bind(0)`` (another
    server of the test, a model server an agent starts) may be given it before its
    process binds it; while this socket is open the kernel gives the port to no other
    ``bind(0)``, yet a server's own bind (uvicorn and asyncio set SO_REUSEADDR) and
    listen succeed. Close it when the test is done with the port."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    return s


def wait_until(predicate: Callable[[], bool], timeout: float, what: str,
               interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def http_ok(url: str, expect: int = 200) -> bool:
    try:
        return httpx.get(url, timeout=1.0).status_code == expect
    except httpx.HTTPError:
        return False


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``: how every test server is stopped."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
