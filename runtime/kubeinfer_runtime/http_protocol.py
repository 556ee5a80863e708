"""uvicorn's httptools protocol, writing a fixed-length response in one syscall.

Stock uvicorn writes a response's status line and headers as soon as the app
sends ``http.response.start``, then the body on ``http.response.body``: two
``send()`` calls per response. On loopback and in VMs each costs ~10-15 µs
(the kernel runs the receiver's TCP path inline), which was the largest single
piece of our model server's per-request cost after the model itself (profiled
with py-spy under ``bench/serving.py``'s c=64 MLP load; see
docs/benchmarks.md). Every hot-path response of ours declares its
Content-Length and arrives whole, so its head can wait for its body.

:class:`CoalescingHttpToolsProtocol` is passed to uvicorn as ``http=``. It
changes nothing else: responses without Content-Length (streaming, chunked)
are written as stock uvicorn writes them, and errors, HEAD, ``Connection:
close``, flow control and pipelining go through uvicorn's own code. It relies
on uvicorn's ``RequestResponseCycle`` internals (``transport``,
``response_started``, ``disconnected``; uvicorn is pinned in
requirements/constraints.txt) and tests/integration/test_http_protocol.py
exercises each of those paths against a real server.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn._types import ASGISendEvent
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle


class _Held:
    """Stands in for the transport while uvicorn writes a response: keeps the bytes."""

    __slots__ = ("chunks", "closed", "real")

    def __init__(self, real: asyncio.Transport) -> None:
        self.real = real
        self.chunks: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.chunks.append(data)

    def close(self) -> None:
        self.closed = True

    def __getattr__(self, name: str) -> Any:  # is_closing, get_extra_info, ...
        return getattr(self.real, name)


def _declares_length(message: ASGISendEvent) -> bool:
    headers: Any = message.get("headers", ())
    return any(name.lower() == b"content-length" for name, _ in headers)


class CoalescingCycle(RequestResponseCycle):
    """A request/response cycle that holds a fixed-length response's start for its body.

    Until the body comes nothing is written and, for uvicorn, the response has
    not started: an app that fails in between gets uvicorn's 500, not a
    connection closed after a head promising something else.
    """

    _start: ASGISendEvent | None = None

    async def send(self, message: ASGISendEvent) -> None:
        if message["type"] == "http.response.start" and not self.response_started:
            # A start replaces one still held: uvicorn's 500 after the app failed.
            self._start = None
            if _declares_length(message):
                self._start = message
                # What uvicorn's send(start) does that matters before the body:
                # a response under way means no "100 Continue" any more.
                self.waiting_for_100_continue = False
                return
            await super().send(message)
            return
        start = self._start
        if start is None:
            await super().send(message)
            return
        self._start = None
        real = self.transport
        held = _Held(real)
        self.transport = held  # type: ignore[assignment]
        try:
            await super().send(start)
            await super().send(message)
        finally:
            self.transport = real
        if not self.disconnected and held.chunks:
            real.write(b"".join(held.chunks))
        if held.closed:
            real.close()


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol whose request cycles are :class:`CoalescingCycle`."""

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        cycle = self.cycle
        # The cycle's task is created but has not run yet: switching its class
        # here changes which send() the app gets.
        if type(cycle) is RequestResponseCycle:
            cycle.__class__ = CoalescingCycle
