"""Overload benchmark: 1,000 concurrent clients against a real-time endpoint's gateway.

One run, side by side: the same model server behind two gateways, one with
admission (the default: as many in flight as the model server finishes within
0.5 s, a wait of at most 1 s, 429 beyond) and one with it off
(``KUBEINFER_ADMISSION=false``, everything forwarded, as before). Two models:
iris (microseconds: the gateway's own CPU is the limit) and an MLP
512-2048-2048-10 (about a millisecond a request: the model server is the
limit and requests queue there). For each: a burst of wrk at c=1000, then
c=1 right after it to see how fast normal latency comes back.

    .venv/bin/python bench/overload.py [--duration 10] [--connections 1000] [--markdown]

Prints rps (2xx only and all), p50/p99/max latency (max = the longest any
request waited), answers by status code, the gateway's RSS before and after the
burst, and p50 at c=1 in the first second after it against before. Never a
test: speed is measured, not asserted.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from examples.build_models import build_mlp, build_sklearn

from bench.common import REPO, Server, free_port, start, wrk

#: name -> (builder, request body)
MODELS = {
    "iris": (build_sklearn, orjson.dumps({"instances": [[5.1, 3.5, 1.4, 0.2]]})),
    "mlp 512-2048-2048-10": (
        lambda path: build_mlp(path, sizes=(512, 2048, 2048, 10)),
        orjson.dumps({"instances": [[0.01] * 512]})),
}


@dataclass
class Burst:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    codes: dict[int, int]
    socket_errors: int

    @property
    def ok_rps(self) -> float:
        return sum(n for c, n in self.codes.items() if 200 <= c < 300) / self.seconds


def burst(url: str, body_bytes: bytes, connections: int, seconds: float) -> Burst:
    """wrk at ``connections``, counting answers by status (one thread: a thread per core
    would take the servers' cores)."""
    with tempfile.TemporaryDirectory() as tmp:
        body = Path(tmp) / "body"
        body.write_bytes(body_bytes)
        script = Path(tmp) / "burst.lua"
        script.write_text(
            'wrk.method = "POST"\n'
            f'local f = io.open("{body}", "rb")\nwrk.body = f:read("*all")\nf:close()\n'
            'wrk.headers["Content-Type"] = "application/json"\n'
            # Each wrk thread has its own Lua state: collect the threads, read theirs.
            "local threads = {}\n"
            "setup = function(thread) table.insert(threads, thread) end\n"
            "init = function(args) codes = {} end\n"
            "response = function(status, headers, body)\n"
            "  codes[status] = (codes[status] or 0) + 1\n"
            "end\n"
            "done = function(summary, latency, requests)\n"
            '  io.write(string.format("STATS %d %d %d %d %d %d\\n", summary.requests,'
            " summary.errors.connect + summary.errors.read + summary.errors.write +"
            " summary.errors.timeout, latency:percentile(50), latency:percentile(99),"
            " latency.max, summary.duration))\n"
            "  for _, t in ipairs(threads) do\n"
            "    for code, n in pairs(t:get(\"codes\")) do\n"
            "      io.write(string.format(\"CODE %d %d\\n\", code, n))\n"
            "    end\n"
            "  end\n"
            "end\n")
        out = subprocess.run(
            ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout",
             "30s", "-s", str(script), url],
            capture_output=True, text=True, check=True).stdout
    m = re.search(r"STATS (\d+) (\d+) (\d+) (\d+) (\d+) (\d+)", out)
    if not m:
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    requests, socket_errors, p50, p99, mx, dur = (int(x) for x in m.groups())
    codes = {int(c): int(n) for c, n in re.findall(r"CODE (\d+) (\d+)", out)}
    return Burst(requests, dur / 1e6, p50 / 1e3, p99 / 1e3, mx / 1e3, codes, socket_errors)


def rss_mb(server: Server) -> float:
    for line in Path(f"/proc/{server.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def scenario(tmpdir: Path, model_name: str, builder: Any, body: bytes,
             args: argparse.Namespace, console: Console) -> list[tuple[Any, ...]]:
    """One model server behind two gateways (admission on, off): each takes a burst."""
    from kubeinfer_runtime.contract import EndpointRoute, RouteTable, VariantRoute

    workdir = tmpdir / model_name.split()[0]
    workdir.mkdir()
    model = builder(workdir / "model.onnx")
    cmd = [sys.executable, "-m", "kubeinfer_runtime", "serve", "--role"]
    port = free_port()
    ms = start(f"model-server-{model_name.split()[0]}", [*cmd, "model-server"], {
        "KUBEINFER_HOST": "127.0.0.1", "KUBEINFER_PORT": str(port),
        "KUBEINFER_MODEL_URI": f"file://{model}", "KUBEINFER_LOG_LEVEL": "warning"},
        port, "/ping", workdir)
    routes = workdir / "routes.json"
    RouteTable(endpoints={"m": EndpointRoute(name="m", variants=[
        VariantRoute(name="main", weight=1, upstreams=[ms.url])])}).write_atomic(routes)
    gateways = {}
    for label, extra in (("admission on (default)", {}),
                         ("admission off", {"KUBEINFER_ADMISSION": "false"})):
        port = free_port()
        gateways[label] = start(f"gateway-{len(gateways)}", [*cmd, "gateway"], {
            "KUBEINFER_HOST": "127.0.0.1", "KUBEINFER_PORT": str(port),
            "KUBEINFER_ROUTE_TABLE_PATH": str(routes), "KUBEINFER_LOG_LEVEL": "warning",
            **extra}, port, "/ping", workdir)
    rows: list[tuple[Any, ...]] = []
    try:
        for label, gw in gateways.items():
            url = f"{gw.url}/endpoints/m/invocations"
            wrk(url, body, "application/json", 8, 1.0)  # warm up
            calm = wrk(url, body, "application/json", 1, 2.0)
            before = rss_mb(gw)
            result = burst(url, body, args.connections, args.duration)
            after_rss = rss_mb(gw)
            after = wrk(url, body, "application/json", 1, 1.0)
            rows.append((model_name, label, calm, result, before, after_rss, after))
            console.log(f"{model_name}, {label}: {result}")
    finally:
        for server in [*gateways.values(), ms]:
            server.stop()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=10.0, help="seconds of burst")
    ap.add_argument("--connections", type=int, default=1000)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    console = Console()
    rows: list[tuple[Any, ...]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for model_name, (builder, body) in MODELS.items():
            rows += scenario(Path(tmp), model_name, builder, body, args, console)

    table = Table(title=f"Overload: wrk -c{args.connections} for {args.duration:g}s, "
                        "gateway -> one model server (2-core VM)")
    for col in ("model", "gateway", "ok rps", "all rps", "p50 ms", "p99 ms", "max wait ms",
                "answers by code", "socket errors", "RSS MB before -> after",
                "c=1 p50 ms before -> 1st s after"):
        table.add_column(col)
    lines = []
    for model_name, label, calm, r, before, after_rss, after in rows:
        codes = ", ".join(f"{c}: {n}" for c, n in sorted(r.codes.items()))
        cells = (model_name, label, f"{r.ok_rps:,.0f}", f"{r.requests / r.seconds:,.0f}",
                 f"{r.p50_ms:.1f}", f"{r.p99_ms:.1f}", f"{r.max_ms:.0f}", codes,
                 str(r.socket_errors), f"{before:.0f} -> {after_rss:.0f}",
                 f"{calm.p50_ms:.3f} -> {after.p50_ms:.3f}")
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    console.print(table)
    if args.markdown:
        print("\n| " + " | ".join(c.header for c in table.columns) + " |")
        print("|" + "---|" * len(table.columns))
        print("\n".join(lines))
    _ = REPO


if __name__ == "__main__":
    main()
