"""Safe model updates benchmark: what shadows, capture and guardrails cost and how fast
they act, side by side in one run.

1. Production latency through the gateway (wrk, interleaved rounds, median round)
   at c=1 and c=64 on three endpoints of one gateway, all served by the same
   model server (a scikit-learn classifier): no shadow; a shadow variant copied
   100% of answered requests (its own model server); data capture at 100%
   (file:// destination). Targets: p50 +<= 0.05 ms at c=1, rps -<= 10% at c=64.
2. Rollback time (local mode, ``kubeinfer up -f``): blue serves at 50 rps; a
   canary (50%) whose green fleet fails every request comes up under an
   errorRate alarm (windowSeconds 10, minRequests 20). Measured from the moment
   the route table first sends traffic to green to the moment it sends all of
   it back to blue (the routes file the local gateway reloads, polled every
   20 ms). Target <= 30 s.
3. Pairs the disagreement alarm needs (local mode): a canary whose green flips
   5% of labels (random inputs, so each answer flips with probability 5%),
   alarm ``disagreement: 0.02`` (2 %) with ``minRequests`` = --min-pairs, every
   request mirrored. Reported: the compared pairs in the alarm's window when it
   tripped (``lastAlarmEvaluation.requests``), and the value it saw. Target
   <= 2,000.

    .venv/bin/python bench/guardrails.py [--duration 3] [--rounds 3] [--min-pairs 500]
                                         [--markdown]

It is never run as a test: speed is measured, not asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from examples.build_models import build_sklearn
from tests.support.onnx_models import add_3_model, identity_model, label_model

from bench.common import REPO, LoadResult, Server, free_port, start, wrk

SETUPS = ("no shadow", "shadow 100%", "capture 100%")
ENDPOINTS = {"no shadow": "plain", "shadow 100%": "shadowed", "capture 100%": "captured"}


# -- 1. overhead on the request path -------------------------------------------------------

def start_stack(model: Path, log_dir: Path) -> tuple[list[Server], str]:
    """Production and shadow model servers and one gateway; the gateway's base URL."""
    from kubeinfer_runtime.contract import EndpointRoute, RouteTable, VariantRoute
    from kubeinfer_runtime.contract.capture import CaptureRoute
    from kubeinfer_runtime.contract.shadow import ShadowRoute

    cmd = [sys.executable, "-m", "kubeinfer_runtime", "serve", "--role", "model-server"]
    servers: list[Server] = []
    for name in ("production", "shadow"):
        p = free_port()
        servers.append(start(name, cmd, {
            "KUBEINFER_HOST": "127.0.0.1", "KUBEINFER_PORT": str(p),
            "KUBEINFER_MODEL_URI": f"file://{model}", "KUBEINFER_MODEL_NAME": "m",
            "KUBEINFER_ENDPOINT_NAME": "bench", "KUBEINFER_VARIANT_NAME": name,
            "KUBEINFER_LOG_LEVEL": "warning"}, p, "/ping", log_dir))
    production, shadow = servers
    variants = [VariantRoute(name="primary", weight=1, upstreams=[production.url])]
    routes = log_dir / "routes.json"
    RouteTable(endpoints={
        "plain": EndpointRoute(name="plain", variants=variants),
        "shadowed": EndpointRoute(name="shadowed", variants=variants, shadows=[
            ShadowRoute(name="shadow", upstreams=[shadow.url], sampling_percentage=100)]),
        "captured": EndpointRoute(name="captured", variants=variants, capture=CaptureRoute(
            destination=f"file://{log_dir / 'capture'}", sampling_percentage=100)),
    }).write_atomic(routes)
    p = free_port()
    gw = start("gateway", [sys.executable, "-m", "kubeinfer_runtime", "serve", "--role",
                           "gateway"], {"KUBEINFER_HOST": "127.0.0.1", "KUBEINFER_PORT": str(p),
                                        "KUBEINFER_ROUTE_TABLE_PATH": str(routes),
                                        "KUBEINFER_LOG_LEVEL": "warning"},
               p, "/ping", log_dir)
    return [*servers, gw], gw.url


def overhead(args: argparse.Namespace, tmp: Path, console: Console,
             ) -> dict[tuple[str, int], list[LoadResult]]:
    model = build_sklearn(tmp / "sklearn.onnx")
    body = orjson.dumps({"instances": np.full((1, 4), 5.0, np.float32).tolist()})
    log_dir = tmp / "logs-overhead"
    log_dir.mkdir()
    servers, gateway = start_stack(model, log_dir)
    raw: dict[tuple[str, int], list[LoadResult]] = {}
    try:
        urls = {s: f"{gateway}/endpoints/{ENDPOINTS[s]}/invocations" for s in SETUPS}
        for url in urls.values():
            wrk(url, body, "application/json", 8, 1.0)  # warm up
        for c in (1, 64):
            for _ in range(args.rounds):
                for setup, url in urls.items():
                    raw.setdefault((setup, c), []).append(
                        wrk(url, body, "application/json", c, args.duration))
            for setup in SETUPS:
                results = raw[(setup, c)]
                res = median_round(results)
                console.log(f"{setup:14} c={c:<3} {res.rps:8.0f} rps p50 {res.p50_ms:.3f} ms "
                            f"p99 {res.p99_ms:.3f} ms errors {sum(r.errors for r in results)}")
    finally:
        for server in servers:
            server.stop()
    return raw


def median_round(results: list[LoadResult]) -> LoadResult:
    return sorted(results, key=lambda r: r.rps)[len(results) // 2]


# -- 2 and 3. local mode --------------------------------------------------------------------

class LocalMode:
    """``kubeinfer`` against one KUBEINFER_HOME."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.env = {**os.environ, "KUBEINFER_HOME": str(home)}

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "kubeinfer_operator.cli", *args],
                              env=self.env, capture_output=True, text=True, timeout=timeout,
                              cwd=REPO)

    def up(self, path: Path) -> None:
        result = self.run("up", "-d", "-f", str(path), "--timeout", "90", timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"kubeinfer up failed:\n{result.stdout}\n{result.stderr}")

    def _read(self, endpoint: str, which: str) -> dict[str, Any]:
        from kubeinfer_operator.local.paths import EndpointPaths

        paths = EndpointPaths.for_endpoint(endpoint, self.home)
        try:
            doc: dict[str, Any] = json.loads(getattr(paths, which).read_text())
        except (OSError, ValueError):
            return {}
        return doc

    def state(self, endpoint: str) -> dict[str, Any]:
        return self._read(endpoint, "state")

    def weights(self, endpoint: str) -> dict[str, float]:
        route = self._read(endpoint, "routes").get("endpoints", {}).get(endpoint, {})
        return {v["name"]: v["weight"] for v in route.get("variants", [])}

    def rollout(self, endpoint: str) -> dict[str, Any]:
        found: list[dict[str, Any]] = self.state(endpoint).get("rollouts") or [{}]
        return found[0]


def manifest(name: str, model: Path, alarm: str) -> str:
    return f"""\
apiVersion: kubeinfer.io/v1alpha1
kind: Endpoint
metadata:
  name: {name}
spec:
  variants:
    - name: primary
      replicas: 1
      model:
        uri: file://{model}
  deploymentConfig:
    blueGreen:
      trafficRouting:
        type: Canary
        canarySize: {{type: CapacityPercent, value: 50}}
        waitIntervalInSeconds: 600
    autoRollback:
      alarms:
{alarm}"""


class Paced:
    """Requests at ``rps`` (open loop on one client: a late request is sent at once)."""

    def __init__(self, url: str, rps: float, body: Callable[[], bytes]) -> None:
        self.url, self.rps, self.body = url, rps, body
        self.ok = 0
        self.errors = 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        interval = 1.0 / self.rps
        nxt = time.monotonic()
        with httpx.Client(timeout=10) as client:
            while not self.stopped.is_set():
                try:
                    r = client.post(self.url, content=self.body(),
                                    headers={"Content-Type": "application/json"})
                    if r.status_code == 200:
                        self.ok += 1
                    else:
                        self.errors += 1
                except httpx.HTTPError:
                    self.errors += 1
                nxt += interval
                self.stopped.wait(max(0.0, nxt - time.monotonic()))

    def __enter__(self) -> Paced:
        self.thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self.stopped.set()
        self.thread.join(10)


def wait(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.02) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return time.monotonic()
        time.sleep(interval)
    raise TimeoutError(f"{what}: not after {timeout:.0f} s")


@dataclass
class Rollback:
    seconds: float
    errors: int
    ok: int
    alarm: str


def rollback_time(local: LocalMode, tmp: Path, rps: float) -> Rollback:
    name = "guard-bad"
    path = tmp / f"{name}.yaml"
    alarm = ("        - {name: green-errors, errorRate: 0.1, windowSeconds: 10, "
             "minRequests: 20}\n")
    path.write_text(manifest(name, identity_model(tmp / "blue.onnx"), alarm))
    local.up(path)
    url = f"{local.state(name)['url']}/endpoints/{name}/invocations"
    with Paced(url, rps, lambda: b'{"instances": [1.0, 2.0]}') as load:
        wait(lambda: load.ok >= 10, 30, "blue answering")
        path.write_text(manifest(name, add_3_model(tmp / "bad.onnx"), alarm))
        local.up(path)
        t_green = wait(lambda: local.weights(name).get("primary-green", 0) > 0, 120,
                       "traffic on green")
        t_blue = wait(lambda: local.weights(name) == {"primary": 1.0}, 120,
                      "all traffic back on blue")
    got = local.rollout(name)
    evaluation = (got.get("lastAlarmEvaluation") or [{}])[0]
    return Rollback(t_blue - t_green, load.errors, load.ok, str(evaluation.get("message", "")))


@dataclass
class Pairs:
    pairs: int
    value: float
    seconds: float
    phase: str


def disagreement_pairs(local: LocalMode, tmp: Path, min_pairs: int, rps: float) -> Pairs:
    name = "guard-flip"
    path = tmp / f"{name}.yaml"
    alarm = (f"        - {{name: green-disagrees, disagreement: 0.02, windowSeconds: 600, "
             f"minRequests: {min_pairs}}}\n")
    path.write_text(manifest(name, label_model(tmp / "labels.onnx"), alarm))
    local.up(path)
    url = f"{local.state(name)['url']}/endpoints/{name}/invocations"
    rng = random.Random(0)
    with Paced(url, rps, lambda: b'{"instances": [%d]}' % rng.randrange(1_000_000)) as load:
        wait(lambda: load.ok >= 10, 30, "blue answering")
        path.write_text(manifest(name, label_model(tmp / "flips.onnx", 5), alarm))
        local.up(path)
        t_green = wait(lambda: local.weights(name).get("primary-green", 0) > 0, 120,
                       "traffic on green")
        t_back = wait(lambda: local.rollout(name).get("phase") in ("RolledBack", "Complete"),
                      60 + 3 * min_pairs / rps, "rolled back", interval=0.05)
    got = local.rollout(name)
    evaluation = (got.get("lastAlarmEvaluation") or [{}])[0]
    return Pairs(int(evaluation.get("requests") or 0),
                 100 * float(evaluation.get("value") or 0.0),  # the alarm's fraction, as %
                 t_back - t_green, str(got.get("phase")))


# -- the report -----------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=3.0, help="seconds per wrk measurement")
    ap.add_argument("--rounds", type=int, default=3,
                    help="interleaved rounds per cell; the median round is reported")
    ap.add_argument("--rps", type=float, default=50.0, help="load during the rollback (2.)")
    ap.add_argument("--min-pairs", type=int, default=500,
                    help="the disagreement alarm's minRequests (3.)")
    ap.add_argument("--pairs-rps", type=float, default=200.0, help="load during 3.")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: overhead, "
                                               "rollback, pairs")
    ap.add_argument("--markdown", action="store_true", help="also print markdown tables")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    console = Console()
    raw: dict[tuple[str, int], list[LoadResult]] = {}
    rollback: Rollback | None = None
    pairs: Pairs | None = None
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        if "overhead" not in skip:
            raw = overhead(args, tmp, console)
        if not {"rollback", "pairs"} <= skip:
            local = LocalMode(tmp / "home")
            try:
                if "rollback" not in skip:
                    rollback = rollback_time(local, tmp, args.rps)
                    console.log(f"rollback: {rollback.seconds:.1f} s ({rollback.alarm})")
                if "pairs" not in skip:
                    pairs = disagreement_pairs(local, tmp, args.min_pairs, args.pairs_rps)
                    console.log(f"disagreement: {pairs.phase} after {pairs.pairs} pairs "
                                f"({pairs.value:.2f}% disagreed, {pairs.seconds:.1f} s)")
            finally:
                local.run("down", "--all", timeout=120)

    rows = [(setup, c, median_round(raw[(setup, c)])) for c in (1, 64) for setup in SETUPS
            if (setup, c) in raw]
    table = Table(title="Production through the gateway (wrk, 1 thread; median of "
                        f"{args.rounds} interleaved rounds)")
    for col in ("endpoint", "c", "rps", "p50 ms", "p99 ms", "errors"):
        table.add_column(col, justify="left" if col == "endpoint" else "right")
    for setup, c, r in rows:
        table.add_row(setup, str(c), f"{r.rps:,.0f}", f"{r.p50_ms:.3f}", f"{r.p99_ms:.3f}",
                      str(r.errors))
    if rows:
        console.print(table)

    checks: list[str] = []
    for setup in SETUPS[1:]:
        base1, with1 = raw.get(("no shadow", 1)), raw.get((setup, 1))
        if base1 and with1:
            extra = sorted(w.p50_ms - b.p50_ms for w, b in zip(with1, base1, strict=True))
            checks.append(f"{setup}: p50 at c=1 +{statistics.median(extra):.3f} ms, median of "
                          f"{len(extra)} paired rounds (range {extra[0]:.3f}-{extra[-1]:.3f}; "
                          "target <= 0.05 ms)")
        base64, with64 = raw.get(("no shadow", 64)), raw.get((setup, 64))
        if base64 and with64:
            ratios = sorted(w.rps / b.rps for w, b in zip(with64, base64, strict=True))
            checks.append(f"{setup}: rps at c=64 {statistics.median(ratios) - 1:+.1%} vs no "
                          f"shadow, median of {len(ratios)} paired rounds (range "
                          f"{ratios[0] - 1:+.1%} to {ratios[-1] - 1:+.1%}; target >= -10%)")
    if rollback is not None:
        checks.append(f"rollback: green bad to all traffic on blue in {rollback.seconds:.1f} s "
                      f"at {args.rps:g} rps, 10 s window ({rollback.errors} error answers "
                      f"of {rollback.errors + rollback.ok}; target <= 30 s)")
    if pairs is not None:
        checks.append(f"disagreement: 5% label flip {pairs.phase} after {pairs.pairs:,} "
                      f"compared pairs ({pairs.value:.2f}% disagreed, threshold 2%, minRequests "
                      f"{args.min_pairs}; {pairs.seconds:.1f} s at {args.pairs_rps:g} rps; "
                      "target <= 2,000)")
    for line in checks:
        console.print(line)

    if args.markdown:
        if rows:
            print("\n| endpoint | c | rps | p50 ms | p99 ms | errors |")
            print("|---|---:|---:|---:|---:|---:|")
            for setup, c, r in rows:
                print(f"| {setup} | {c} | {r.rps:,.0f} | {r.p50_ms:.3f} | {r.p99_ms:.3f} | "
                      f"{r.errors} |")
        print()
        for line in checks:
            print(f"- {line}")


if __name__ == "__main__":
    main()
