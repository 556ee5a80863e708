"""A small HTTP/1.1 keep-alive client for the gateway -> model server hop.

Why not httpx or aiohttp: the hop has a budget of 0.3 ms at p50, and a shared
``httpx.AsyncClient`` collapsed at 64 concurrent requests (FACTS.md). aiohttp
holds up but costs about twice the CPU: measured on the 2-core dev machine
(gateway + model server + wrk, iris model), the gateway process spent
120-230 µs of CPU per request with this client and 330-560 µs with an aiohttp
``ClientSession`` (keep-alive ``TCPConnector``), and c=1 p50 was 0.42-0.51 ms
against 0.65-0.81 ms (model server direct: 0.19-0.22 ms). ``bench/serving.py``
measures the hop. The gateway only ever sends
one kind of request (a POST or a GET with a known body to a model server it
trusts), so a plain ``asyncio.Protocol`` with httptools' response parser
(already a uvicorn dependency) does the job in a fraction of the time.

What it handles, and why:

* a pool of idle keep-alive connections per upstream URL, capped at
  ``max_idle`` (more concurrent requests open more connections, which are
  closed on release rather than queued: queueing belongs to the model server);
* idle connections older than ``idle_ttl_s`` are not reused, so a request never
  races the server closing an idle connection (uvicorn closes after 5 s);
  should it still happen, a request on a reused connection that got no byte
  back is retried once on a fresh connection, like browsers and urllib3 do;
* three failure kinds the gateway answers differently: ``ConnectFailed`` (the
  request was certainly not delivered: safe to send elsewhere),
  ``ConnectionLost`` (it may have been delivered) and ``UpstreamTimeout``;
* answers are read within bounds, whoever serves them: a head (status line and
  headers) within ``MAX_HEAD_BYTES`` and a body within the client's
  ``max_response_bytes`` (or a request's own ``max_body``); past either the
  connection is closed at once and the request fails with ``ResponseTooLarge``,
  so a model server (a shadow's above all) that answers without end, or sends
  headers without end, costs the gateway one bound's worth of memory, never more.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast
from urllib.parse import urlsplit

import httptools

Headers = list[tuple[bytes, bytes]]

#: Bodies above this size are written without concatenating them to the head.
_CONCAT_LIMIT = 64 * 1024
#: An answer's status line and headers, bytes at most (what the runtime's own listeners
#: take from a client, ``HTTP_MAX_HEADER_BYTES``).
MAX_HEAD_BYTES = 64 * 1024


class UpstreamError(Exception):
    def __init__(self, url: str, detail: str) -> None:
        super().__init__(f"{url}: {detail}")
        self.url = url
        self.detail = detail


class ConnectFailed(UpstreamError):
    """No connection could be made: the request was certainly not delivered."""


class ConnectionLost(UpstreamError):
    """The connection broke, or the answer was not HTTP, before a full response."""


class UpstreamTimeout(UpstreamError):
    """No full response within the timeout."""


class ResponseTooLarge(UpstreamError):
    """The answer's head or body went over its bound (the connection was closed)."""


@dataclass(slots=True)
class UpstreamResponse:
    status: int
    #: Lower-case header names, as received.
    headers: Headers
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None


class _Connection(asyncio.Protocol):
    """One keep-alive connection; at most one request in flight on it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[UpstreamResponse] | None = None
        self.closed = False
        #: Whether any byte of the current response arrived (decides retries).
        self.got_bytes = False
        self.idle_since = 0.0
        self._status = 0
        self._headers: Headers = []
        self._body: list[bytes] = []
        #: The current answer's bounds and what came of it so far.
        self._max_body: int | None = None
        self._body_bytes = 0
        self._head_bytes = 0
        self._head_done = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: no isinstance.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        if self.closed:
            return  # over a bound: what is still buffered is not parsed
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(f"sent an invalid HTTP response ({exc})")
            self.close()
            return
        if not self._head_done and not self.closed:
            # httptools keeps a header it has not finished in its own buffer: count
            # every byte until the head is complete (a chunk is at most 256 KiB).
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._too_large(f"sent more than {MAX_HEAD_BYTES} bytes of headers")

    def eof_received(self) -> bool | None:
        return None  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail("closed the connection before a full response"
                   + (f" ({exc})" if exc else ""))

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self._head_done = True
        self._status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        if self.closed:
            return
        self._body_bytes += len(body)
        if self._max_body is not None and self._body_bytes > self._max_body:
            self._too_large(f"answered more than {self._max_body} bytes")
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self.closed and self.waiter is None:
            return  # failed over a bound within this chunk
        if not self.parser.should_keep_alive():
            self.close()
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
            waiter.set_result(UpstreamResponse(self._status, self._headers, body))

    # used by the client
    def send(self, data: bytes | list[bytes],
             max_body: int | None = None) -> asyncio.Future[UpstreamResponse]:
        assert self.transport is not None
        self.got_bytes = False
        self._status = 0
        self._headers = []
        self._body = []
        self._max_body = max_body
        self._body_bytes = self._head_bytes = 0
        self._head_done = False
        self.waiter = self.loop.create_future()
        if isinstance(data, bytes):
            self.transport.write(data)
        else:
            self.transport.writelines(data)
        return self.waiter

    def _fail(self, detail: str) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionLost("", detail))

    def _too_large(self, detail: str) -> None:
        """Over a bound: fail the request, let go of what was read, close at once."""
        self._body = []
        self._headers = []
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(ResponseTooLarge("", detail))
        self.closed = True
        if self.transport is not None:
            # abort(), not close(): nothing is left to send, and what the peer is still
            # writing must not be read any further.
            self.transport.abort()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


@dataclass(slots=True, eq=False)
class _Origin:
    """One upstream base URL, parsed once."""

    url: str
    host: str
    port: int
    host_header: bytes
    path_prefix: bytes
    idle: deque[_Connection] = field(default_factory=deque)
    #: Dropped from the route table: connections still in flight close on release.
    retired: bool = False


def _parse_origin(url: str) -> _Origin:
    # A bad URL in the route table is treated like an unreachable upstream: it
    # goes out of rotation and the client gets a 503 naming it, not a 500.
    try:
        parts = urlsplit(url)
        port = parts.port or 80
    except ValueError:
        parts, port = None, 0
    if parts is None or parts.scheme != "http" or not parts.hostname:
        raise ConnectFailed(url, "is not a valid upstream URL (want http://host:port)")
    host_header = parts.netloc.rsplit("@", 1)[-1].encode("idna")
    return _Origin(url=url, host=parts.hostname, port=port, host_header=host_header,
                   path_prefix=parts.path.rstrip("/").encode())


def _expire(waiter: asyncio.Future[UpstreamResponse], url: str, timeout_s: float) -> None:
    if not waiter.done():
        waiter.set_exception(UpstreamTimeout(url, f"did not answer within {timeout_s:g}s"))


class UpstreamClient:
    """Pooled HTTP/1.1 requests to upstream base URLs (``http://host:port``)."""

    def __init__(self, *, max_idle: int = 100, idle_ttl_s: float = 4.0,
                 connect_timeout_s: float = 5.0, max_response_bytes: int | None = None) -> None:
        self.max_idle = max_idle
        self.idle_ttl_s = idle_ttl_s
        self.connect_timeout_s = connect_timeout_s
        #: Longest answer body read (None: no bound but the timeout); a request may
        #: ask for less (``max_body``).
        self.max_response_bytes = max_response_bytes
        self._origins: dict[str, _Origin] = {}

    def _origin(self, url: str) -> _Origin:
        origin = self._origins.get(url)
        if origin is None:
            origin = self._origins[url] = _parse_origin(url)
        return origin

    async def request(self, url: str, method: bytes, path: bytes,
                      headers: Sequence[tuple[bytes, bytes]], body: bytes, timeout_s: float, *,
                      total: bool = False, max_body: int | None = None) -> UpstreamResponse:
        """Send one request and read the whole response.

        ``timeout_s`` bounds the exchange (sending and the answer); with ``total``
        it bounds the whole call, connecting (and a second connection after a
        stale idle one) included, without a context manager per call.
        ``max_body`` bounds the answer's body below the client's ``max_response_bytes``.
        Raises ``ConnectFailed``, ``ConnectionLost``, ``UpstreamTimeout`` or
        ``ResponseTooLarge``.
        """
        limit = self.max_response_bytes
        if max_body is not None and (limit is None or max_body < limit):
            limit = max_body
        origin = self._origin(url)
        head = _request_head(origin, method, path, headers, len(body))
        data: bytes | list[bytes] = head + body if len(body) <= _CONCAT_LIMIT else [head, body]
        deadline = time.monotonic() + timeout_s if total else None
        conn = self._take_idle(origin)
        if conn is None:
            conn = await self._connect(origin, deadline)
            return await self._exchange(origin, conn, data, _left(timeout_s, deadline), limit)
        try:
            return await self._exchange(origin, conn, data, timeout_s, limit)
        except ConnectionLost as lost:
            if conn.got_bytes:
                raise
            # Most likely the server closed this idle connection as we reused
            # it, and the request never reached the application: once more,
            # on a fresh connection. (The server may also have died while
            # running it, so a failed reconnect is no proof of "not
            # delivered": report the loss, not ConnectFailed.)
            try:
                conn = await self._connect(origin, deadline)
            except ConnectFailed as exc:
                raise ConnectionLost(origin.url, f"{lost.detail}, then {exc.detail}") from None
            return await self._exchange(origin, conn, data, _left(timeout_s, deadline), limit)

    async def _exchange(self, origin: _Origin, conn: _Connection, data: bytes | list[bytes],
                        timeout_s: float, max_body: int | None = None) -> UpstreamResponse:
        # A timer on the future, not asyncio.timeout()/wait_for(): no extra task
        # or context manager per request on the hot path.
        waiter = conn.send(data, max_body)
        timer = conn.loop.call_later(timeout_s, _expire, waiter, origin.url, timeout_s)
        try:
            response = await waiter
        except ConnectionLost as exc:
            conn.close()
            raise ConnectionLost(origin.url, exc.detail) from None
        except ResponseTooLarge as exc:
            conn.close()
            raise ResponseTooLarge(origin.url, exc.detail) from None
        except BaseException:
            # Timeout or cancellation: the response may still come; never reuse.
            conn.close()
            raise
        finally:
            timer.cancel()
        self._release(origin, conn)
        return response

    def _take_idle(self, origin: _Origin) -> _Connection | None:
        idle = origin.idle
        now = time.monotonic()
        while idle:
            conn = idle.pop()  # most recently used first: warmest, least likely closed
            if not conn.closed and now - conn.idle_since < self.idle_ttl_s:
                return conn
            conn.close()
        return None

    def _release(self, origin: _Origin, conn: _Connection) -> None:
        if conn.closed or origin.retired or len(origin.idle) >= self.max_idle:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        origin.idle.append(conn)

    async def _connect(self, origin: _Origin, deadline: float | None = None) -> _Connection:
        loop = asyncio.get_running_loop()
        limit = self.connect_timeout_s
        if deadline is not None:
            limit = min(limit, max(0.0, deadline - time.monotonic()))
        try:
            async with asyncio.timeout(limit):
                _, conn = await loop.create_connection(
                    lambda: _Connection(loop), origin.host, origin.port)
        except TimeoutError:
            raise ConnectFailed(origin.url, f"could not be reached within {limit:g}s") from None
        except OSError as exc:
            raise ConnectFailed(origin.url,
                                f"could not be reached ({exc.strerror or exc})") from None
        return conn

    def forget(self, keep: set[str]) -> None:
        """Close idle connections to upstreams no longer routed to."""
        for url in [u for u in self._origins if u not in keep]:
            origin = self._origins.pop(url)
            origin.retired = True
            while origin.idle:
                origin.idle.pop().close()

    def idle_count(self, url: str) -> int:
        origin = self._origins.get(url)
        return len(origin.idle) if origin else 0

    async def close(self) -> None:
        """Close idle connections; in-flight ones are closed when they finish."""
        self.forget(set())


def _left(timeout_s: float, deadline: float | None) -> float:
    """The exchange's timeout: what is left before ``deadline`` (None: ``timeout_s``)."""
    return timeout_s if deadline is None else max(0.0, deadline - time.monotonic())


def _request_head(origin: _Origin, method: bytes, path: bytes,
                  headers: Sequence[tuple[bytes, bytes]], length: int) -> bytes:
    parts = [method, b" ", origin.path_prefix, path, b" HTTP/1.1\r\nhost: ", origin.host_header,
             b"\r\ncontent-length: ", b"%d" % length, b"\r\n"]
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)
