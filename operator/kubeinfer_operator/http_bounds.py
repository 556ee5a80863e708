"""Bounds on the operator's own HTTP: its listeners' connections and the answers it reads.

DESIGN.md: every connection has a bound in count and time, and every answer read
into memory a bound in size. Two places need them:

- The listeners: the scaler's ``/scale`` (the chart's NetworkPolicy admits
  gateway pods of every namespace, and any of them may be an endpoint author's
  code) and the operator's ``/metrics``. aiohttp closes a connection that
  sends nothing or half a head only at its keep-alive timeout (an hour by
  default; never, in older releases), waits for a half-sent body as long as
  the client likes, and has no cap on open connections, so a few hundred
  idle sockets would use up the operator's file descriptors.
  :class:`BoundedListener` serves an aiohttp app with each connection closed
  ``CONNECTION_LIFETIME_S`` after it opened, whatever it is doing (one sweep
  per listener checks them about every second; a scale request or a scrape
  takes milliseconds, the client reconnects for its next one, and gateways
  repeat a scale request every second while they hold requests) and, past
  ``MAX_CONNECTIONS`` open ones (a quarter of the open-file limit when that is
  lower), a new connection answered 503 and closed.
- The answers: gateway pods' ``/metrics`` and Prometheus query results (the
  Prometheus URL is the Endpoint author's). :class:`AnswerLimit` refuses an
  answer that says (Content-Length) or turns out to be bigger than its limit,
  reading at most one byte past it, so the caller treats it like a failed
  scrape; it warns once per source, without quoting the answer.

A leaf module (aiohttp only): the scaler, the metrics server and local mode
all use it.
"""

from __future__ import annotations

import asyncio
import logging
import resource

import aiohttp
from aiohttp import web

log = logging.getLogger(__name__)

#: Open connections a listener keeps (fewer under a low open-file limit: see
#: :func:`default_max_connections`); a new one past it gets 503 and is closed.
MAX_CONNECTIONS = 256
#: Seconds a connection to a listener lives, whatever it is doing (idle, half sent).
CONNECTION_LIFETIME_S = 10.0
#: Largest gateway ``/metrics`` answer the operator reads (a gateway's is a few KiB).
MAX_METRICS_BYTES = 4 << 20
#: Largest Prometheus query answer the operator reads (it needs one sample).
MAX_QUERY_BYTES = 1 << 20
#: Sources remembered as already warned about (then forgotten all at once).
_MAX_WARNED = 1024

_BUSY_BODY = b'{"message": "The operator has too many open connections: retry"}'
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
         b"Content-Length: " + str(len(_BUSY_BODY)).encode() + b"\r\nRetry-After: 1\r\n"
         b"Connection: close\r\n\r\n" + _BUSY_BODY)


class _Busy(asyncio.Protocol):
    """A connection past the cap: answered 503 at once, before it sends anything."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if isinstance(transport, asyncio.WriteTransport):
            transport.write(_BUSY)
        transport.close()


def default_max_connections() -> int:
    """``MAX_CONNECTIONS``, or a quarter of the open-file limit when that is smaller (the
    rest: the API client, Prometheus and gateway scrapes, the other listener)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return min(MAX_CONNECTIONS, max(16, soft // 4))


class BoundedListener:
    """An aiohttp ``app`` on ``host:port``, connections bounded in count and lifetime."""

    def __init__(self, app: web.Application, host: str, port: int, *,
                 max_connections: int | None = None,
                 lifetime_s: float | None = None) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.max_connections = (max_connections if max_connections is not None
                                else default_max_connections())
        self.lifetime_s = lifetime_s if lifetime_s is not None else CONNECTION_LIFETIME_S
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        #: When each connection opened (loop time); ended ones are dropped by the sweep.
        self._opened: dict[web.RequestHandler, float] = {}

    async def start(self) -> None:
        # Handler cancellation: a handler whose connection is gone (closed at its
        # lifetime while the body was still coming) stops instead of failing on it.
        self._runner = web.AppRunner(self.app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        self._server = await asyncio.get_running_loop().create_server(
            self._protocol, self.host, self.port)
        if self.port == 0:
            self.port = int(self._server.sockets[0].getsockname()[1])
        self._sweeper = asyncio.create_task(self._sweep())

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._server is not None:
            self._server.close()  # stop accepting; the runner closes the connections
            self._server = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self._opened.clear()

    def _connections(self) -> list[web.RequestHandler]:
        server = self._runner.server if self._runner is not None else None
        return server.connections if server is not None else []

    def _protocol(self) -> asyncio.BaseProtocol:
        assert self._runner is not None and self._runner.server is not None
        # Counted once connected: a burst accepted in one loop turn may pass the cap by
        # that burst (at most the listen backlog), never more.
        if len(self._connections()) >= self.max_connections:
            return _Busy()
        handler = self._runner.server()
        self._opened[handler] = asyncio.get_running_loop().time()
        return handler

    async def _sweep(self) -> None:
        """Close connections past their lifetime, even mid-request, every tick."""
        loop = asyncio.get_running_loop()
        tick = min(1.0, self.lifetime_s / 4)
        while True:
            await asyncio.sleep(tick)
            now = loop.time()
            live = set(self._connections())
            for handler, opened in list(self._opened.items()):
                if handler in live:
                    if now - opened >= self.lifetime_s:
                        handler.force_close()
                        del self._opened[handler]
                elif now - opened >= tick:  # connected within a loop turn, so it ended
                    del self._opened[handler]


async def read_bounded(response: aiohttp.ClientResponse, limit: int) -> bytes | None:
    """``response``'s body, or None when it says or turns out to be over ``limit`` bytes
    (then at most ``limit`` + 1 bytes were read)."""
    if response.content_length is not None and response.content_length > limit:
        return None
    body = bytearray()
    while len(body) <= limit:
        chunk = await response.content.read(limit + 1 - len(body))
        if not chunk:
            return bytes(body)
        body += chunk
    return None


class AnswerLimit:
    """Reads answers of one kind up to ``limit`` bytes; warns once per source about a
    bigger one."""

    def __init__(self, limit: int, what: str) -> None:
        self.limit = limit
        #: What the answers are, for the warning ("Gateway metrics", "Prometheus answer").
        self.what = what
        self._warned: set[str] = set()

    async def read(self, response: aiohttp.ClientResponse, source: str) -> bytes | None:
        """The body, or None (like an unreachable source) when over the limit.

        ``source`` names where it came from in the warning: credentials redacted.
        """
        body = await read_bounded(response, self.limit)
        if body is None and source not in self._warned:
            if len(self._warned) >= _MAX_WARNED:
                self._warned.clear()
            self._warned.add(source)
            log.warning("%s from %s over %d MiB: ignored, as if unreachable, until it is "
                        "smaller", self.what, source, self.limit >> 20)
        return body
