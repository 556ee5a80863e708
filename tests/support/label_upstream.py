"""A fake classifier for shadow tests: answers ``[label]`` for a CSV row ``i,...``.

The label is ``i % 3``. Environment knobs, each deterministic:

* ``FLIP_PERCENT=p``: rows with ``i % 100 < p`` get ``(i + 1) % 3`` instead (so over
  any run of consecutive ``i`` exactly p % of answers differ from production's);
* ``SLEEP_S=s``: wait s seconds before answering;
* ``STATUS=500``: answer 500 (a failing model server).

``GET /ping`` answers 200. Run under uvicorn by :func:`start_label_upstream`.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

from tests.support.orphans import die_with_parent
from tests.support.ports import http_ok, reserve_port, wait_until
from tests.support.procs import RuntimeProcess

REPO = Path(__file__).resolve().parent.parent.parent
FLIP = int(os.environ.get("FLIP_PERCENT", "0"))
SLEEP_S = float(os.environ.get("SLEEP_S", "0"))
STATUS = int(os.environ.get("STATUS", "200"))


async def app(scope: MutableMapping[str, Any],
              receive: Callable[[], Awaitable[MutableMapping[str, Any]]],
              send: Callable[[MutableMapping[str, Any]], Awaitable[None]]) -> None:
    if scope["type"] != "http":
        return
    body = b""
    while True:
        msg = await receive()
        body += msg.get("body", b"")
        if not msg.get("more_body"):
            break
    status = 200
    if scope["path"] == "/ping":
        out = b"{}"
    else:
        if SLEEP_S:
            await asyncio.sleep(SLEEP_S)
        i = int(body.split(b",", 1)[0] or b"0")
        label = (i + 1) % 3 if i % 100 < FLIP else i % 3
        out = b"[%d]" % label
        status = STATUS
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", b"%d" % len(out))]})
    await send({"type": "http.response.body", "body": out})


def start_label_upstream(name: str, log_dir: Path, **env: str) -> RuntimeProcess:
    """Run :func:`app` under uvicorn on a free port; ready when /ping answers."""
    reservation = reserve_port()  # held until it answers
    port = int(reservation.getsockname()[1])
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"label-{name}-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "tests.support.label_upstream:app",
             "--host", "127.0.0.1", "--port", str(port), "--loop", "uvloop",
             "--http", "httptools", "--no-access-log", "--timeout-graceful-shutdown", "1"],
            env={**os.environ, **env}, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent)
    rp = RuntimeProcess(proc, port, log_path)

    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"label upstream exited with {proc.returncode}:\n{rp.log()}")
        return http_ok(rp.url + "/ping")

    try:
        wait_until(up, 20, f"label upstream {name}")
    except BaseException:
        rp.stop()
        raise
    finally:
        reservation.close()
    return rp
