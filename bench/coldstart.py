"""Cold start: a fresh model-server process, and scale from zero in local mode.

**Fresh process** (first row): the time from starting a process to its first
answered inference request (a 200 to ``POST /invocations`` with the bench MLP),
for our model server (``python -m kubeinfer_runtime serve --role
model-server``, as a pod runs it) and for the bare ASGI app
(``bench/baselines/bare_asgi.py`` on uvicorn, which loads the model before it
listens). The two take turns, trial after trial (interleaved: this machine's
speed drifts), and the client polls each every 2 ms from the moment it
starts: connect, ``POST``, again after a refused connection or a 503. Also
reported for ours: when the port first answered ``/ping`` (503 while the model
loads: readiness stays honest) and when ``/ping`` turned 200. Every Kubernetes
pod pays this on each scale-from-zero and rollout. Our packages are
byte-compiled first, as an installed package is (``PYTHONDONTWRITEBYTECODE``
is set on the development machine, so otherwise every start would compile
them from source).

**Serverless, local mode**: runs a ``type: Serverless`` endpoint serving the
bench MLP with ``kubeinfer up`` (real supervisor, gateway and model-server
processes), waits until the variant has scaled to zero, then times one
request through the gateway. Each trial is split with the processes' own
metrics:

* **model load**: the new model server's ``kubeinfer_model_load_seconds``
  (onnxruntime session creation + warm-up);
* **first inference**: the gateway's upstream round trip of that request
  (``kubeinfer_gateway_upstream_latency_seconds``);
* **process start**: the rest: the activator's scale request, the supervisor
  spawning Python, importing the runtime, uvicorn binding its port, readiness
  detection (20 ms polls) and the gateway routing to it.

Model servers come from the supervisor's fork server (the runtime already
imported); ``--no-prefork`` measures plain process starts instead.

Usage: ``python -m bench.coldstart [--trials 5] [--no-prefork] [--only fresh|serverless]``.
Prints tables; not a test.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from examples.build_models import build_mlp
from prometheus_client.parser import text_string_to_metric_families

from bench.common import REPO, free_port, uvicorn_cmd

SPEC = """\
apiVersion: kubeinfer.io/v1alpha1
kind: Endpoint
metadata:
  name: cold
spec:
  type: Serverless
  serverless:
    maxConcurrency: 4
    idleTimeout: 1
  variants:
    - name: mlp
      model:
        uri: file://{model}
"""


def metric_sum(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def state(home: Path) -> dict[str, object]:
    doc: dict[str, object] = json.loads((home / "local" / "cold" / "state.json").read_text())
    return doc


def servers(home: Path) -> list[dict[str, object]]:
    procs = state(home)["processes"]
    assert isinstance(procs, list)
    return [p for p in procs if p["name"] != "gateway"]


def wait(pred: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if pred():  # type: ignore[operator]
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {what}")


def serverless(args: argparse.Namespace) -> None:
    """Scale from zero through the gateway in local mode (fork server or fresh processes)."""
    work = Path(tempfile.mkdtemp(prefix="kubeinfer-coldstart-"))
    home = work / "home"
    model = build_mlp(work / "mlp.onnx")
    spec = work / "cold.yaml"
    spec.write_text(SPEC.format(model=model))
    env = {**os.environ, "KUBEINFER_HOME": str(home), "KUBEINFER_AUTOSCALE_INTERVAL_S": "0.2",
           "KUBEINFER_LOCAL_PREFORK": "0" if args.no_prefork else "1"}
    cli = [sys.executable, "-m", "kubeinfer_operator.cli"]
    subprocess.run([*cli, "up", "-d", "-f", str(spec), "--timeout", "60"], env=env, check=True,
                   capture_output=True)
    rows: list[tuple[float, float, float, float]] = []
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, 256], "datatype": "FP32",
                                   "data": np.random.default_rng(0).random(256).tolist()}]})
    try:
        url = str(state(home)["url"])
        if not args.no_prefork:
            log = home / "local" / "cold" / "logs" / "prefork.log"
            wait(lambda: "prefork: ready" in log.read_text(), 60, "the fork server")
        with httpx.Client(timeout=60) as client:
            for _ in range(args.trials):
                wait(lambda: not servers(home), 30, "scale to zero")
                before = client.get(url + "/metrics").text
                started = time.perf_counter()
                r = client.post(url + "/endpoints/cold/invocations", content=body,
                                headers={"Content-Type": "application/json"})
                total = time.perf_counter() - started
                r.raise_for_status()
                after = client.get(url + "/metrics").text
                upstream = (metric_sum(after, "kubeinfer_gateway_upstream_latency_seconds_sum")
                            - metric_sum(before, "kubeinfer_gateway_upstream_latency_seconds_sum"))
                [server] = servers(home)
                text = client.get(f"http://127.0.0.1:{server['port']}/metrics").text
                load = metric_sum(text, "kubeinfer_model_load_seconds_sum", phase="load")
                load += metric_sum(text, "kubeinfer_model_load_seconds_sum", phase="download")
                rows.append((total, total - load - upstream, load, upstream))
    finally:
        subprocess.run([*cli, "down", "cold"], env=env, capture_output=True)
    how = "fresh processes" if args.no_prefork else "fork server"
    print(f"Cold start of the bench MLP ({model.stat().st_size // 1024} KiB ONNX), "
          f"{len(rows)} trials, local mode ({how}), {os.cpu_count()} CPUs")
    print(f"{'trial':>5} {'total ms':>9} {'process start ms':>17} {'model load ms':>14} "
          f"{'first inference ms':>19}")
    for i, (total, proc, load, infer) in enumerate(rows, 1):
        print(f"{i:>5} {total * 1e3:>9.0f} {proc * 1e3:>17.0f} {load * 1e3:>14.0f} "
              f"{infer * 1e3:>19.1f}")
    med = [statistics.median(col) for col in zip(*rows, strict=True)]
    print(f"{'p50':>5} {med[0] * 1e3:>9.0f} {med[1] * 1e3:>17.0f} {med[2] * 1e3:>14.0f} "
          f"{med[3] * 1e3:>19.1f}")


# ------------------------------------------------------------------ fresh process


@dataclass
class Start:
    """One fresh start: seconds from spawning the process to each milestone (None: never)."""

    first_answer: float
    #: Our server only: the first answer to /ping (any status), and the first 200.
    ping_any: float | None = None
    ping_ok: float | None = None


def _request(sock: socket.socket, raw: bytes) -> int:
    """Send one request on a keep-alive connection; the response's status (body read off)."""
    sock.sendall(raw)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        rest += chunk
    return int(head.split(b" ", 2)[1])


def post(path: str, body: bytes) -> bytes:
    """A keep-alive JSON ``POST`` as raw bytes."""
    return (b"POST %s HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(body), body))


def time_start(cmd: list[str], env: dict[str, str], port: int, request: bytes, log: Path,
               ping: bool, timeout: float = 60.0) -> Start:
    """Spawn ``cmd``; poll it every 2 ms until ``request`` (raw HTTP) is answered 200."""
    get_ping = b"GET /ping HTTP/1.1\r\nHost: bench\r\n\r\n"
    ping_any = ping_ok = None
    with open(log, "ab") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=out,
                                stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
    try:
        sock: socket.socket | None = None
        while time.perf_counter() - t0 < timeout:
            if proc.poll() is not None:
                raise SystemExit(f"{cmd} exited with {proc.returncode}: see {log}")
            try:
                if sock is None:
                    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if ping and ping_ok is None:
                    status = _request(sock, get_ping)
                    now = time.perf_counter() - t0
                    ping_any = now if ping_any is None else ping_any
                    ping_ok = now if status == 200 else None
                if _request(sock, request) == 200:
                    return Start(time.perf_counter() - t0, ping_any, ping_ok)
            except OSError:
                if sock is not None:
                    sock.close()
                sock = None
            time.sleep(0.002)
        raise SystemExit(f"{cmd} gave no answer in {timeout:.0f} s: see {log}")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def fresh(args: argparse.Namespace) -> None:
    """Fresh processes, ours and the bare ASGI app's, in turns: start to first answer."""
    for package in ("runtime", "operator"):
        compileall.compile_dir(REPO / package, quiet=1)
    work = Path(tempfile.mkdtemp(prefix="kubeinfer-fresh-"))
    model = build_mlp(work / "mlp.onnx")
    body = json.dumps({"instances": np.random.default_rng(0).random((1, 256)).tolist()}).encode()
    request = post("/invocations", body)
    ours_cmd = [sys.executable, "-m", "kubeinfer_runtime", "serve", "--role", "model-server"]
    rows: dict[str, list[Start]] = {"bare ASGI app (uvicorn)": [], "kubeinfer model server": []}
    for trial in range(args.trials):
        # Alternate who goes first: the second start of a pair finds a warmer page cache.
        order = list(rows) if trial % 2 == 0 else list(reversed(rows))
        for label in order:
            port = free_port()
            if label.startswith("bare"):
                start = time_start(uvicorn_cmd("bench.baselines.bare_asgi:app", port),
                                   {"BENCH_MODEL": str(model)}, port, request, work / "bare.log",
                                   ping=False)
            else:
                env = {"KUBEINFER_HOST": "127.0.0.1", "KUBEINFER_PORT": str(port),
                       "KUBEINFER_MODEL_URI": f"file://{model}", "KUBEINFER_MODEL_NAME": "m",
                       "KUBEINFER_LOG_LEVEL": "warning"}
                start = time_start(ours_cmd, env, port, request, work / "ours.log", ping=True)
            rows[label].append(start)
    bare, ours = rows.values()
    ratios = sorted(o.first_answer / b.first_answer for o, b in zip(ours, bare, strict=True))
    print(f"Fresh process: start to first answered request (bench MLP, "
          f"{model.stat().st_size // 1024} KiB ONNX), {args.trials} interleaved trials, "
          f"{os.cpu_count()} CPUs")
    print(f"{'process':<26} {'p50 ms':>7} {'min ms':>7} {'max ms':>7} "
          f"{'port answers /ping ms':>22} {'/ping 200 ms':>13}")
    lines = []
    for label, starts in rows.items():
        first = sorted(s.first_answer for s in starts)
        pings = [s.ping_any for s in starts if s.ping_any is not None]
        oks = [s.ping_ok for s in starts if s.ping_ok is not None]
        ping_col = f"{statistics.median(pings) * 1e3:.0f}" if pings else "-"
        ok_col = f"{statistics.median(oks) * 1e3:.0f}" if oks else "-"
        print(f"{label:<26} {statistics.median(first) * 1e3:>7.0f} {first[0] * 1e3:>7.0f} "
              f"{first[-1] * 1e3:>7.0f} {ping_col:>22} {ok_col:>13}")
        lines.append(f"| {label} | {statistics.median(first) * 1e3:.0f} | "
                     f"{first[0] * 1e3:.0f}-{first[-1] * 1e3:.0f} | {ping_col} | {ok_col} |")
    print(f"ours / bare: {statistics.median(ratios):.2f}x median of {len(ratios)} paired trials "
          f"(range {ratios[0]:.2f}-{ratios[-1]:.2f}x; target <= 1.5x)")
    if args.markdown:
        print("\n| process | p50 first answer ms | range ms | port answers /ping ms | "
              "/ping 200 ms |")
        print("|---|---:|---:|---:|---:|")
        print("\n".join(lines))
    print()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--no-prefork", action="store_true",
                        help="serverless: start model servers as fresh processes (no fork "
                             "server)")
    parser.add_argument("--only", choices=("fresh", "serverless"),
                        help="run one of the two benchmarks (default: both)")
    parser.add_argument("--markdown", action="store_true", help="also print markdown rows")
    args = parser.parse_args()
    if args.only != "serverless":
        fresh(args)
    if args.only != "fresh":
        serverless(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
