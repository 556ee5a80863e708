"""Bounds on every connection and request head: size, count and time.

uvicorn keeps a connection that never finishes its request forever, buffers
headers of any size and number, waits forever for a body shorter than its
Content-Length and never limits how many connections a process holds; every
one of those let a hostile client pin memory or file descriptors. This
protocol (uvicorn's httptools protocol, which ``inline_http`` builds on, so
both the inline and the ASGI paths are covered) adds the bounds of
``contract.HttpSettings``:

* the request line and headers: at most ``http_max_header_bytes`` in all
  (checked as bytes arrive: nothing larger is ever buffered),
  ``http_max_header_line_bytes`` per header and ``http_max_headers`` of them:
  431, closed;
* time: ``http_header_timeout_s`` from a request's first byte (or the
  connection's opening) to its last header, ``http_body_timeout_s`` of silence
  while a body is expected, and a body at least ``http_body_min_rate_bytes_s``
  on average once twice that long has passed (a byte trickled just inside every
  silence held a connection for as long as the client liked): 408 (or a plain
  close when nothing was sent),
  ``http_keepalive_timeout_s`` of idleness between requests;
* ``http_max_connections`` per process: past it the longest-idle connection
  (between requests, or open without a byte) is closed; when none is idle the
  new one gets 503 and is closed;
* ``http_max_body_bytes_held`` per process: the bytes of requests received
  whose answer is not yet sent (the body bound alone let a hundred callers,
  each holding 6 MB a byte short of its Content-Length at the minimum rate for
  hours, hold 600 MB of a 512 MiB gateway: an out-of-memory kill that loses
  every request in flight). Past it the upload that began longest ago, a
  trickling one first, gets 503 and is closed; requests already with the app
  are never cut;
* ``http_send_timeout_s``: a peer that takes none of its answer's bytes for that
  long is cut. asyncio keeps whatever the kernel would not take in the
  transport's buffer, and a transport closing waits for it to drain, so a
  caller that asked for large answers and never read them held each one for
  as long as it kept the connection open. Those waiting answers count against
  ``http_max_body_bytes_held`` too (once a sweep): past it, the connections
  whose peers took nothing for longest are cut, so reading a byte just inside
  every timeout holds no more than the bound.

Time limits are enforced by one sweep per event loop over the open
connections (every quarter of the shortest timeout, at most once a second)
rather than a timer per request: a request then costs a couple of clock
reads, not two timers (measured: timers cost ~9 µs a request on the inline
path). Refusals are JSON errors in the runtime's shape (``errors.render_error``)
with ``connection: close``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import resource
import socket
import sys
import weakref
from enum import Enum
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from kubeinfer_runtime.errors import NotReady, Reply, RuntimeServiceError, render_error
from kubeinfer_runtime.server_env import HttpConfig, http_settings

log = logging.getLogger("kubeinfer.http")

#: Most connections a process keeps when the limit is derived from the fd limit.
MAX_AUTO_CONNECTIONS = 10_000
#: Fewest request bytes a process may hold when the bound is derived from its memory:
#: a few requests of the largest real-time body (6 MB) and their heads.
MIN_AUTO_BYTES_HELD = 16 * 1024 * 1024
#: cgroup v2's and v1's memory limit files; v1 writes a huge number for "no limit".
CGROUP_MEMORY_FILES = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


class HeadersTooLarge(RuntimeServiceError):
    def __init__(self, message: str) -> None:
        super().__init__(431, "ValidationError", message)


class RequestTimeout(RuntimeServiceError):
    def __init__(self, message: str) -> None:
        super().__init__(408, "RequestTimeout", message)


class Phase(Enum):
    #: Reading a request's line and headers (or open, waiting for the first byte).
    HEAD = "head"
    #: Reading a request's body.
    BODY = "body"
    #: A request is with the app, or the connection waits between requests
    #: (uvicorn's keep-alive timer covers that).
    OTHER = "other"


def auto_max_connections(open_files: int) -> int:
    """Three quarters of the open-file limit (the rest: upstream pools, files, logs)."""
    return max(16, min(MAX_AUTO_CONNECTIONS, open_files * 3 // 4))


@functools.cache
def current_settings() -> HttpConfig:
    """This process's HTTP bounds, from ``KUBEINFER_*`` env (read once)."""
    return http_settings()


@functools.cache
def max_connections() -> int:
    configured = current_settings().http_max_connections
    if configured is not None:
        return configured
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return auto_max_connections(soft if soft != resource.RLIM_INFINITY else 65536)


def auto_max_bytes_held(memory_limit: int | None, physical: int) -> int:
    """A quarter of the memory the process may use, at least ``MIN_AUTO_BYTES_HELD``: the
    rest is the interpreter, the app, and the copies an app makes of what it holds."""
    limit = memory_limit if memory_limit is not None and memory_limit < physical else physical
    return max(MIN_AUTO_BYTES_HELD, limit // 4)


def parse_cgroup_memory_limit(text: str) -> int | None:
    """A cgroup memory limit file's value in bytes; None for no limit ("max", or v1's
    page-rounded 2**63) or text that is not a number."""
    text = text.strip()
    if not text.isdigit():
        return None
    value = int(text)
    return value if value < 1 << 60 else None


def cgroup_memory_limit() -> int | None:
    for path in CGROUP_MEMORY_FILES:
        try:
            with open(path) as f:
                text = f.read(64)
        except OSError:
            continue
        return parse_cgroup_memory_limit(text)
    return None


#: Where ``tcpi_bytes_acked`` (Linux 4.1+) lies in ``struct tcp_info``.
TCP_INFO_BYTES_ACKED = slice(120, 128)
#: Linux's; None elsewhere (macOS has another structure): progress is then read from
#: the transport's buffer alone.
TCP_INFO: int | None = getattr(socket, "TCP_INFO", None) if sys.platform == "linux" else None


def bytes_acked(transport: asyncio.BaseTransport) -> int | None:
    """Bytes of this connection the peer has acknowledged (TCP_INFO): it grows only while
    the peer's application reads (a full receive window stops it); None where unknown
    (not TCP, or an older kernel)."""
    sock = transport.get_extra_info("socket")
    if TCP_INFO is None or sock is None or sock.family not in (socket.AF_INET,
                                                               socket.AF_INET6):
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, TCP_INFO, 256)
    except (OSError, ValueError):  # closed
        return None
    if len(info) < TCP_INFO_BYTES_ACKED.stop:
        return None
    return int.from_bytes(info[TCP_INFO_BYTES_ACKED], sys.byteorder)


class BodyBudget:
    """Bytes of requests this process holds: received on a connection since its last
    answer was sent (``LimitedHttpProtocol._received``, summed), against ``limit``."""

    __slots__ = ("answers_cut", "held", "limit", "refused", "send_stalled")

    def __init__(self, limit: int) -> None:
        self.held = 0
        self.limit = limit
        #: Uploads answered 503 because the process held its bound.
        self.refused = 0
        #: Connections cut because their peer stopped taking its answer.
        self.send_stalled = 0
        #: Connections cut because answers waiting to be sent and requests held together
        #: exceeded ``limit`` (``bound_answers``).
        self.answers_cut = 0


@functools.cache
def body_budget() -> BodyBudget:
    """The process's one budget: every server and connection in it draws on the same
    memory."""
    configured = current_settings().http_max_body_bytes_held
    if configured is None:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        configured = auto_max_bytes_held(cgroup_memory_limit(), physical)
    return BodyBudget(configured)


def sweep_interval(settings: HttpConfig) -> float:
    shortest = min(settings.http_header_timeout_s, settings.http_body_timeout_s,
                   settings.http_send_timeout_s)
    return max(0.05, min(1.0, shortest / 4))


class _Sweeper:
    """Checks the time limits of every connection of one server, periodically."""

    def __init__(self, loop: asyncio.AbstractEventLoop, state: ServerState,
                 interval: float) -> None:
        self.loop = loop
        self.state = state
        self.interval = interval
        self.handle: asyncio.TimerHandle | None = None

    def ensure(self) -> None:
        if self.handle is None:
            self.handle = self.loop.call_later(self.interval, self.tick)

    def tick(self) -> None:
        self.handle = None
        now = self.loop.time()
        for conn in list(self.state.connections):
            if isinstance(conn, LimitedHttpProtocol):
                conn.check_deadline(now)
        bound_answers(self.state)
        if self.state.connections:
            self.ensure()


def bound_answers(state: ServerState) -> None:
    """Cut connections, the one whose peer has taken nothing for longest first, while the
    answers waiting to be sent and the requests held together exceed the process's bound.

    Answers are counted here, once a sweep, from the transports themselves (nothing to
    reserve or forget): a peer reading a byte just inside every send timeout, on many
    connections, would otherwise hold many answers for hours.
    """
    budget = body_budget()
    # ``_send_pending``: what each connection's check of this sweep read (0 once cut).
    waiting = [(conn, conn._send_pending) for conn in state.connections
               if isinstance(conn, LimitedHttpProtocol) and conn._send_pending]
    total = budget.held + sum(pending for _, pending in waiting)
    if total <= budget.limit:
        return
    for conn, pending in sorted(waiting, key=lambda item: item[0]._send_since):
        if total <= budget.limit:
            return
        budget.answers_cut += 1
        log.warning("Answers waiting to be sent and requests held reached %d bytes "
                    "(KUBEINFER_HTTP_MAX_BODY_BYTES_HELD): cutting the connection whose "
                    "peer took nothing for longest (%d bytes waiting)", total, pending)
        conn.transport.abort()
        conn._send_pending = 0
        total -= pending


class LimitedHttpProtocol(HttpToolsProtocol):
    """httptools with bounds on heads, bodies, idleness and connections (module doc)."""

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits = current_settings()
        self._budget = body_budget()
        self.timeout_keep_alive = self.limits.http_keepalive_timeout_s  # type: ignore[assignment]
        self._phase = Phase.HEAD
        self._phase_since = self.loop.time()
        self._head_bytes = 0
        #: A limit was crossed while parsing: the reply to send once parsing stops.
        self._refusal: RuntimeServiceError | None = None
        #: Bytes seen since the last response completed (0: an idle connection).
        self._received = 0
        self._idle_since = self._phase_since
        #: When the body began and ``_received`` then: its average rate is checked.
        self._body_since = self._phase_since
        self._body_base = 0
        #: The sweeper's last look (time not spent reading is not the client's).
        self._checked_at = self._phase_since
        #: Bytes of answers waiting in the transport at the last look, and since when
        #: the peer has taken none of them; what that look read the peer's progress by
        #: (``_send_stalled``).
        self._send_pending = 0
        self._send_since = self._phase_since
        self._send_mark = 0
        self._defaults_src: list[tuple[bytes, bytes]] | None = None
        self._defaults = b""
        #: The connection's cycle when the current request's head was in (an earlier
        #: request's, or None): ``_answer_begun``. Weakly: that cycle holds its request's
        #: body, which must not live on through this request.
        self._cycle_before: weakref.ref[Any] | None = None

    # -- connections

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        sweeper = getattr(self.server_state, "_kubeinfer_sweeper", None)
        if sweeper is None:
            sweeper = _Sweeper(self.loop, self.server_state, sweep_interval(self.limits))
            self.server_state._kubeinfer_sweeper = sweeper  # type: ignore[attr-defined]
        sweeper.ensure()
        if len(self.connections) > max_connections() and not self._evict_idle():
            log.warning("Connection limit reached (%d, KUBEINFER_HTTP_MAX_CONNECTIONS): "
                        "answering 503 to a new connection", max_connections())
            self._refuse(NotReady(
                f"The server holds its maximum of {max_connections()} connections and none "
                "is idle: retry with backoff"))

    def _evict_idle(self) -> bool:
        """Close the longest-idle other connection; False when none is idle."""
        idle = [c for c in self.connections
                if c is not self and isinstance(c, LimitedHttpProtocol) and c.idle]
        if not idle:
            return False
        victim = min(idle, key=lambda c: c._idle_since)
        victim.transport.close()
        return True

    @property
    def idle(self) -> bool:
        """Between requests (or open without a byte), nothing in flight."""
        cycle = self.cycle
        return (self._received == 0 and (cycle is None or cycle.response_complete)
                and not self.pipeline and not self.transport.is_closing())

    def connection_lost(self, exc: Exception | None) -> None:
        self._release()
        super().connection_lost(exc)

    def _release(self) -> None:
        """What this connection holds goes back to the process's budget."""
        self._budget.held -= self._received
        self._received = 0

    # -- bytes in

    def data_received(self, data: bytes) -> None:
        self._received += len(data)
        budget = self._budget
        budget.held += len(data)
        super().data_received(data)
        if self._refusal is not None:
            self._refuse(self._refusal)
        elif self._phase is Phase.HEAD:
            self._head_bytes += len(data)
            if self._head_bytes > self.limits.http_max_header_bytes:
                self._refuse(HeadersTooLarge(
                    f"Request line and headers exceed {self.limits.http_max_header_bytes} "
                    "bytes (KUBEINFER_HTTP_MAX_HEADER_BYTES): send fewer or smaller headers"))
        elif self._phase is Phase.BODY:
            self._phase_since = self.loop.time()  # data came: the silence starts again
        if budget.held > budget.limit:
            self._over_budget()

    def _over_budget(self) -> None:
        """Refuse uploads, the one that began longest ago first, until the process holds
        no more than its bound. A trickling upload is the oldest by construction; a
        request already with the app (its body whole) is never cut, so with only those
        over the bound nothing is refused here (their answers release them)."""
        budget = self._budget
        # One scan and one sort per crossing, however many uploads it takes.
        uploads = sorted((c for c in self.connections
                          if isinstance(c, LimitedHttpProtocol) and c.uploading),
                         key=lambda c: c._upload_since)
        for victim in uploads:
            if budget.held <= budget.limit:
                return
            budget.refused += 1
            log.warning("Request bytes held reached %d (KUBEINFER_HTTP_MAX_BODY_BYTES_HELD): "
                        "refusing the oldest upload (%d bytes)", budget.limit, victim._received)
            victim._refuse_upload(NotReady(
                f"The server holds its maximum of {budget.limit} bytes of requests "
                "(KUBEINFER_HTTP_MAX_BODY_BYTES_HELD) and this upload began before the "
                "others: retry with backoff, sending the body at once"))

    @property
    def uploading(self) -> bool:
        """Receiving a request's head or body, no earlier answer under way on the
        connection: it can be refused with an answer of its own. A request pipelined
        behind one in flight cannot (the answers would interleave); uvicorn stops reading
        such a connection, so what it holds stays within one read."""
        if self._received == 0 or self._phase is Phase.OTHER or self.transport.is_closing():
            return False
        cycle = self.cycle
        return cycle is None or not (
            self.pipeline or (self._phase is Phase.HEAD and not cycle.response_complete))

    @property
    def _upload_since(self) -> float:
        return self._body_since if self._phase is Phase.BODY else self._phase_since

    def _answer_begun(self) -> bool:
        """The app began answering the request being received before its body was whole:
        no answer of ours may follow. The connection's cycle is that request's only on
        the ASGI path, once its head is in; before that (its head still coming) or on
        the inline path it is an earlier request's, answered, and this one is owed an
        answer of its own."""
        cycle = self.cycle
        before = self._cycle_before() if self._cycle_before is not None else None
        return (self._phase is Phase.BODY and cycle is not None and cycle is not before
                and getattr(cycle, "response_started", False))

    def _refuse_upload(self, err: RuntimeServiceError) -> None:
        if self._answer_begun():
            # The app began answering before the body was whole: no answer of ours.
            self._phase = Phase.OTHER
            self.transport.close()
        else:
            self._refuse(err)
        self._release()  # at once: the loop above must see it gone

    # -- parser callbacks (``inline_http`` calls the ``limits_*`` hooks from its overrides)

    def on_message_begin(self) -> None:
        self.limits_message_begin()
        super().on_message_begin()

    def limits_message_begin(self) -> None:
        if self._phase is not Phase.HEAD:
            self._phase = Phase.HEAD
            self._phase_since = self.loop.time()

    def on_headers_complete(self) -> None:
        if self.limits_headers_complete():
            super().on_headers_complete()

    def limits_headers_complete(self) -> bool:
        """False when the request is refused (no app may see it)."""
        limits = self.limits
        if len(self.headers) > limits.http_max_headers:
            self._refusal = HeadersTooLarge(
                f"Request has more than {limits.http_max_headers} headers "
                "(KUBEINFER_HTTP_MAX_HEADERS): send fewer")
            return False
        # Only a request this long can hold a header over the line limit.
        if self._received > limits.http_max_header_line_bytes:
            for name, value in self.headers:
                if len(name) + len(value) > limits.http_max_header_line_bytes:
                    self._refusal = HeadersTooLarge(
                        f"A request header exceeds {limits.http_max_header_line_bytes} bytes "
                        "(KUBEINFER_HTTP_MAX_HEADER_LINE_BYTES): send a smaller one")
                    return False
        self._head_bytes = 0
        # uvicorn makes this request's own cycle next (ASGI path). The inline path's
        # stand-in has no response_started and takes no weak reference.
        cycle = self.cycle
        self._cycle_before = weakref.ref(cycle) if hasattr(cycle, "__weakref__") else None
        self._phase = Phase.BODY
        self._phase_since = self._body_since = self.loop.time()
        self._body_base = self._received
        return True

    def on_body(self, body: bytes) -> None:
        if self._refusal is None:  # a refused request has no cycle to take its body
            super().on_body(body)

    def on_message_complete(self) -> None:
        self.limits_message_complete()
        if self._refusal is None:
            super().on_message_complete()

    def limits_message_complete(self) -> None:
        self._phase = Phase.OTHER

    def on_response_complete(self) -> None:
        # A pipelined request's body may be under way: its count stays right.
        self._body_base -= self._received
        self._release()
        self._idle_since = self.loop.time()
        super().on_response_complete()

    # -- time limits (the sweeper calls this)

    def check_deadline(self, now: float) -> None:
        if self._send_stalled(now):
            return
        last, self._checked_at = self._checked_at, now
        if self.transport.is_closing() or self.flow.read_paused:
            # Paused: we are not reading (a pipelined request waits its turn, or the app
            # is slow to take the body): not the client's fault, nor is its body's rate.
            self._body_since += now - last
            return
        waited = now - self._phase_since
        if self._phase is Phase.HEAD and waited > self.limits.http_header_timeout_s:
            cycle = self.cycle
            if cycle is not None and not cycle.response_complete:
                return  # between pipelined requests: the one in flight comes first
            if self._received == 0:
                if cycle is None:
                    self.transport.close()  # connected and never said a word
                return  # idle between requests: uvicorn's keep-alive timer's business
            self._refuse(RequestTimeout(
                f"Request headers not received within {self.limits.http_header_timeout_s:g}s "
                "(KUBEINFER_HTTP_HEADER_TIMEOUT_S): send the whole request head at once"))
        elif self._phase is Phase.BODY:
            limits = self.limits
            if waited > limits.http_body_timeout_s:
                self._body_timeout(
                    f"Request body stalled for {limits.http_body_timeout_s:g}s "
                    "(KUBEINFER_HTTP_BODY_TIMEOUT_S): send as many bytes as Content-Length says")
                return
            rate = limits.http_body_min_rate_bytes_s
            # The grace is twice the silence timeout: a body that arrived within one
            # timeout and then stalled is answered as stalled, never as slow.
            if rate > 0 and now - self._body_since > (
                    2 * limits.http_body_timeout_s + (self._received - self._body_base) / rate):
                self._body_timeout(
                    f"Request body arrived slower than {rate:g} bytes/s on average "
                    "(KUBEINFER_HTTP_BODY_MIN_RATE_BYTES_S): send it faster")

    def _send_stalled(self, now: float) -> bool:
        """Cut the connection when its peer took none of the waiting answer bytes for
        ``http_send_timeout_s`` (a closing transport too: it waits for them to drain).

        Any change between two looks counts as taken, a larger buffer too: a streamed
        answer's buffer is a sawtooth (drained by the peer, refilled by the next chunk
        once below the low-water mark), and looks once a sweep can land ever higher on
        it while the peer reads steadily (1 MiB chunks read at 1 MiB per 1.02 s, looked
        at every second: 50 larger looks in a row). Without the peer taking bytes the
        buffer grows only while below the high-water mark (uvicorn awaits the drain
        before each write), then stays as it is.

        On TCP the peer's progress is read where it happens, in the bytes it has
        acknowledged (``bytes_acked``): the kernel's send queue holds megabytes and takes
        more from the transport only once a third of it is free, so a peer reading a few
        kilobytes a second (a device on a slow link fetching a package) would leave the
        transport's buffer unchanged for minutes, and two looks at a steady stream can
        find it the same size."""
        pending = self.transport.get_write_buffer_size()
        if pending == 0:
            self._send_pending = 0
            return False
        acked = bytes_acked(self.transport)
        mark = pending if acked is None else acked
        if self._send_pending == 0 or mark != self._send_mark:
            self._send_since = now  # bytes are waiting now, or the peer took some
        self._send_pending, self._send_mark = pending, mark
        if now - self._send_since <= self.limits.http_send_timeout_s:
            return False
        self._budget.send_stalled += 1
        log.warning("Peer took none of %d waiting answer bytes for %gs "
                    "(KUBEINFER_HTTP_SEND_TIMEOUT_S): connection cut", pending,
                    self.limits.http_send_timeout_s)
        self.transport.abort()
        self._send_pending = 0
        return True

    def _body_timeout(self, message: str) -> None:
        if self._answer_begun():
            self.transport.close()
            return
        self._refuse(RequestTimeout(message))

    # -- refusing

    def _refuse(self, err: RuntimeServiceError) -> None:
        """Answer ``err`` on this connection and close it (no app sees the request)."""
        self._phase = Phase.OTHER
        if self.transport.is_closing():
            return
        self.write_reply(render_error(err), close=True)
        self.transport.close()

    def write_reply(self, reply: Reply, close: bool) -> None:
        """Write a whole response in one ``write`` (uvicorn's default headers included)."""
        status, headers, payload = reply
        defaults = self.server_state.default_headers
        if defaults is not self._defaults_src:
            # uvicorn replaces the list (its Date header) once a second.
            self._defaults_src = defaults
            self._defaults = b"".join(b"%s: %s\r\n" % (n, v) for n, v in defaults)
        parts = [STATUS_LINE[status], self._defaults]
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
        if close:
            parts.append(b"connection: close\r\n")
        parts += (b"\r\n", payload)
        self.transport.write(b"".join(parts))
