"""A small ASGI app served by uvicorn with kubeinfer's coalescing HTTP protocol.

tests/integration/test_http_protocol.py runs it as a real process
(``python -m tests.support.protocol_app PORT``) to check that
``kubeinfer_runtime.http_protocol`` keeps uvicorn's behaviour on every path:
fixed-length and streamed responses, HEAD, errors before and after the
response starts, ``Connection: close``, large bodies and pipelining.
"""

from __future__ import annotations

import sys
from typing import Any

import uvicorn

from kubeinfer_runtime.http_protocol import CoalescingHttpToolsProtocol

BIG = b"x" * (8 * 1024 * 1024)


def _head(length: int | None, extra: list[tuple[bytes, bytes]] | None = None) -> dict[str, Any]:
    headers = [(b"content-type", b"text/plain")] + (extra or [])
    if length is not None:
        headers.append((b"content-length", str(length).encode()))
    return {"type": "http.response.start", "status": 200, "headers": headers}


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    path = scope["path"]
    if path == "/fixed":
        await send(_head(5))
        await send({"type": "http.response.body", "body": b"hello"})
    elif path == "/echo":
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        await send(_head(len(body)))
        await send({"type": "http.response.body", "body": body})
    elif path == "/stream":
        await send(_head(None))
        for part in (b"one,", b"two,", b"three"):
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    elif path == "/pieces":  # fixed length, body in several messages
        await send(_head(6))
        await send({"type": "http.response.body", "body": b"abc", "more_body": True})
        await send({"type": "http.response.body", "body": b"def"})
    elif path == "/big":
        await send(_head(len(BIG)))
        await send({"type": "http.response.body", "body": BIG})
    elif path == "/close":
        await send(_head(3, [(b"connection", b"close")]))
        await send({"type": "http.response.body", "body": b"bye"})
    elif path == "/fail-before":
        raise RuntimeError("failed before the response started")
    elif path == "/fail-after":
        await send(_head(5))
        raise RuntimeError("failed after the response started")
    elif path == "/no-body":
        await send(_head(5))
    else:
        await send({"type": "http.response.start", "status": 404,
                    "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), loop="uvloop",
                http=CoalescingHttpToolsProtocol, access_log=False, log_level="warning")
