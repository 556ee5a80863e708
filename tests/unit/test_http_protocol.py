"""The coalescing cycle writes a fixed-length response once, and nothing else changes.

Drives ``kubeinfer_runtime.http_protocol.CoalescingCycle`` with a recording
transport (no sockets): the count and content of ``write`` calls is the
whole point of the module. Behaviour over real sockets is covered by
tests/integration/test_http_protocol.py.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from kubeinfer_runtime.http_protocol import CoalescingCycle


class Transport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...


def cycle(cls: type[RequestResponseCycle], transport: Transport, *, method: str = "GET",
          keep_alive: bool = True) -> RequestResponseCycle:
    log = logging.getLogger("test")
    scope: Any = {"type": "http", "method": method, "path": "/", "http_version": "1.1"}
    return cls(scope=scope, transport=transport, flow=FlowControl(transport),  # type: ignore[arg-type]
               logger=log, access_logger=log, access_log=False,
               default_headers=[(b"server", b"test")], message_event=asyncio.Event(),
               expect_100_continue=False, keep_alive=keep_alive, on_response=lambda: None)


def start(length: int | None) -> Any:
    headers = [(b"content-type", b"text/plain")]
    if length is not None:
        headers.append((b"Content-Length", str(length).encode()))
    return {"type": "http.response.start", "status": 200, "headers": headers}


def body(data: bytes, more: bool = False) -> Any:
    return {"type": "http.response.body", "body": data, "more_body": more}


def run(cls: type[RequestResponseCycle], messages: list[Any], **kw: Any) -> Transport:
    transport = Transport()

    async def go() -> None:
        c = cycle(cls, transport, **kw)
        for m in messages:
            await c.send(m)
        assert c.response_complete

    asyncio.run(go())
    return transport


def test_fixed_length_response_is_one_write_with_the_same_bytes() -> None:
    messages = [start(5), body(b"hello")]
    stock = run(RequestResponseCycle, messages)
    ours = run(CoalescingCycle, messages)
    assert len(stock.writes) == 2
    assert ours.writes == [b"".join(stock.writes)]
    assert ours.writes[0].endswith(b"\r\n\r\nhello") and b"content-length: 5" in ours.writes[0]


def test_body_in_several_messages_flushes_the_head_with_the_first() -> None:
    messages = [start(6), body(b"abc", more=True), body(b"def")]
    stock = run(RequestResponseCycle, messages)
    ours = run(CoalescingCycle, messages)
    assert b"".join(ours.writes) == b"".join(stock.writes)
    assert len(ours.writes) == 2 and ours.writes[1] == b"def"


def test_responses_without_length_are_written_as_uvicorn_writes_them() -> None:
    messages = [start(None), body(b"one", more=True), body(b"")]
    assert run(CoalescingCycle, messages).writes == run(RequestResponseCycle, messages).writes


def test_head_request_and_connection_close() -> None:
    messages = [start(5), body(b"")]
    ours = run(CoalescingCycle, messages, method="HEAD", keep_alive=False)
    stock = run(RequestResponseCycle, messages, method="HEAD", keep_alive=False)
    assert ours.writes == [b"".join(stock.writes)] and ours.closed and stock.closed
    assert b"connection: close" in ours.writes[0]


def test_a_start_without_its_body_is_not_a_started_response() -> None:
    transport = Transport()

    async def go() -> None:
        c = cycle(CoalescingCycle, transport)
        await c.send(start(5))
        # uvicorn's run_asgi answers 500 only when the response has not started.
        assert not c.response_started and transport.writes == []

    asyncio.run(go())


def test_nothing_is_written_to_a_disconnected_client() -> None:
    transport = Transport()

    async def go() -> None:
        c = cycle(CoalescingCycle, transport)
        await c.send(start(5))
        c.disconnected = True
        await c.send(body(b"hello"))

    asyncio.run(go())
    assert transport.writes == []
