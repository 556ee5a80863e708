"""uvicorn's httptools protocol, answering the clean inference request inline.

Through uvicorn, every request to an ASGI app builds a scope, a request/response
cycle object, an asyncio task and an Event, passes through the proxy-headers
middleware, awaits ``receive`` once and ``send`` twice (each header checked
against two regular expressions, head and body written separately) and arms a
timer. For a model that answers in a few µs that machinery is most of the
request. When the app (or one it wraps) is an :class:`InlineResponder`, this
protocol asks it, as soon as a request's headers are in, whether it can answer
that request on the spot; if so it collects the body in the parser callbacks
and writes the whole response in one ``write`` when the body is complete: no
task, no ASGI messages.

Only the clean case goes inline (HTTP/1.1 keep-alive, nothing in flight on the
connection, no ``Expect: 100-continue``, no upgrade, the socket writable, no
access log), and the responder itself accepts only requests it can finish on
the event loop with a declared body size within its limit. Everything else,
including every request it would answer with an error decided from the
headers, goes through uvicorn's ordinary path unchanged, so HTTP semantics,
pipelining order, flow control and graceful shutdown stay uvicorn's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import Any, Protocol, runtime_checkable

import uvicorn
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from kubeinfer_runtime.errors import Reply
from kubeinfer_runtime.http_limits import LimitedHttpProtocol

log = logging.getLogger("kubeinfer.http")

_INTERNAL_ERROR: Reply = (500, [(b"content-type", b"text/plain; charset=utf-8"),
                                (b"content-length", b"21")], b"Internal Server Error")


@runtime_checkable
class InlineResponder(Protocol):
    """An app that can answer some requests without ASGI, synchronously."""

    def inline_plan(self, method: bytes, url: bytes,
                    raw_headers: list[tuple[bytes, bytes]]) -> Any | None:
        """Called when the headers are in: a plan to answer inline, or None (ASGI path).

        ``url`` is the raw request target. Returning a plan commits the
        responder to answering it (and counting it) in :meth:`respond_inline`
        or :meth:`inline_abandoned`.
        """

    def respond_inline(self, plan: Any, body: bytes, t0: float,
                       url: bytes) -> Reply | Awaitable[Reply]:
        """The reply to a planned request, or an awaitable of it; neither ever raises.

        A reply is (status, headers including Content-Length, body). An
        awaitable (the gateway's hop to a model server) is awaited in a task
        while later requests on the connection wait their turn.
        """

    def inline_abandoned(self, plan: Any) -> None:
        """The client went away before sending the whole body of a planned request."""


def find_responder(app: object) -> InlineResponder | None:
    """The responder in uvicorn's middleware chain (each wraps the next as ``.app``)."""
    for _ in range(8):
        if isinstance(app, InlineResponder):
            return app
        app = getattr(app, "app", None)
        if app is None:
            break
    return None


#: The parts of uvicorn's protocol (0.54, in requirements/constraints.txt) the
#: inline path relies on besides the parser callbacks.
_UVICORN_PARTS = ("cycle", "pipeline", "tasks", "server_state", "headers", "parser", "loop",
                  "expect_100_continue", "on_response_complete",
                  "_unset_keepalive_if_required")
_warned = False


def _uvicorn_fits(protocol: HttpToolsProtocol) -> bool:
    """False (with one warning) if this uvicorn lacks a part the inline path uses."""
    global _warned
    missing = [name for name in _UVICORN_PARTS if not hasattr(protocol, name)]
    if missing and not _warned:
        _warned = True
        log.warning("uvicorn %s lacks %s: serving every request through ASGI (slower)",
                    uvicorn.__version__, ", ".join(missing))
    return not missing


class InlineHttpProtocol(LimitedHttpProtocol):
    """``uvicorn.run(..., http=InlineHttpProtocol)``: httptools with the connection limits
    of ``http_limits`` and, unless ``KUBEINFER_INLINE_HTTP=false``, the inline path."""

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._responder = (None if self.access_log or not self.limits.inline_http
                           or not _uvicorn_fits(self) else find_responder(self.app))
        #: The plan of the inline request being received, or None.
        self._plan: Any | None = None
        self._chunks: list[bytes] = []
        self._t0 = 0.0
        #: Shutdown arrived while an inline request was being received.
        self._close_after = False

    # -- parser callbacks

    def on_message_begin(self) -> None:
        # uvicorn builds the ASGI scope here; an inline request never needs it,
        # so it is built in on_headers_complete, only for the ASGI path. A
        # request has begun: the connection is not idle (a pipelined request
        # after an inline one must not be cut by the keep-alive timer).
        self.limits_message_begin()
        self._unset_keepalive_if_required()
        self.url = b""
        self.expect_100_continue = False
        self.headers = []

    def on_headers_complete(self) -> None:
        if not self.limits_headers_complete():
            return  # refused (too many or too large headers): no app sees it
        responder = self._responder
        if responder is not None and self._may_inline():
            plan = responder.inline_plan(self.parser.get_method(), self.url, self.headers)
            if plan is not None:
                self._plan = plan
                self._chunks = []
                self._t0 = time.perf_counter()
                return
        url, headers, expect = self.url, self.headers, self.expect_100_continue
        # uvicorn's own steps, not the limits' hooks again (they ran above).
        HttpToolsProtocol.on_message_begin(self)
        self.url, self.expect_100_continue = url, expect
        self.headers = self.scope["headers"] = headers
        HttpToolsProtocol.on_headers_complete(self)

    def on_body(self, body: bytes) -> None:
        if self._plan is not None:
            # The declared length (within the responder's limit) bounds this.
            self._chunks.append(body)
            return
        super().on_body(body)

    def on_message_complete(self) -> None:
        plan = self._plan
        if plan is None:
            super().on_message_complete()
            return
        self.limits_message_complete()
        self._plan = None
        chunks, self._chunks = self._chunks, []
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        assert self._responder is not None
        reply = self._responder.respond_inline(plan, body, self._t0, self.url)
        if isinstance(reply, tuple):
            self._finish(reply, close=self._close_after)
            return
        # The response is in flight: to uvicorn it is this connection's cycle,
        # so later (pipelined) requests queue behind it and shutdown waits.
        flight = _InFlight(keep_alive=not self._close_after)
        self.cycle = flight  # type: ignore[assignment]
        task = self.loop.create_task(self._answer_later(reply, flight))
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

    async def _answer_later(self, pending: Awaitable[Reply], flight: _InFlight) -> None:
        try:
            reply = await pending
        except BaseException as exc:  # the responder broke its contract; never hang
            log.error("Inline responder failed", exc_info=exc)
            reply, flight.keep_alive = _INTERNAL_ERROR, False
        flight.response_complete = True
        if flight.disconnected or self.transport.is_closing():
            return
        self._finish(reply, close=not flight.keep_alive)

    def _finish(self, reply: Reply, *, close: bool) -> None:
        self.write_reply(reply, close)
        if close:
            self.transport.close()
        # Starts the next pipelined request, or arms the keep-alive timer.
        self.on_response_complete()

    # -- connection events

    def connection_lost(self, exc: Exception | None) -> None:
        plan, self._plan = self._plan, None
        if plan is not None and self._responder is not None:
            self._responder.inline_abandoned(plan)
        super().connection_lost(exc)

    def shutdown(self) -> None:
        if self._plan is not None:
            # A request is half received: answer it, then close (as uvicorn does
            # for a request in flight).
            self._close_after = True
            return
        super().shutdown()

    # -- helpers

    def _may_inline(self) -> bool:
        cycle = self.cycle
        return ((cycle is None or cycle.response_complete) and not self.pipeline
                and not self.expect_100_continue and not self.flow.write_paused
                and not self._close_after and self.parser.should_keep_alive()
                and self.parser.get_http_version() == "1.1"
                and not self.parser.should_upgrade())

class _InFlight:
    """An inline response being computed, standing in for uvicorn's request cycle.

    uvicorn reads and writes these attributes of ``protocol.cycle``: a request
    arriving while ``response_complete`` is False is queued; ``shutdown``
    clears ``keep_alive``; a lost connection sets ``disconnected`` and the
    ``message_event``.
    """

    __slots__ = ("disconnected", "keep_alive", "response_complete")

    def __init__(self, keep_alive: bool) -> None:
        self.response_complete = False
        self.keep_alive = keep_alive
        self.disconnected = False

    @property
    def message_event(self) -> _NoEvent:
        return _NoEvent()


class _NoEvent:
    """Nobody waits on an inline request's body events."""

    def set(self) -> None: ...
