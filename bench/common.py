"""Shared benchmark plumbing: start servers on free ports, drive them with wrk, parse results.

wrk (Debian package, installed by scripts/setup test) is the one load
generator for every server so the comparison is fair: python load generators
top out near 1.2-1.4k rps on these machines (FACTS.md).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    url: str

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def start(name: str, cmd: list[str], env: dict[str, str], port: int, ready_path: str,
          log_dir: Path, timeout: float = 60.0) -> Server:
    log = open(log_dir / f"{name}.log", "wb")  # noqa: SIM115 - owned by the child
    proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
                            cwd=REPO, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited: {(log_dir / f'{name}.log').read_text()}")
        try:
            if httpx.get(url + ready_path, timeout=1).status_code == 200:
                return Server(name, proc, url)
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{name} not ready after {timeout}s")


def uvicorn_cmd(app: str, port: int) -> list[str]:
    return [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port),
            "--loop", "uvloop", "--http", "httptools", "--no-access-log", "--log-level", "warning"]


@dataclass
class LoadResult:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _ms(value: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", value)
    if not m:
        raise ValueError(f"cannot parse wrk latency {value!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def wrk(url: str, body: bytes, content_type: str, connections: int, duration_s: float,
        headers: dict[str, str] | None = None) -> LoadResult:
    """POST ``body`` to ``url`` with wrk at a fixed number of connections."""
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: run scripts/setup test (apt-get install wrk)")
    with tempfile.TemporaryDirectory() as tmp:
        body_file = Path(tmp) / "body"
        body_file.write_bytes(body)
        extra = "".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in (headers or {}).items())
        script = Path(tmp) / "post.lua"
        script.write_text(
            'wrk.method = "POST"\n'
            f'local f = io.open("{body_file}", "rb")\nwrk.body = f:read("*all")\nf:close()\n'
            f'wrk.headers["Content-Type"] = "{content_type}"\n{extra}'
            "done = function(summary, latency, requests)\n"
            '  io.write(string.format("STATS %d %d %d %d %d\\n", summary.requests,'
            " summary.errors.status + summary.errors.connect + summary.errors.read +"
            " summary.errors.write + summary.errors.timeout, latency:percentile(50),"
            " latency:percentile(99), summary.duration))\n"
            "end\n"
        )
        out = subprocess.run(
            ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration_s))}s",
             "-s", str(script), url],
            capture_output=True, text=True, check=True,
        ).stdout
    m = re.search(r"STATS (\d+) (\d+) (\d+) (\d+) (\d+)", out)
    if not m:
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    requests, errors, p50_us, p99_us, dur_us = (int(x) for x in m.groups())
    return LoadResult(rps=requests / (dur_us / 1e6), p50_ms=p50_us / 1e3, p99_ms=p99_us / 1e3,
                      errors=errors)
