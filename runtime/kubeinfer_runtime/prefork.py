"""A fork server for fast cold starts: ``python -m kubeinfer_runtime.prefork SOCKET``.

Most of a model server's start is Python importing FastAPI, NumPy, onnxruntime
and uvicorn (about 1.5 s of a 2 s cold start on a small machine, see
docs/benchmarks.md). Local mode's supervisor starts this process once, while
nothing waits: it imports all of that, then listens on a Unix socket. For each
request (one JSON line: ``{"argv": [...], "env": {...}, "log_path": "...",
"parent": <supervisor pid>}``) it forks a child that already has everything
imported and runs ``kubeinfer_runtime.__main__.main(argv)`` with ``env`` as
its environment, and answers ``{"pid": N}``.

The child is double-forked so that it is re-parented to the supervisor (which
marks itself a child subreaper): the supervisor then waits on it and signals
its process group like any child it spawned itself. Like those, the child
gets its own session and asks the kernel for SIGTERM when the supervisor dies.

The server is single-threaded on purpose: forking a process that runs other
threads is unsafe, and requests are rare (one per replica start).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import signal
import socket
import sys
import time
from typing import Any

_PR_SET_PDEATHSIG = 1


def _preload() -> None:
    """Import what a model server imports, without starting anything."""
    import fastapi  # noqa: F401
    import numpy  # noqa: F401
    import onnxruntime  # noqa: F401
    import uvicorn  # noqa: F401
    import uvloop  # noqa: F401

    import kubeinfer_runtime.__main__
    import kubeinfer_runtime.server.api  # built on first use: forked servers find it here
    import kubeinfer_runtime.server.app
    import kubeinfer_runtime.server.preload  # noqa: F401


def _libc() -> ctypes.CDLL | None:
    # glibc's soname first: find_library runs ``ldconfig -p`` (a process start).
    with contextlib.suppress(OSError):
        return ctypes.CDLL("libc.so.6", use_errno=True)
    name = ctypes.util.find_library("c")
    if name:
        with contextlib.suppress(OSError):
            return ctypes.CDLL(name, use_errno=True)
    return None


def _become_child(request: dict[str, Any], listener: socket.socket, intermediate: int) -> None:
    """In the grandchild: wait to be adopted, then turn into the requested server."""
    os.setsid()  # its own session and process group: stopped by signalling the group
    parent = int(request["parent"])
    deadline = time.monotonic() + 5.0
    while os.getppid() == intermediate and time.monotonic() < deadline:
        time.sleep(0.001)
    libc = _libc()
    if libc is not None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # the supervisor died meanwhile: nobody would stop us
        os._exit(1)
    listener.close()
    log = os.open(request["log_path"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    os.close(null)
    os.environ.clear()
    os.environ.update({str(k): str(v) for k, v in request["env"].items()})
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    from kubeinfer_runtime.__main__ import main

    code = 1
    try:
        code = main([str(a) for a in request["argv"]])
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _fork(request: dict[str, Any], listener: socket.socket) -> int:
    """Double-fork; returns the grandchild's pid (the server)."""
    read_end, write_end = os.pipe()
    first = os.fork()
    if first == 0:  # intermediate: fork the server, leave
        os.close(read_end)
        me = os.getpid()
        second = os.fork()
        if second == 0:
            os.close(write_end)
            _become_child(request, listener, me)
        os.write(write_end, str(second).encode())
        os._exit(0)
    os.close(write_end)
    data = b""
    while chunk := os.read(read_end, 64):
        data += chunk
    os.close(read_end)
    os.waitpid(first, 0)
    return int(data)


def serve(path: str) -> None:
    _preload()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)
    print(f"prefork: ready on {path}", flush=True)
    while True:
        conn, _ = listener.accept()
        with conn, conn.makefile("rwb") as stream:
            try:
                request = json.loads(stream.readline())
                answer: dict[str, Any] = {"pid": _fork(request, listener)}
            except (ValueError, KeyError, TypeError, OSError) as exc:
                answer = {"error": f"{type(exc).__name__}: {exc}"}
            stream.write(json.dumps(answer).encode() + b"\n")
            stream.flush()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m kubeinfer_runtime.prefork SOCKET_PATH", file=sys.stderr)
        return 2
    serve(args[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
