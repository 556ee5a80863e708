"""The agent's local front: a stable address in front of whichever model server is current.

Applications on the device call one address (``--listen``) for the whole life of
the device; versions come and go behind it. It speaks SageMaker's container
contract (``GET /ping``, ``POST /invocations``) and passes ``/v2/...`` (Open
Inference Protocol) through. Switching versions is one assignment
(``Proxy.upstream``): requests already sent to the old server finish there (it
stops gracefully), new ones go to the new one.

It also counts what the heartbeat reports (requests, errors, p99 latency over
the last ``LATENCY_WINDOW`` requests, last inference time) and samples
request/response pairs into the capture buffer. A plain ASGI app: no framework
is needed for three routes, and it keeps the agent's start fast.

Paths are checked as the proxy sees them (percent-decoded, ``scope["path"]``) and
forwarded encoded again, so the model server routes exactly the path the proxy
checked: control characters are refused (400; httpx cannot send them), and so are
``.`` and ``..`` segments (400), which the URL would otherwise resolve before
sending (``/v2/../ping`` reaching the model server's ``/ping``).
"""

from __future__ import annotations

import json
import logging
import random
import time
import urllib.parse
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import httpx

from kubeinfer_runtime.contract import REALTIME_MAX_PAYLOAD_BYTES
from kubeinfer_runtime.edge.capture_buffer import CaptureBuffer, capture_record

log = logging.getLogger("kubeinfer.edge.agent")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

LATENCY_WINDOW = 2048
UPSTREAM_TIMEOUT_S = 60.0
#: Idle pooled connections to the model server are dropped after this, seconds: well
#: inside its keep-alive timeout (5 s, KUBEINFER_HTTP_KEEPALIVE_TIMEOUT_S). httpx keeps
#: them 5 s too, so a request could go out on a connection the server was closing at
#: that moment: a ReadError, and the caller a 503 from a healthy device.
UPSTREAM_KEEPALIVE_S = 2.0
#: Request headers passed to the model server (the rest describe this hop only).
_FORWARD = {"content-type", "accept", "x-amzn-sagemaker-custom-attributes",
            "x-amzn-sagemaker-inference-id", "inference-header-content-length"}
_DROP_REPLY = {"content-length", "transfer-encoding", "connection", "keep-alive", "server",
               "date"}
#: Characters of a path sent as they are; every other one is percent-encoded (``?``, ``#``
#: and ``%`` among them: a decoded one must not start a query or a fragment upstream).
_PATH_SAFE = "/-._~!$&'()*+,;=:@"


def path_problem(path: str) -> str | None:
    """PURE: why a decoded request path cannot be forwarded, or None."""
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in path):
        return "holds a control character"
    if any(segment in (".", "..") for segment in path.split("/")):
        return "holds a '.' or '..' segment"
    return None


class Stats:
    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.last_inference_at = 0.0
        self._latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)

    def observe(self, seconds: float, failed: bool) -> None:
        self.requests += 1
        self.errors += failed
        self.last_inference_at = time.time()
        self._latencies.append(seconds)

    def p99_ms(self) -> float:
        if not self._latencies:
            return 0.0
        ordered = sorted(self._latencies)
        return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1000


class Proxy:
    def __init__(self, device_id: str, buffer: CaptureBuffer) -> None:
        self.device_id = device_id
        self.buffer = buffer
        self.upstream: str | None = None
        self.version = ""
        self.sampling_percentage = 0.0
        self.stats = Stats()
        # The model server child is on 127.0.0.1: never through the device's env proxy.
        self._client = httpx.AsyncClient(
            timeout=UPSTREAM_TIMEOUT_S, limits=httpx.Limits(keepalive_expiry=UPSTREAM_KEEPALIVE_S),
            trust_env=False)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        method: str = scope["method"]
        if path == "/ping" and method == "GET":
            if self.upstream is None:
                await _json(send, 503, {"message": "No model version is installed yet"})
            else:
                await _json(send, 200, {"status": "Healthy", "version": self.version})
            return
        problem = path_problem(path)
        if problem is not None:
            # Described, not quoted: the path is the caller's bytes.
            await _json(send, 400, {"message": f"Request path {problem}: send a plain path "
                                    "(/invocations, /ping or /v2/...)"})
            return
        if not ((path == "/invocations" and method == "POST") or path == "/v2"
                or path.startswith("/v2/")):
            await _json(send, 404, {"message": f"No route {method} {path[:100]}"})
            return
        body = await _read_body(receive, REALTIME_MAX_PAYLOAD_BYTES)
        if body is None:
            await _json(send, 413, {"message": "Request body is over "
                                    f"{REALTIME_MAX_PAYLOAD_BYTES} bytes"})
            return
        upstream = self.upstream
        if upstream is None:
            await _json(send, 503, {"message": "No model version is installed yet: the agent "
                                    "is waiting for the fleet's first version"})
            return
        inference = path == "/invocations" or path.endswith("/infer")
        await self._forward(scope, send, upstream, body, inference)

    async def _forward(self, scope: Scope, send: Send, upstream: str, body: bytes,
                       inference: bool) -> None:
        headers = {k.decode().lower(): v.decode("latin-1") for k, v in scope["headers"]}
        fwd = {k: v for k, v in headers.items() if k in _FORWARD}
        query = scope.get("query_string", b"").decode("latin-1")
        path = urllib.parse.quote(scope["path"], safe=_PATH_SAFE)
        url = upstream + path + (f"?{query}" if query else "")
        started = time.perf_counter()
        try:
            r = await self._client.request(scope["method"], url, content=body, headers=fwd)
        except httpx.InvalidURL:
            # What the path check let through and httpx still cannot send (a query string
            # with control characters): the caller's request, a 400.
            await _json(send, 400, {"message": "Request URL cannot be forwarded: send a "
                                    "plain path and query string"})
            return
        except httpx.HTTPError as e:
            if inference:
                self.stats.observe(time.perf_counter() - started, True)
            log.warning("Model server unreachable (%s)", type(e).__name__)
            await _json(send, 503, {"message": "The model server is unavailable: retry"})
            return
        if inference:
            self.stats.observe(time.perf_counter() - started, r.status_code >= 500
                               or r.status_code == 424)
            if r.status_code < 400 and self.sampling_percentage > 0 \
                    and random.random() * 100 < self.sampling_percentage:
                self.buffer.append(capture_record(
                    device_id=self.device_id, request=body,
                    request_type=headers.get("content-type", "application/octet-stream"),
                    response=r.content,
                    response_type=r.headers.get("content-type", "application/octet-stream")))
        reply = [(k.encode(), v.encode("latin-1")) for k, v in r.headers.items()
                 if k.lower() not in _DROP_REPLY]
        reply.append((b"content-length", str(len(r.content)).encode()))
        reply.append((b"x-kubeinfer-edge-version", self.version.encode()))
        await send({"type": "http.response.start", "status": r.status_code, "headers": reply})
        await send({"type": "http.response.body", "body": r.content})


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    parts: list[bytes] = []
    size = 0
    while True:
        msg = await receive()
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        parts.append(chunk)
        if not msg.get("more_body"):
            return b"".join(parts)


async def _json(send: Send, status: int, payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
