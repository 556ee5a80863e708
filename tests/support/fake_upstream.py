"""A fake *upstream* model server for gateway tests: echoes what reached it.

The real model server does not echo request headers, so the gateway's header
forwarding is checked against this small ASGI app, run as a real uvicorn
process (it stands in for a model server; none of kubeinfer's code runs in it).

    POST /invocations -> 200 JSON {"name", "headers", "body_len", "method", "path",
                                   "peer_port"} (the client's port: tells connections apart)
        custom attributes drive it: "sleep=S" waits S seconds first,
        "status=424" answers a SageMaker-style ModelError instead;
        the response echoes the custom attributes back as "echo:<value>".
    GET /ping        -> 200
    GET /in-flight   -> 200 JSON {"in_flight": N}: the POSTs being answered now, what a
                        test waits for before acting on a request held in the upstream
                        (a fixed sleep can end before a loaded machine has sent it)
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import httpx

from tests.support.orphans import die_with_parent
from tests.support.ports import http_ok, reserve_port, wait_until
from tests.support.procs import RuntimeProcess

REPO = Path(__file__).resolve().parent.parent.parent

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def _attributes(value: str) -> dict[str, str]:
    out = {}
    for part in value.split(","):
        key, _, val = part.strip().partition("=")
        out[key] = val
    return out


#: POST requests received and not yet answered (``GET /in-flight``).
_in_flight = 0


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    global _in_flight
    if scope["type"] != "http":
        return
    if scope["path"] == "/in-flight":
        out = json.dumps({"in_flight": _in_flight}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(out)).encode())]})
        await send({"type": "http.response.body", "body": out})
        return
    counted = scope["method"] == "POST"
    _in_flight += counted
    try:
        await _answer(scope, receive, send)
    finally:
        _in_flight -= counted


def in_flight(upstream: RuntimeProcess) -> int:
    """How many POSTs ``upstream`` (a fake upstream) is answering now."""
    r = httpx.get(upstream.url + "/in-flight", timeout=10)
    r.raise_for_status()
    return int(r.json()["in_flight"])


async def _answer(scope: Scope, receive: Receive, send: Send) -> None:
    body = b""
    while True:
        msg = await receive()
        body += msg.get("body", b"")
        if not msg.get("more_body"):
            break
    headers = {k.decode(): v.decode() for k, v in scope["headers"]}
    custom = headers.get("x-amzn-sagemaker-custom-attributes", "")
    attrs = _attributes(custom)
    if "sleep" in attrs:
        await asyncio.sleep(float(attrs["sleep"]))
    status = 200
    extra: list[tuple[bytes, bytes]] = []
    if scope["path"] == "/ping":
        out = b"{}"
    elif attrs.get("status") == "424":
        status = 424
        text = "Fake model failed on purpose"
        out = json.dumps({"ErrorCode": "ModelError", "Message": text, "message": text}).encode()
        extra.append((b"x-amzn-errortype", b"ModelError:"))
    else:
        out = json.dumps({"name": os.environ.get("FAKE_NAME", "fake"), "headers": headers,
                          "body_len": len(body), "method": scope["method"],
                          "path": scope["path"], "peer_port": scope["client"][1]}).encode()
    if custom:
        extra.append((b"x-amzn-sagemaker-custom-attributes", f"echo:{custom}".encode()))
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(out)).encode()),
        *extra]})
    await send({"type": "http.response.body", "body": out})


def start_fake_upstream(name: str, log_dir: Path, *, port: int | None = None,
                        timeout: float = 20.0) -> RuntimeProcess:
    """Run this app under uvicorn (on a free port unless given); ready when /ping answers."""
    # Held until the upstream answers (``ports.reserve_port``), unless it restarts on a port
    # its clients already know.
    reservation: socket.socket | None = None
    if port is None:
        reservation = reserve_port()
        port = int(reservation.getsockname()[1])
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"fake-{name}-{port}.log"
    env = {**os.environ, "FAKE_NAME": name}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "tests.support.fake_upstream:app",
             "--host", "127.0.0.1", "--port", str(port), "--loop", "uvloop",
             "--http", "httptools", "--no-access-log", "--timeout-graceful-shutdown", "5"],
            env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )
    rp = RuntimeProcess(proc, port, log_path)

    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"fake upstream exited with {proc.returncode}:\n{rp.log()}")
        return http_ok(rp.url + "/ping")

    try:
        wait_until(up, timeout, f"fake upstream {name} on port {port}")
    except BaseException:
        rp.stop()
        raise
    finally:
        if reservation is not None:
            reservation.close()
    return rp
