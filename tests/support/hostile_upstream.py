"""A hostile model server for gateway tests: answers the way a broken or malicious one does.

A raw asyncio HTTP/1.1 server (no framework would send these answers), run as a
process of its own. ``GET /ping`` answers 200; ``POST /invocations`` answers by
the ``mode=`` in ``X-Amzn-SageMaker-Custom-Attributes`` (so a gateway's
production variant, ``tests.support.fake_upstream``, answers the same request
normally while a shadow run by this server misbehaves):

* ``mode=huge``: a ``Content-Length`` of ``HOSTILE_HUGE_BYTES`` (512 MiB), written
  as fast as the socket takes it;
* ``mode=chunked``: chunked 1 MiB chunks without end;
* ``mode=headers``: 1 KiB headers without end, never a body;
* ``mode=big``: a whole answer of ``BIG`` (20 MiB, within the gateway's 24 MiB
  bound), for a caller that never reads it;
* ``mode=cookies``: a small JSON answer with headers no client should see from a
  model server (``Set-Cookie``, ``Connection: close``, ``X-Internal-Token``, ...);
* anything else: ``{"ok": 1}``.

Every request it reads is counted: ``GET /count`` answers the number of
``POST /invocations`` so far (a test checks a route never reached it).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from tests.support.orphans import die_with_parent
from tests.support.ports import free_port, http_ok, wait_until
from tests.support.procs import RuntimeProcess

REPO = Path(__file__).resolve().parent.parent.parent
HUGE = int(os.environ.get("HOSTILE_HUGE_BYTES", str(512 << 20)))
_CHUNK = b"0" * (1 << 20)
BIG = 20 << 20
_invocations = 0


def _mode(head: bytes) -> str:
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"x-amzn-sagemaker-custom-attributes":
            for part in value.decode("latin-1").split(","):
                key, _, val = part.strip().partition("=")
                if key == "mode":
                    return val
    return ""


async def _answer(head: bytes, writer: asyncio.StreamWriter) -> None:
    global _invocations
    if head.startswith(b"GET /ping"):
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
        return
    if head.startswith(b"GET /count"):
        out = b"%d" % _invocations
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(out), out))
        return
    _invocations += 1
    mode = _mode(head)
    if mode in ("huge", "big"):
        size = HUGE if mode == "huge" else BIG
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\n\r\n" % size)
        for _ in range(size // len(_CHUNK)):
            writer.write(_CHUNK)
            await writer.drain()
    elif mode == "chunked":
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                     b"transfer-encoding: chunked\r\n\r\n")
        while True:
            writer.write(b"%x\r\n%s\r\n" % (len(_CHUNK), _CHUNK))
            await writer.drain()
    elif mode == "headers":
        writer.write(b"HTTP/1.1 200 OK\r\n")
        i = 0
        while True:
            writer.write(b"x-h%d: %s\r\n" % (i, b"v" * 1024))
            i += 1
            if i % 64 == 0:
                await writer.drain()
    elif mode == "cookies":
        out = b'{"ok": 1}'
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                     b"set-cookie: session=stolen; Path=/\r\nx-internal-token: s3cr3t\r\n"
                     b"strict-transport-security: max-age=0\r\nserver: evil/1.0\r\n"
                     b"x-amzn-sagemaker-custom-attributes: echo\r\n"
                     b"content-length: %d\r\n\r\n%s" % (len(out), out))
    else:
        out = b'{"ok": 1}'
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\n\r\n%s" % (len(out), out))


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if length:
                await reader.readexactly(length)
            await _answer(head, writer)
            await writer.drain()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        pass
    finally:
        writer.close()


async def _main(port: int) -> None:
    server = await asyncio.start_server(_serve, "127.0.0.1", port, limit=1 << 20)
    async with server:
        await server.serve_forever()


def start_hostile_upstream(log_dir: Path, **env: str) -> RuntimeProcess:
    """Run this server on a free port; ready when /ping answers."""
    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"hostile-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.hostile_upstream", str(port)],
            env={**os.environ, **env}, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )
    rp = RuntimeProcess(proc, port, log_path)

    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"hostile upstream exited with {proc.returncode}:\n{rp.log()}")
        return http_ok(rp.url + "/ping")

    try:
        wait_until(up, 20, f"hostile upstream on port {port}")
    except BaseException:
        rp.stop()
        raise
    return rp


if __name__ == "__main__":
    asyncio.run(_main(int(sys.argv[1])))
