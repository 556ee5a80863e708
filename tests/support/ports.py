"""Free loopback ports and readiness polling."""

from __future__ import annotations

import collections
import socket
import subprocess
import time
from collections.abc import Callable

import httpx

#: Ports this process handed out lately. The kernel may give a port again as soon as the
#: probe socket that found it is closed, before whoever asked for it has bound it: two
#: servers of one test were given the same port that way (SeaweedFS's volume and filer).
_handed_out: collections.deque[int] = collections.deque(maxlen=512)


def free_port() -> int:
    """A loopback port free now and not handed out lately by this process. Another
    process's ``bind(0)`` may still take it before it is bound: ``reserve_port`` holds one
    for a child until it listens."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _handed_out:
            _handed_out.append(port)
            return port


def reserve_port() -> socket.socket:
    """A loopback port held for a child to listen on (``getsockname()[1]``): bound with
    SO_REUSEADDR and never listening, so that no other ``bind(0)`` (another xdist worker's
    ``free_port``, any process) nor outgoing connection is given it, while the child's own
    bind (uvicorn, redis-server: SO_REUSEADDR) and listen succeed. Close it once the child
    answers (as ``kubeinfer_runtime.edge.agent_install.reserve_port`` does for the agent)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    _handed_out.append(int(s.getsockname()[1]))
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
