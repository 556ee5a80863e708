"""A ``LimitedHttpProtocol`` driven without a server: a transport whose write buffer
holds what a test says, and a connection whose app streams its answer forever. The send
checks (``http_limits._send_stalled``) are tested with it, in unit tests and, over a
real socket's kernel queue, in integration tests."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from uvicorn.config import Config
from uvicorn.server import ServerState

from kubeinfer_runtime.http_limits import LimitedHttpProtocol


class Buffered(asyncio.Transport):
    """A transport whose write buffer holds what the test says; records an abort."""

    def __init__(self) -> None:
        super().__init__()
        self.pending = 0
        self.aborted = False
        #: The socket ``get_extra_info`` gives (None: none, as in most of these tests).
        self.sock: socket.socket | None = None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 5000), "sockname": ("127.0.0.1", 8080),
                "socket": self.sock}.get(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None: ...

    def get_write_buffer_size(self) -> int:
        return self.pending

    def is_closing(self) -> bool:
        return self.aborted

    def abort(self) -> None:
        self.aborted = True

    close = abort

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


def answering() -> tuple[LimitedHttpProtocol, Buffered]:
    """A connection whose request is with an app that streams its answer forever."""
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await asyncio.Event().wait()

    config = Config(app, http=LimitedHttpProtocol, lifespan="off", access_log=False)
    proto = LimitedHttpProtocol(config, ServerState(), {}, asyncio.get_running_loop())
    transport = Buffered()
    proto.connection_made(transport)
    proto.data_received(b"GET /package HTTP/1.1\r\nHost: x\r\n\r\n")
    return proto, transport
