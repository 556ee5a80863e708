"""Real-time serving benchmark: kubeinfer vs the limit and vs baselines, side by side.

One run measures, on the same models with the same load generator (wrk):
  * in-process onnxruntime (the limit; one thread, no HTTP),
  * a bare ASGI app (no framework; orjson, uvloop, httptools, 1 worker) — the
    issue's target baseline: our model server must reach >= 90% of it at c=64,
  * a minimal hand-written FastAPI + onnxruntime app,
  * our model server (``kubeinfer-runtime serve --role model-server``) direct
    (with ``--asgi-path``, also with its inline HTTP path switched off), through
    ``/invocations`` and through Open Inference Protocol V2
    (``POST /v2/models/m/infer``, JSON tensors; with ``--v2-binary`` also the
    binary tensor extension, as ``tritonclient`` sends by default),
  * our gateway -> model server (SageMaker Runtime API path), and the same hop to
    an endpoint that authenticates callers with SigV4 (each wrk run replays a
    request signed with botocore just before it; the gateway verifies every one
    in full, signing-key cache included).
Models: a small scikit-learn classifier (skl2onnx) and an MLP 256-512-512-10.

    .venv/bin/python bench/serving.py [--duration 3] [--rounds 3] [--concurrency 1,8,64]
                                      [--markdown] [--asgi-path] [--v2-binary]

It prints a table (rps, p50, p99) and the target checks. It is never run
as a test: speed is measured, not asserted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import orjson
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from examples.build_models import build_mlp, build_sklearn

from bench.common import REPO, LoadResult, Server, free_port, start, uvicorn_cmd, wrk


def inprocess(model: Path, x: np.ndarray, seconds: float) -> LoadResult:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    out = [sess.get_outputs()[0].name]
    for _ in range(200):
        sess.run(out, {name: x})
    lat: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        sess.run(out, {name: x})
        lat.append(time.perf_counter() - t0)
    lat.sort()
    return LoadResult(rps=len(lat) / sum(lat), p50_ms=statistics.median(lat) * 1e3,
                      p99_ms=lat[int(len(lat) * 0.99)] * 1e3, errors=0)


def start_servers(model: Path, log_dir: Path, asgi_path: bool = False,
                  v2_binary: bool = False) -> dict[str, tuple[Server, str]]:
    """name -> (server, invocation URL). The gateway is started last, in front of ours.

    ``asgi_path`` adds our model server with the inline HTTP path switched off
    (``KUBEINFER_INLINE_HTTP=false``): every request through uvicorn's ASGI path.
    """
    servers: dict[str, tuple[Server, str]] = {}
    env = {"BENCH_MODEL": str(model)}
    p = free_port()
    servers["bare ASGI"] = (start("bare-asgi", uvicorn_cmd("bench.baselines.bare_asgi:app", p),
                                  env, p, "/", log_dir, ), f"http://127.0.0.1:{p}/invocations")
    p = free_port()
    servers["FastAPI app"] = (start("fastapi", uvicorn_cmd("bench.baselines.fastapi_app:app", p),
                                    env, p, "/docs", log_dir), f"http://127.0.0.1:{p}/invocations")
    p = free_port()
    ms_env = {"KUBEINFER_HOST": "127.0.0.1", "KUBEINFER_PORT": str(p),
              "KUBEINFER_MODEL_URI": f"file://{model}", "KUBEINFER_MODEL_NAME": "m",
              "KUBEINFER_ENDPOINT_NAME": "bench", "KUBEINFER_VARIANT_NAME": "primary",
              "KUBEINFER_LOG_LEVEL": "warning"}
    cmd = [sys.executable, "-m", "kubeinfer_runtime", "serve", "--role", "model-server"]
    ms = start("model-server", cmd, ms_env, p, "/ping", log_dir)
    servers["kubeinfer model server"] = (ms, f"{ms.url}/invocations")
    servers[V2_LABEL] = (ms, f"{ms.url}/v2/models/m/infer")
    if v2_binary:
        servers[V2_BINARY_LABEL] = (ms, f"{ms.url}/v2/models/m/infer")
    if asgi_path:
        p = free_port()
        asgi = start("model-server-asgi", cmd, {**ms_env, "KUBEINFER_PORT": str(p),
                                                 "KUBEINFER_INLINE_HTTP": "false"},
                     p, "/ping", log_dir)
        servers["kubeinfer model server (ASGI path)"] = (asgi, f"{asgi.url}/invocations")

    from kubeinfer_runtime.contract import EndpointRoute, RouteTable, VariantRoute
    from kubeinfer_runtime.contract.auth import AuthMode, AuthRoute

    keys = log_dir / "keys"
    keys.mkdir()
    (keys / "AWS_ACCESS_KEY_ID").write_text(BENCH_KEY[0])
    (keys / "AWS_SECRET_ACCESS_KEY").write_text(BENCH_KEY[1])
    routes = log_dir / "routes.json"
    variants = [VariantRoute(name="primary", weight=1, upstreams=[ms.url])]
    RouteTable(endpoints={
        "bench": EndpointRoute(name="bench", variants=variants),
        "bench-sigv4": EndpointRoute(name="bench-sigv4", variants=variants, auth=AuthRoute(
            mode=AuthMode.SIGV4, credentials_dir=str(keys))),
    }).write_atomic(routes)
    p = free_port()
    gw_env = {"KUBEINFER_HOST": "127.0.0.1", "KUBEINFER_PORT": str(p),
              "KUBEINFER_ROUTE_TABLE_PATH": str(routes), "KUBEINFER_LOG_LEVEL": "warning"}
    gw = start("gateway", [sys.executable, "-m", "kubeinfer_runtime", "serve", "--role",
                           "gateway"], gw_env, p, "/ping", log_dir)
    servers["kubeinfer gateway -> server"] = (gw, f"{gw.url}/endpoints/bench/invocations")
    servers[SIGV4_LABEL] = (gw, f"{gw.url}/endpoints/bench-sigv4/invocations")
    return servers


BENCH_KEY = ("AKIAKUBEINFERBENCH01", "bench-secret-key-0123456789abcdefghijkl")
SIGV4_LABEL = "kubeinfer gateway (SigV4) -> server"
V2_LABEL = "kubeinfer model server, V2 JSON"
V2_BINARY_LABEL = "kubeinfer model server, V2 binary"


@dataclass(frozen=True)
class Request:
    """What wrk sends to one server: body, content type, extra headers."""

    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] | None = None


def requests_for(x: np.ndarray, input_name: str) -> dict[str, Request]:
    """The same inference as each protocol spells it (the V2 ones as stock clients send)."""
    v2 = {"name": input_name, "shape": list(x.shape), "datatype": "FP32"}
    header = orjson.dumps({"inputs": [{**v2, "parameters": {"binary_data_size": x.nbytes}}],
                           "parameters": {"binary_data_output": True}})
    return {
        "invocations": Request(orjson.dumps({"instances": x.tolist()})),
        V2_LABEL: Request(orjson.dumps({"inputs": [{**v2, "data": x.reshape(-1).tolist()}]})),
        V2_BINARY_LABEL: Request(header + x.astype("<f4").tobytes(), "application/octet-stream",
                                 {"Inference-Header-Content-Length": str(len(header))}),
    }


def load(label: str, url: str, requests: dict[str, Request], connections: int,
         seconds: float) -> LoadResult:
    """One wrk run of the request ``label`` sends (SigV4: signed just before it)."""
    req = requests.get(label, requests["invocations"])
    headers = (sigv4_headers(url, req.body, req.content_type) if label == SIGV4_LABEL
               else req.headers)
    return wrk(url, req.body, req.content_type, connections, seconds, headers)


def sigv4_headers(url: str, body: bytes, content_type: str) -> dict[str, str]:
    """Headers of ``url`` signed now, as boto3 signs InvokeEndpoint (valid 5 minutes)."""
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    request = AWSRequest(method="POST", url=url, data=body,
                         headers={"Content-Type": content_type})
    SigV4Auth(Credentials(*BENCH_KEY), "sagemaker", "us-east-1").add_auth(request)
    return {k: v for k, v in request.headers.items() if k.lower() != "content-type"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=3.0, help="seconds per measurement")
    ap.add_argument("--rounds", type=int, default=3,
                    help="interleaved rounds per cell; the median round is reported")
    ap.add_argument("--concurrency", default="1,8,64")
    ap.add_argument("--models", default="sklearn,mlp")
    ap.add_argument("--markdown", action="store_true", help="also print a markdown table")
    ap.add_argument("--asgi-path", action="store_true",
                    help="also measure our model server with the inline HTTP path off")
    ap.add_argument("--v2-binary", action="store_true",
                    help="also measure V2 with the binary tensor extension")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    console = Console()
    rows: list[tuple[str, str, int, LoadResult]] = []
    #: Every round of every cell, in round order: paired comparisons use them.
    raw: dict[tuple[str, str, int], list[LoadResult]] = {}

    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        models = {
            "sklearn": (build_sklearn(tmpdir / "sklearn.onnx"), np.full((1, 4), 5.0, np.float32),
                        "X"),
            "mlp": (build_mlp(tmpdir / "mlp.onnx"),
                    np.random.default_rng(0).standard_normal((1, 256)).astype(np.float32),
                    "input"),
        }
        for model_name in args.models.split(","):
            path, x, input_name = models[model_name]
            requests = requests_for(x, input_name)
            rows.append((model_name, "in-process onnxruntime (limit)", 1,
                         inprocess(path, x, args.duration)))
            log_dir = tmpdir / f"logs-{model_name}"
            log_dir.mkdir()
            servers = start_servers(path, log_dir, args.asgi_path, args.v2_binary)
            try:
                for label, (_, url) in servers.items():
                    # Warm up connection pools and caches before measuring.
                    load(label, url, requests, 8, 1.0)
                # Servers take turns within each round, and each cell reports its
                # median round: this VM's speed drifts over minutes, and measuring
                # one server after the other would compare different machines.
                for c in levels:
                    runs: dict[str, list[LoadResult]] = {label: [] for label in servers}
                    for _ in range(args.rounds):
                        for label, (_, url) in servers.items():
                            runs[label].append(load(label, url, requests, c, args.duration))
                    for label, results in runs.items():
                        raw[(model_name, label, c)] = results
                        res = sorted(results, key=lambda r: r.rps)[len(results) // 2]
                        rows.append((model_name, label, c, res))
                        console.log(f"{model_name:8} {label:30} c={c:<3} {res.rps:8.0f} rps "
                                    f"p50 {res.p50_ms:.3f} ms p99 {res.p99_ms:.3f} ms "
                                    f"errors {sum(r.errors for r in results)} "
                                    f"(rounds: {', '.join(f'{r.rps:.0f}' for r in results)})")
            finally:
                for server, _ in {id(s): (s, u) for s, u in servers.values()}.values():
                    server.stop()

    table = Table(title="Real-time serving (wrk, 1 thread; same machine; median of "
                        f"{args.rounds} interleaved rounds)")
    for col in ("model", "server", "c", "rps", "p50 ms", "p99 ms", "errors"):
        table.add_column(col, justify="right" if col not in ("model", "server") else "left")
    for model_name, label, c, r in rows:
        table.add_row(model_name, label, str(c), f"{r.rps:,.0f}", f"{r.p50_ms:.3f}",
                      f"{r.p99_ms:.3f}", str(r.errors))
    console.print(table)

    def cell(model: str, label: str, c: int) -> LoadResult | None:
        return next((r for m, lb, cc, r in rows if m == model and lb == label and cc == c), None)

    checks: list[str] = []
    top = max(levels)
    for model_name in args.models.split(","):
        # Paired by round: the two servers of a round ran back to back, so their
        # ratio is far steadier than a ratio of medians on this drifting VM.
        ours = raw.get((model_name, "kubeinfer model server", top))
        bare = raw.get((model_name, "bare ASGI", top))
        if ours and bare:
            ratios = sorted(o.rps / b.rps for o, b in zip(ours, bare, strict=True))
            checks.append(f"{model_name}: model server / bare ASGI at c={top}: "
                          f"{statistics.median(ratios):.0%} median of {len(ratios)} paired "
                          f"rounds (range {ratios[0]:.0%}-{ratios[-1]:.0%}; target >= 90%)")
        direct = raw.get((model_name, "kubeinfer model server", 1))
        via = raw.get((model_name, "kubeinfer gateway -> server", 1))
        if direct and via:
            hops = sorted(v.p50_ms - d.p50_ms for v, d in zip(via, direct, strict=True))
            checks.append(f"{model_name}: gateway hop at c=1 adds "
                          f"{statistics.median(hops):.3f} ms p50, median of {len(hops)} paired "
                          f"rounds (range {hops[0]:.3f}-{hops[-1]:.3f}; target <= 0.3 ms)")
        for label in (V2_LABEL, V2_BINARY_LABEL):
            v2 = raw.get((model_name, label, top))
            if v2 and ours:
                ratios = sorted(v.rps / o.rps for v, o in zip(v2, ours, strict=True))
                checks.append(f"{model_name}: {label.split(', ')[1]} / /invocations at c={top}: "
                              f"{statistics.median(ratios):.0%} median of {len(ratios)} paired "
                              f"rounds (range {ratios[0]:.0%}-{ratios[-1]:.0%}; target >= 90%)")
            if v2 and bare:
                ratios = sorted(v.rps / b.rps for v, b in zip(v2, bare, strict=True))
                checks.append(f"{model_name}: {label.split(', ')[1]} / bare ASGI at c={top}: "
                              f"{statistics.median(ratios):.0%} median of {len(ratios)} paired "
                              f"rounds (range {ratios[0]:.0%}-{ratios[-1]:.0%}; target >= 90%)")
        signed = raw.get((model_name, SIGV4_LABEL, 1))
        if signed and via:
            extra = sorted(s.p50_ms - v.p50_ms for s, v in zip(signed, via, strict=True))
            checks.append(f"{model_name}: SigV4 on the gateway adds "
                          f"{statistics.median(extra):.3f} ms p50 at c=1, median of "
                          f"{len(extra)} paired rounds (range {extra[0]:.3f}-{extra[-1]:.3f}; "
                          "target <= 0.1 ms)")
    for line in checks:
        console.print(line)

    if args.markdown:
        print("\n| model | server | c | rps | p50 ms | p99 ms | errors |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for model_name, label, c, r in rows:
            print(f"| {model_name} | {label} | {c} | {r.rps:,.0f} | {r.p50_ms:.3f} | "
                  f"{r.p99_ms:.3f} | {r.errors} |")
        print()
        for line in checks:
            print(f"- {line}")


if __name__ == "__main__":
    _ = REPO
    main()
