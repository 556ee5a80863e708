"""A second listener that serves ``GET /metrics`` and nothing else.

On Kubernetes, NetworkPolicies let only an Endpoint's gateway reach its model
servers' inference port, and Prometheus must still scrape them. With metrics
on a port of their own (``KUBEINFER_METRICS_PORT``), a policy can open that
port to scrapers without opening inference to them. The listener is a tiny
asyncio server on the role's event loop: one request per connection, the
request head bounded in size and time, the answer's write bounded in time,
anything but ``GET /metrics`` answered 404. At most ``MAX_CONNECTIONS`` are
served at once and any past that is closed as soon as it is accepted: the
listener shares the process's file descriptors with inference, and the port
is open to any source by default, so idle connections must not exhaust them.
With several uvicorn workers each binds it with SO_REUSEPORT, and a scrape
sees one worker, as on the main port.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from kubeinfer_runtime.metrics import render_latest

log = logging.getLogger("kubeinfer.metrics")

#: Longest request head accepted, and how long a client may take to send it (and,
#: again, to take the answer).
MAX_HEAD_BYTES = 8192
HEAD_TIMEOUT_S = 5.0
#: Connections served at once per process; scrapers use one or two.
MAX_CONNECTIONS = 64


def _response(status: bytes, content_type: bytes, body: bytes) -> bytes:
    return (b"HTTP/1.1 " + status + b"\r\ncontent-type: " + content_type
            + b"\r\ncontent-length: " + str(len(body)).encode()
            + b"\r\nconnection: close\r\n\r\n" + body)


class _Handler:
    """Serves each connection, closing those past ``max_connections`` at once."""

    def __init__(self, max_connections: int) -> None:
        self.max_connections = max_connections
        self.open = 0
        self._full = False

    async def __call__(self, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> None:
        if self.open >= self.max_connections:
            if not self._full:  # once per episode, not per connection
                self._full = True
                log.warning("Metrics port has %d connections open, its limit: closing new "
                            "ones until some end", self.open)
            writer.transport.abort()
            return
        self._full = False
        self.open += 1
        try:
            await _handle(reader, writer)
        finally:
            self.open -= 1


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT_S)
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        if len(parts) == 3 and parts[0] == b"GET" and parts[1].split(b"?", 1)[0] == b"/metrics":
            body, content_type = render_latest()
            writer.write(_response(b"200 OK", content_type.encode(), body))
        else:
            writer.write(_response(b"404 Not Found", b"text/plain",
                                   b"This port serves GET /metrics only\n"))
        await asyncio.wait_for(writer.drain(), HEAD_TIMEOUT_S)  # a client that never reads
    except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
            ConnectionError):
        # A slow, oversized or vanished client: just close, dropping any answer it is not
        # taking (a graceful close would wait for that answer to be read).
        if writer.transport.get_write_buffer_size():
            writer.transport.abort()
    finally:
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), HEAD_TIMEOUT_S)
        except TimeoutError:
            writer.transport.abort()  # the client stopped reading the answer's tail
        except Exception:
            pass  # closed by the client


async def start_metrics_listener(host: str, port: int, *,
                                 max_connections: int = MAX_CONNECTIONS) -> asyncio.Server:
    server = await asyncio.start_server(_Handler(max_connections), host, port,
                                        limit=MAX_HEAD_BYTES, reuse_port=True)
    log.info("Serving GET /metrics on %s:%d", host, port)
    return server


@contextlib.asynccontextmanager
async def metrics_listener(host: str, port: int | None) -> AsyncIterator[None]:
    """The listener for the block's duration (a role's lifespan); nothing when ``port`` is
    None."""
    if port is None:
        yield
        return
    server = await start_metrics_listener(host, port)
    try:
        yield
    finally:
        server.close()
