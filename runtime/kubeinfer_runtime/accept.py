"""Accepting connections fairly under load: a uvicorn Server whose listener drains the backlog.

Measured on the 2-core dev VM with 1,000 clients hammering one process (wrk
-c1000): with uvloop's own listener the kernel's accept queue held ~470
connections that drained at ~50 a second, so a client arriving during the
burst waited seconds before its first byte was even read, and the slowest
requests took the whole burst (p99 4.2 s, max 6 s), with the bare ASGI app as
much as with ours. asyncio's listener accepts every pending connection each
time the socket is readable, and so does this one: it polls the listening
socket with ``loop.add_reader`` and accepts up to ``ACCEPT_BATCH`` per event,
handing each socket to ``loop.connect_accepted_socket`` with uvicorn's
protocol factory. Everything else (lifespan, protocol, graceful shutdown,
workers) stays uvicorn's.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import socket
import sys
from collections.abc import Callable
from typing import Any

import uvicorn

log = logging.getLogger("kubeinfer.http")

#: Connections accepted per readiness event at the most (then other work runs).
ACCEPT_BATCH = 512
#: Pause before accepting again when the process is out of file descriptors.
EMFILE_PAUSE_S = 0.1
#: uvicorn's exit status for a server that could not start (``uvicorn.server``).
STARTUP_FAILURE_EXIT = 3


class Listener:
    """One listening socket, drained on every readiness event (``close``/``wait_closed``
    as uvicorn expects of its servers)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                 factory: Callable[[], asyncio.Protocol], backlog: int) -> None:
        self.loop = loop
        self.sock = sock
        self.factory = factory
        self.closed = False
        self._warned_emfile = False
        sock.setblocking(False)
        sock.listen(backlog)
        loop.add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno == errno.ECONNABORTED:
                    continue
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    if not self._warned_emfile:
                        self._warned_emfile = True
                        log.error("Cannot accept connections: %s (raise the open-file limit, "
                                  "or lower KUBEINFER_HTTP_MAX_CONNECTIONS)", exc.strerror)
                    self.loop.remove_reader(self.sock.fileno())
                    self.loop.call_later(EMFILE_PAUSE_S, self._resume)
                    return
                raise
            conn.setblocking(False)
            if conn.family in (socket.AF_INET, socket.AF_INET6):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = self.loop.create_task(self._connect(conn))
            task.add_done_callback(_log_failure)

    async def _connect(self, conn: socket.socket) -> None:
        try:
            await self.loop.connect_accepted_socket(self.factory, conn)
        except OSError:
            conn.close()  # the client left before we got to it

    def _resume(self) -> None:
        if not self.closed:
            self.loop.add_reader(self.sock.fileno(), self._accept)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()

    async def wait_closed(self) -> None:
        return None


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("Accepting a connection failed", exc_info=task.exception())


class FairServer(uvicorn.Server):
    """``uvicorn.Server`` with ``Listener`` instead of the event loop's own server."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await self.lifespan.startup()
        if self.lifespan.should_exit:
            sys.exit(STARTUP_FAILURE_EXIT)
        config = self.config
        protocol_class: Any = config.http_protocol_class
        factory = functools.partial(protocol_class, config=config,
                                    server_state=self.server_state,
                                    app_state=self.lifespan.state)
        loop = asyncio.get_running_loop()
        if sockets is None:
            try:
                sockets = [config.bind_socket()]
            except (OSError, SystemExit) as exc:
                log.error("Cannot listen on %s:%s: %s", config.host, config.port, exc)
                await self.lifespan.shutdown()
                sys.exit(STARTUP_FAILURE_EXIT)
        listeners: list[Any] = [Listener(loop, sock, factory, config.backlog)
                                for sock in sockets]
        self.servers = listeners
        self.started = True


def run(config: uvicorn.Config) -> None:
    """``uvicorn.run`` for a ready ``Config``: one process serves through ``FairServer``.

    Several workers (``KUBEINFER_WORKERS`` > 1) keep uvicorn's own supervisor and
    listener: it builds its ``Server`` in each child itself. One worker per pod,
    scaled with replicas, is the default and the recommended setup.
    """
    if config.workers > 1:
        from uvicorn.supervisors import Multiprocess

        Multiprocess(config, sockets=[config.bind_socket()]).run()
        return
    FairServer(config=config).run()
