"""Edge fleet benchmark: one fleet server process, thousands of simulated devices.

Simulated devices are lightweight async clients speaking the agent's protocol
(register, heartbeat, "install" the desired version by reporting it on the next
heartbeat) — not full agents: the point is the fleet server's cost per device.
Each device heartbeats every ``--interval`` seconds (30 by default, as
``heartbeatIntervalSeconds`` defaults), its first beat spread over the interval.

Phases, printed as one table:

1. **steady**: every device registered and on version v1; heartbeat p50/p99/max
   over ``--steady`` seconds, the server's CPU (% of one core) and RSS.
2. **rollout**: v2 in 3 waves (10 %, 50 %, 100 %, no bake): seconds from the new
   FleetConfig until every device reports v2.
3. **rollback**: v3, which half of the devices fail to install: the first wave
   trips; seconds from the trip (status RolledBack) until every device that took
   v3 reports v2 again (the issue's bound: 2 heartbeat intervals).

    .venv/bin/python bench/edge_fleet.py [--devices 10000] [--interval 30] [--markdown]

Redis and the server are real processes on 127.0.0.1 (redis-server from PATH).
Never a test: speed is measured, not asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
from hdrh.histogram import HdrHistogram
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import REPO, free_port

TOKEN = "bench-bootstrap-token-0123456789"


def fake_version(name: str, tmp: Path) -> dict[str, object]:
    """A FleetVersion whose one package is a real file (simulated devices never fetch it)."""
    blob = tmp / f"{name}.tar.gz"
    blob.write_bytes(name.encode() * 100)
    sha = hashlib.sha256(blob.read_bytes()).hexdigest()
    return {"version": name, "packages": {"x86-64": {
        "uri": blob.as_uri(), "sha256": sha, "size": blob.stat().st_size,
        "signature": base64.b64encode(b"s" * 64).decode()}}}


def write_config(path: Path, current: dict[str, object], previous: dict[str, object] | None,
                 interval: int, waves: list[dict[str, object]]) -> None:
    config = {"name": "bench", "current": current, "previous": previous,
              "rollout": {"waves": waves, "onFailure": "Rollback",
                          "deviceDeploymentTimeoutSeconds": max(5, interval * 4)},
              "heartbeatIntervalSeconds": interval,
              "publicKey": base64.b64encode(b"k" * 32).decode()}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(config))
    os.replace(tmp, path)


class RawPool:
    """Keep-alive HTTP/1.1 connections over asyncio streams: a few µs of client CPU per
    request, where httpx's ~2 ms saturated the client's core at 200 requests/s and its
    queueing showed up as the server's latency."""

    def __init__(self, host: str, port: int, size: int) -> None:
        self.host, self.port = host, port
        self.free: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter] | None] = \
            asyncio.Queue()
        for _ in range(size):
            self.free.put_nowait(None)

    async def request(self, method: str, path: str, body: dict[str, object] | None,
                      token: str) -> tuple[int, bytes, float]:
        """(status, body, seconds from the request's first byte to its last answer byte)."""
        conn = await self.free.get()
        try:
            if conn is None:
                conn = await asyncio.open_connection(self.host, self.port)
            reader, writer = conn
            data = json.dumps(body).encode() if body is not None else b""
            head = (f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\n"
                    f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(data)}\r\n\r\n").encode()
            t0 = time.perf_counter()
            writer.write(head + data)
            status_line = await reader.readline()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            payload = await reader.readexactly(length)
            took = time.perf_counter() - t0
            self.free.put_nowait(conn)
            return int(status_line.split()[1]), payload, took
        except BaseException:
            if conn is not None:
                conn[1].close()
            self.free.put_nowait(None)
            raise


@dataclass
class Fleet:
    """Every simulated device's state, and the latency histogram of their heartbeats."""

    interval: float
    #: Versions a device fails to install (by device index parity: half of the fleet).
    failing: set[str] = field(default_factory=set)
    versions: dict[int, str] = field(default_factory=dict)
    hist: HdrHistogram = field(default_factory=lambda: HdrHistogram(1, 60_000_000, 3))
    errors: int = 0
    register_retries: int = 0
    recording: bool = False
    stop: bool = False


async def device(i: int, fleet: Fleet, pool: RawPool) -> None:
    device_id = f"dev-{i:05d}"
    while True:  # as an agent does: a refused registration is retried after a pause
        status, payload, _ = await pool.request(
            "POST", "/v1/register", {"deviceId": device_id, "target": "x86-64"}, TOKEN)
        if status == 200:
            break
        fleet.register_retries += 1
        await asyncio.sleep(random.uniform(0.5, 2.0))
    cred = json.loads(payload)["credential"]
    version, result = "", None
    await asyncio.sleep(random.uniform(0, fleet.interval))
    while not fleet.stop:
        body: dict[str, object] = {"version": version}
        if result is not None:
            body["lastDeployment"] = result
        try:
            status, payload, took = await pool.request(
                "POST", f"/v1/devices/{device_id}/heartbeat", body, cred)
            ok = status == 200
        except (OSError, asyncio.IncompleteReadError, ValueError):
            ok, took = False, 0.0
        if fleet.recording:
            if ok:
                fleet.hist.record_value(max(1, int(took * 1e6)))
            else:
                fleet.errors += 1
        if ok:
            desired = json.loads(payload).get("desired")
            want = desired["version"] if desired else None
            if want and want != version:
                # "Install": the next heartbeat reports the outcome, as an agent does.
                if want in fleet.failing and i % 2 == 0:
                    result = {"version": want, "outcome": "Failed", "message": "bench",
                              "at": time.time()}
                else:
                    version = want
                    result = {"version": want, "outcome": "Succeeded", "at": time.time()}
                fleet.versions[i] = version
                await asyncio.sleep(random.uniform(0.5, 1.0))
                continue
        await asyncio.sleep(fleet.interval * random.uniform(0.9, 1.1))


async def wait_until(pred: object, within: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < within:
        if pred():  # type: ignore[operator]
            return time.monotonic() - t0
        await asyncio.sleep(0.2)
    raise TimeoutError(f"not reached within {within:.0f} s")


async def status(client: httpx.AsyncClient, base: str) -> dict[str, object]:
    r = await client.get(f"{base}/v1/fleet", headers={"Authorization": f"Bearer {TOKEN}"})
    r.raise_for_status()
    return dict(r.json())


@dataclass
class Servers:
    tmp: Path
    config: Path
    base: str
    redis: subprocess.Popen[bytes]
    server: subprocess.Popen[bytes]
    versions: tuple[dict[str, object], ...]


def start_servers(interval: int) -> Servers:
    tmp = Path(tempfile.mkdtemp(prefix="kubeinfer-edge-bench-"))
    rport, sport = free_port(), free_port()
    redis = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port",
                              str(rport), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "yes", "--dir", str(tmp)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    config = tmp / "fleet.json"
    versions = tuple(fake_version(v, tmp) for v in ("v1", "v2", "v3"))
    write_config(config, versions[0], None, interval, [])
    env = {**os.environ, "KUBEINFER_HOST": "127.0.0.1", "KUBEINFER_PORT": str(sport),
           "KUBEINFER_FLEET_CONFIG_FILE": str(config),
           "KUBEINFER_REDIS_URL": f"redis://127.0.0.1:{rport}/0",
           "KUBEINFER_BOOTSTRAP_TOKEN": TOKEN, "KUBEINFER_LOG_LEVEL": "warning",
           "KUBEINFER_CONTROLLER_INTERVAL_SECONDS": "1"}
    with open(tmp / "server.log", "wb") as log:
        server = subprocess.Popen([str(REPO / ".venv/bin/python"), "-m", "kubeinfer_runtime",
                                   "serve", "--role", "fleet-server"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=log)
    return Servers(tmp, config, f"http://127.0.0.1:{sport}", redis, server, versions)


async def run(args: argparse.Namespace, servers: Servers) -> list[tuple[str, str]]:
    config, base, server = servers.config, servers.base, servers.server
    v1, v2, v3 = servers.versions
    rows: list[tuple[str, str]] = []
    fleet = Fleet(interval=args.interval, failing={"v3"})
    limits = httpx.Limits(max_connections=args.connections,
                          max_keepalive_connections=args.connections)
    try:
        async with httpx.AsyncClient(limits=limits, timeout=30) as client:
            await wait_until(lambda: _ping(base), 60)
            host, port = base.removeprefix("http://").split(":")
            pool = RawPool(host, int(port), args.connections)
            tasks = [asyncio.create_task(device(i, fleet, pool))
                     for i in range(args.devices)]
            n = args.devices
            took = await wait_until(lambda: sum(v == "v1" for v in fleet.versions.values())
                                    == n, args.interval * 4 + 120)
            rows.append(("devices registered and on v1", f"{n:,} in {took:.1f} s "
                         f"({fleet.register_retries} registrations retried)"))
            proc = psutil.Process(server.pid)
            proc.cpu_percent(None)
            fleet.recording = True
            await asyncio.sleep(args.steady)
            fleet.recording = False
            cpu = proc.cpu_percent(None)
            rss = proc.memory_info().rss / 2**20
            h = fleet.hist
            rows += [
                ("heartbeats measured (steady)", f"{h.get_total_count():,} "
                                                 f"({h.get_total_count() / args.steady:,.0f}/s),"
                                                 f" {fleet.errors} errors"),
                ("heartbeat p50 / p99 / max ms", f"{h.get_value_at_percentile(50) / 1000:.2f} / "
                                                 f"{h.get_value_at_percentile(99) / 1000:.2f} / "
                                                 f"{h.get_max_value() / 1000:.2f}"),
                ("fleet server CPU (steady)", f"{cpu:.0f}% of one core"),
                ("fleet server RSS", f"{rss:.0f} MiB"),
            ]
            waves = [{"percentage": 10, "maxFailurePercent": 5},
                     {"percentage": 50, "maxFailurePercent": 5},
                     {"percentage": 100, "maxFailurePercent": 5}]
            write_config(config, v2, v1, args.interval, waves)
            took = await wait_until(lambda: sum(v == "v2" for v in fleet.versions.values())
                                    == n, args.interval * 12 + 120)
            rows.append(("3-wave rollout v1 → v2, every device on v2", f"{took:.1f} s "
                         f"({took / args.interval:.1f} heartbeat intervals)"))
            write_config(config, v3, v2, args.interval, waves)
            t_trip = time.monotonic()
            while True:
                s = await status(client, base)
                rollout = s.get("rollout") or {}
                if isinstance(rollout, dict) and rollout.get("phase") == "RolledBack":
                    break
                if time.monotonic() - t_trip > args.interval * 8 + 120:
                    raise TimeoutError("the v3 rollout never tripped")
                await asyncio.sleep(0.2)
            tripped = time.monotonic()
            took_v3 = sum(v == "v3" for v in fleet.versions.values())
            back = await wait_until(lambda: all(v == "v2" for v in fleet.versions.values()),
                                    args.interval * 6 + 120)
            rows += [("v3 trip: from new config to RolledBack", f"{tripped - t_trip:.1f} s"),
                     ("rollback: devices that took v3 at the trip", f"{took_v3:,}"),
                     ("rollback: trip → every device back on v2",
                      f"{back:.1f} s ({back / args.interval:.2f} heartbeat intervals)")]
            fleet.stop = True
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    except BaseException:
        print((servers.tmp / "server.log").read_text()[-3000:], file=sys.stderr)
        raise
    return rows


def _ping(base: str) -> bool:
    try:
        return httpx.get(f"{base}/ping", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--interval", type=int, default=30)
    ap.add_argument("--steady", type=float, default=60.0, help="seconds of steady heartbeats")
    ap.add_argument("--connections", type=int, default=256)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    servers = start_servers(args.interval)
    try:
        rows = asyncio.run(run(args, servers))
    finally:
        for p in (servers.server, servers.redis):
            p.terminate()
            p.wait(10)
        shutil.rmtree(servers.tmp, ignore_errors=True)
    title = (f"{args.devices:,} simulated devices, heartbeat every {args.interval} s, one "
             "fleet server process")
    if args.markdown:
        print(f"{title}\n\n| measure | value |\n|---|---|")
        for k, v in rows:
            print(f"| {k} | {v} |")
        return
    table = Table(title=title)
    table.add_column("measure")
    table.add_column("value")
    for k, v in rows:
        table.add_row(k, v)
    Console().print(table)


if __name__ == "__main__":
    main()
