"""Open-loop load: Poisson arrivals at a fixed rate, latency from the scheduled send time.

A closed loop (N clients, each waiting for its answer before the next request)
slows down with the server and hides queueing. Here send times are drawn in
advance (exponential gaps at ``rate``) and never wait for answers: a request
whose time has come is sent even while earlier ones are pending, and its
latency runs from its *scheduled* time, so time spent waiting for a free
connection or behind a late generator counts as latency, as a user would see it.

The HTTP client is a minimal HTTP/1.1 keep-alive one on asyncio streams (uvloop
when installed): a general client (httpx, aiohttp) costs several times the CPU
per request and tops out near the rates measured here on two cores. Each target
URL gets a pool of at most ``max_connections`` connections; requests round-robin
over the URLs (a candidate's replicas).

Bounds, so a candidate that stops answering costs the generator neither
unbounded memory nor time: a request's ``timeout_s`` covers its wait for a
connection as well as the exchange (a request that cannot even get a
connection in that time is an error, as its caller would see it), and at most
``Client.max_pending`` requests are pending at once (every connection busy
plus ``MAX_WAITING`` waiting for one); a request due beyond that counts as an
error at once, without a task. Without them a candidate that never answered
made a 20,000/s, 10 s step hold 200,000 tasks (about 600 MiB) and last five
minutes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from hdrh.histogram import HdrHistogram

from kubeinfer_runtime.recommend.stats import new_histogram, record_seconds

#: Largest response head or body read, bytes: a bound on what a server can make us buffer.
MAX_RESPONSE_BYTES = 16 << 20
#: Requests waiting for a connection, at most, per client (beyond: errors at once).
MAX_WAITING = 10_000


class HttpError(Exception):
    """A malformed or unexpected response."""


@dataclass
class LoadResult:
    target_rate: float
    achieved_rate: float
    duration_s: float
    sent: int
    ok: int
    errors: int
    histogram: HdrHistogram
    error_samples: list[str] = field(default_factory=list)


class _Pool:
    """Keep-alive connections to one ``http://host:port``, at most ``size`` open."""

    def __init__(self, url: str, size: int) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"{url!r}: only http://host:port URLs are supported")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.prefix = parts.path.rstrip("/")
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.size = size
        self.slots = asyncio.Semaphore(size)

    async def conn(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        while self.idle:
            reader, writer = self.idle.pop()
            if not writer.is_closing() and not reader.at_eof():
                return reader, writer
        return await asyncio.open_connection(self.host, self.port, limit=MAX_RESPONSE_BYTES)

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()


def request_bytes(host: str, port: int, path: str, body: bytes, content_type: str) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    raw: bytes) -> tuple[int, bool]:
    """Send one request, read its whole response: (status, connection reusable)."""
    writer.write(raw)
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1."):
        raise HttpError("not an HTTP/1.x response")
    status = int(head[9:12])
    length: int | None = None
    chunked = False
    reusable = True
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        key = name.strip().lower()
        if key == b"content-length":
            length = int(value)
        elif key == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
        elif key == b"connection" and b"close" in value.lower():
            reusable = False
    if chunked:
        total = 0
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            total += size
            if total > MAX_RESPONSE_BYTES:
                raise HttpError("response body too large")
            await reader.readexactly(size + 2)
            if size == 0:
                break
    elif length is not None:
        if length > MAX_RESPONSE_BYTES:
            raise HttpError("response body too large")
        await reader.readexactly(length)
    else:
        await reader.read(MAX_RESPONSE_BYTES)
        reusable = False
    return status, reusable


class Client:
    """POSTs bodies to ``urls`` (round-robin), each through its own connection pool."""

    def __init__(self, urls: Sequence[str], *, path: str = "/invocations",
                 content_type: str = "application/json", max_connections: int = 64,
                 timeout_s: float = 10.0) -> None:
        self.pools = [_Pool(u, max_connections) for u in urls]
        self.path = path
        self.content_type = content_type
        self.timeout_s = timeout_s
        #: Requests pending at once, at most: every connection busy, ``MAX_WAITING`` more.
        self.max_pending = sum(p.size for p in self.pools) + MAX_WAITING
        self._next = itertools.cycle(range(len(self.pools)))

    async def post(self, body: bytes) -> int:
        """One request; its status. Raises OSError, HttpError or TimeoutError (no answer
        within ``timeout_s``, waiting for a connection included)."""
        pool = self.pools[next(self._next)]
        raw = request_bytes(pool.host, pool.port, pool.prefix + self.path, body,
                            self.content_type)
        async with asyncio.timeout(self.timeout_s), pool.slots:
            reader, writer = await pool.conn()
            try:
                status, reusable = await _exchange(reader, writer, raw)
            except BaseException:
                writer.close()
                raise
            if reusable:
                pool.idle.append((reader, writer))
            else:
                writer.close()
            return status

    def close(self) -> None:
        for pool in self.pools:
            pool.close()


async def open_loop(client: Client, bodies: Sequence[bytes], *, rate: float, duration_s: float,
                    seed: int = 0, record: bool = True) -> LoadResult:
    """Send Poisson arrivals at ``rate`` for ``duration_s``; wait for the answers.

    A 2xx answer is a success; anything else (status, connection error, timeout)
    an error, and so is a request due while ``client.max_pending`` are pending
    (the candidate is saturated: no task is made for it). Requests still
    unanswered ``client.timeout_s`` after the last send count as errors.
    ``achieved_rate`` is requests sent over the time the sending actually took
    (longer than ``duration_s`` when the generator fell behind).
    """
    if rate <= 0 or duration_s <= 0 or not bodies:
        raise ValueError("rate, duration and bodies must be positive / non-empty")
    loop = asyncio.get_running_loop()
    rng = random.Random(seed)
    hist = new_histogram()
    counts = {"ok": 0, "errors": 0}
    samples: list[str] = []
    pending: set[asyncio.Task[None]] = set()

    async def one(scheduled: float, body: bytes) -> None:
        try:
            status = await client.post(body)
            good = 200 <= status < 300
            if not good and len(samples) < 5:
                samples.append(f"HTTP {status}")
        except (OSError, HttpError, TimeoutError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError, ValueError) as e:
            good = False
            if len(samples) < 5:
                samples.append(f"{type(e).__name__}: {e}"[:200])
        if good:
            counts["ok"] += 1
            if record:
                record_seconds(hist, loop.time() - scheduled)
        else:
            counts["errors"] += 1

    start = loop.time() + 0.005
    end = start + duration_s
    at = start
    sent = 0
    while True:
        at += rng.expovariate(rate)
        if at >= end:
            break
        delay = at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        elif sent % 32 == 0:
            await asyncio.sleep(0)  # behind schedule: let sent requests run now and then
        if len(pending) >= client.max_pending:
            counts["errors"] += 1
            if len(samples) < 5:
                samples.append(f"{len(pending)} requests pending: the candidate is saturated")
            sent += 1
            continue
        task = loop.create_task(one(at, bodies[sent % len(bodies)]))
        pending.add(task)
        task.add_done_callback(pending.discard)
        sent += 1
    send_time = max(loop.time() - start, duration_s)
    if pending:
        _, late = await asyncio.wait(set(pending), timeout=client.timeout_s + 1)
        for task in late:
            task.cancel()
            counts["errors"] += 1
        for task in late:
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return LoadResult(target_rate=rate, achieved_rate=sent / send_time, duration_s=send_time,
                      sent=sent, ok=counts["ok"], errors=counts["errors"], histogram=hist,
                      error_samples=samples)
