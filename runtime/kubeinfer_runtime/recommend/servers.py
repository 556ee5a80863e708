"""Measurers: a candidate's servers as local processes, or a Service's URLs (Kubernetes).

``LocalMeasurer`` starts ``replicas`` model-server processes per candidate
(``python -m kubeinfer_runtime serve --role model-server`` on free 127.0.0.1
ports, with the candidate's ``KUBEINFER_INTRA_OP_THREADS`` and
``KUBEINFER_WORKERS``; a cpu limit pins each replica to that many cores, rounded
up, as the closest local stand-in for a CFS quota), probes it, measures CPU and
memory of its process trees with psutil, and stops them. ``RemoteMeasurer``
only probes and loads ``candidate.urls`` (the Deployments the operator made).

Probe: the server must answer ``/ping`` and then one real request within the
start timeout; otherwise the candidate fails with its log's last lines, before
any load is spent on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from kubeinfer_runtime.contract.recommend import Candidate, RecommendRequest, StepResult
from kubeinfer_runtime.recommend import loadgen
from kubeinfer_runtime.recommend.search import CandidateFailed
from kubeinfer_runtime.recommend.stats import quantile

#: The model name the candidate servers serve under V2 (their metadata gives the payload).
MODEL_NAME = "model"
LOG_LINES = 15
#: In a /ping answer of a server whose model will never load (it never retries): the
#: candidate fails at once. Equal to ``kubeinfer_runtime.server.state.LOAD_FAILED_MARKER``
#: (not imported: that module pulls in onnxruntime; a unit test keeps them equal).
LOAD_FAILED = "failed to load"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def log_tail(path: Path, lines: int = LOG_LINES, max_bytes: int = 16384) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - max_bytes))
            data = fh.read()
    except OSError:
        return ""
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:])


def payload_from_metadata(meta: dict[str, Any]) -> str | None:
    """A one-row JSON request for a model whose one input is [N, k] or [k] numbers."""
    inputs = meta.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1:
        return None
    shape = inputs[0].get("shape")
    datatype = str(inputs[0].get("datatype", ""))
    if not isinstance(shape, list) or not shape or len(shape) > 2:
        return None
    k = shape[-1]
    if not isinstance(k, int) or not 0 < k <= 65536:
        return None
    value: float = 0.5 if datatype.startswith(("FP", "BF")) else 1
    row = [value] * k
    return json.dumps({"instances": [row] if len(shape) == 2 else row})


def cpu_sets(candidate: Candidate, cores: int) -> list[set[int]] | None:
    """Cores each replica is pinned to (round-robin), or None when it sets no cpu limit."""
    raw = candidate.resources.limits.get("cpu")
    if not raw:
        return None
    from kubeinfer_runtime.contract.recommend import quantity

    want = min(cores, max(1, math.ceil(quantity(raw) - 1e-9)))
    out = []
    nxt = 0
    for _ in range(candidate.replicas):
        out.append({(nxt + i) % cores for i in range(want)})
        nxt = (nxt + want) % cores
    return out


@dataclass
class _Running:
    procs: list[subprocess.Popen[bytes]]
    urls: list[str]
    logs: list[Path]
    client: loadgen.Client | None = None


def _tree(procs: Sequence[subprocess.Popen[bytes]]) -> list[psutil.Process]:
    out: list[psutil.Process] = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            parent = psutil.Process(p.pid)
            out += [parent, *parent.children(recursive=True)]
    return out


def _cpu_seconds(tree: Sequence[psutil.Process]) -> float:
    total = 0.0
    for p in tree:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def _rss(tree: Sequence[psutil.Process]) -> int:
    total = 0
    for p in tree:
        with contextlib.suppress(psutil.Error):
            total += int(p.memory_info().rss)
    return total


@dataclass
class BaseMeasurer:
    request: RecommendRequest
    running: dict[str, _Running] = field(default_factory=dict)
    payloads: list[bytes] = field(default_factory=list)

    def _client(self, urls: list[str]) -> loadgen.Client:
        load = self.request.load
        return loadgen.Client(urls, content_type=self.request.contentType,
                              max_connections=load.maxConnections,
                              timeout_s=load.timeoutSeconds)

    async def _probe(self, name: str, urls: list[str], deadline: float,
                     alive: Any = None) -> None:
        """Every URL answers /ping, then one request; raises CandidateFailed."""
        async with httpx.AsyncClient(timeout=5.0, trust_env=False) as http:  # in-cluster
            for url in urls:
                while True:
                    if alive is not None:
                        problem = alive()
                        if problem:
                            raise CandidateFailed(problem)
                    with contextlib.suppress(httpx.HTTPError):
                        ping = await http.get(url + "/ping")
                        if ping.status_code == 200:
                            break
                        if LOAD_FAILED in ping.text:
                            raise CandidateFailed(f"{name}: {url}/ping answered "
                                                  f"{ping.status_code}: {ping.text[:300]}")
                    if time.monotonic() > deadline:
                        raise CandidateFailed(f"{name}: {url}/ping not ready within "
                                              f"{self.request.startTimeoutSeconds:g} s")
                    await asyncio.sleep(0.1)
            if not self.payloads:
                self.payloads = [p.encode() for p in (self.request.payloads or [])]
            if not self.payloads:
                meta: dict[str, Any] = {}
                with contextlib.suppress(httpx.HTTPError, ValueError):
                    r = await http.get(f"{urls[0]}/v2/models/{MODEL_NAME}")
                    meta = r.json() if r.status_code == 200 else {}
                body = payload_from_metadata(meta)
                if body is None:
                    raise CandidateFailed(f"{name}: no payloads given and none can be made "
                                          "from the model's signature (one numeric input "
                                          "[N, k]); pass sample payloads")
                self.payloads = [body.encode()]
            for url in urls:
                try:
                    r = await http.post(url + "/invocations", content=self.payloads[0],
                                        headers={"Content-Type": self.request.contentType})
                except httpx.HTTPError as e:
                    raise CandidateFailed(f"{name}: probe request to {url} failed: "
                                          f"{type(e).__name__}") from e
                if not 200 <= r.status_code < 300:
                    raise CandidateFailed(f"{name}: probe request answered HTTP "
                                          f"{r.status_code}: {r.text[:300]}")

    async def step(self, candidate: Candidate, rate: float, seconds: float,
                   *, warmup: bool = False) -> StepResult:
        run = self.running[candidate.name]
        if run.client is None:
            run.client = self._client(run.urls)
        tree = _tree(run.procs)
        cpu0, t0 = _cpu_seconds(tree), time.monotonic()
        res = await loadgen.open_loop(run.client, self.payloads, rate=rate,
                                      duration_s=seconds, record=not warmup)
        elapsed = max(time.monotonic() - t0, 1e-9)
        tree = _tree(run.procs)
        cpu = (_cpu_seconds(tree) - cpu0) / elapsed * 100.0 if tree else 0.0
        return StepResult(
            targetRate=rate, achievedRate=round(res.achieved_rate, 2), seconds=seconds,
            requests=res.sent,
            errors=res.errors, p50=quantile(res.histogram, 0.5),
            p90=quantile(res.histogram, 0.9), p99=quantile(res.histogram, 0.99),
            p999=quantile(res.histogram, 0.999), cpuPercent=round(max(cpu, 0.0), 1),
            memoryBytes=_rss(tree), held=False)


@dataclass
class LocalMeasurer(BaseMeasurer):
    """Starts each candidate's replicas as local model-server processes."""

    log_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="kirec-")))
    cores: int = field(default_factory=lambda: len(os.sched_getaffinity(0)))

    def _env(self, cand: Candidate, port: int) -> dict[str, str]:
        compiled = cand.artifact == "compiled"
        uri = self.request.compiledModelUri if compiled else self.request.modelUri
        return {**os.environ, "KUBEINFER_HOST": "127.0.0.1", "KUBEINFER_PORT": str(port),
                "KUBEINFER_MODEL_URI": str(uri), "KUBEINFER_MODEL_NAME": MODEL_NAME,
                "KUBEINFER_MODEL_FORMAT": "compiled" if compiled else "onnx",
                "KUBEINFER_ENDPOINT_NAME": "recommend", "KUBEINFER_VARIANT_NAME": cand.name,
                "KUBEINFER_INTRA_OP_THREADS": str(cand.threads),
                "KUBEINFER_WORKERS": str(cand.workers), "KUBEINFER_LOG_LEVEL": "warning",
                "KUBEINFER_MODEL_CACHE_DIR": str(self.log_dir / "models"),
                "TVM_NUM_THREADS": str(cand.threads)}

    def _spawn(self, candidate: Candidate, run: _Running, index: int,
               pin: set[int] | None) -> None:
        port = free_port()
        log = self.log_dir / f"{candidate.name}-{index}.log"

        def _pin() -> None:
            if pin:
                os.sched_setaffinity(0, pin)

        with open(log, "wb") as fh:
            run.procs.append(subprocess.Popen(
                [sys.executable, "-m", "kubeinfer_runtime", "serve", "--role",
                 "model-server"], env=self._env(candidate, port), stdout=fh,
                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_pin))
        run.urls.append(f"http://127.0.0.1:{port}")
        run.logs.append(log)

    async def start(self, candidate: Candidate) -> None:
        pins = cpu_sets(candidate, self.cores)
        run = _Running(procs=[], urls=[], logs=[])
        self.running[candidate.name] = run
        for i in range(candidate.replicas):
            self._spawn(candidate, run, i, pins[i] if pins else None)

        def alive() -> str | None:
            for proc, log in zip(run.procs, run.logs, strict=True):
                if proc.poll() is not None:
                    return (f"{candidate.name}: model server exited with code "
                            f"{proc.returncode}; last lines of {log}:\n{log_tail(log)}")
            return None

        deadline = time.monotonic() + self.request.startTimeoutSeconds
        try:
            await self._probe(candidate.name, run.urls, deadline, alive)
        except CandidateFailed as e:
            tails = "\n".join(log_tail(p) for p in run.logs)
            msg = str(e) if "last lines" in str(e) else f"{e}; last lines of its log:\n{tails}"
            await self.stop(candidate)
            raise CandidateFailed(msg) from None

    async def stop(self, candidate: Candidate) -> None:
        run = self.running.pop(candidate.name, None)
        if run is None:
            return
        if run.client is not None:
            run.client.close()
        for proc in run.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in run.procs:
            try:
                await asyncio.to_thread(proc.wait, 10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await asyncio.to_thread(proc.wait)


@dataclass
class RemoteMeasurer(BaseMeasurer):
    """Loads the URLs the operator put in each candidate (its Service); starts nothing."""

    async def start(self, candidate: Candidate) -> None:
        urls = list(candidate.urls or [])
        if not urls:
            raise CandidateFailed(f"{candidate.name}: no URL to measure (candidate.urls)")
        self.running[candidate.name] = _Running(procs=[], urls=urls, logs=[])
        deadline = time.monotonic() + self.request.startTimeoutSeconds
        try:
            await self._probe(candidate.name, urls, deadline)
        except CandidateFailed:
            self.running.pop(candidate.name, None)
            raise

    async def stop(self, candidate: Candidate) -> None:
        run = self.running.pop(candidate.name, None)
        if run is not None and run.client is not None:
            run.client.close()
