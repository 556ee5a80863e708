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
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

from tests.support.orphans import die_with_parent
from tests.support.ports import free_port, http_ok, wait_until
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


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
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
    port = port or free_port()
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
    return rp
