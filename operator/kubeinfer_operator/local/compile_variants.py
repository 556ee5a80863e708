"""Local mode's compile step of variants: ``model.compile`` runs before the model server.

On a cluster the compiler is an init container of each model-server pod
(``render.k8s_compile``); locally ``kubeinfer up`` runs the same
``kubeinfer-runtime compile`` once per such variant, before it hands the
endpoint to its supervisor, with the local artifact cache
(``$KUBEINFER_HOME/compile-cache/artifacts``, or the variant's own
``compile.cacheUri``): the artifact is keyed by content (model, this CPU,
versions, options), so a second ``up`` of the same spec reuses it in about a
second and the model servers are not restarted. The supervisor is then handed
the endpoint with that variant's model replaced by the artifact (``format:
compiled``), which it serves like any other; when nothing beat onnxruntime
fp32 the artifact is the ONNX model itself, and the outcome says why.
"""

from __future__ import annotations

import contextlib
import copy
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kubeinfer_operator.api.endpoint import Endpoint
from kubeinfer_operator.local.compile_state import compile_cache_root, read_report
from kubeinfer_operator.local.manifest import LoadedEndpoint
from kubeinfer_operator.local.paths import EndpointPaths
from kubeinfer_operator.local.process import spawn, stop_popen, tail
from kubeinfer_operator.reconcile.compile_status import outcome_text
from kubeinfer_operator.reconcile.transform_observe import detail
from kubeinfer_operator.render.compile_plan import compile_env
from kubeinfer_operator.render.plan import VariantCompile, plan_endpoint
from kubeinfer_runtime.contract import ENV_PREFIX
from kubeinfer_runtime.contract.compile import CompileReport

#: A compile with tuning can take long; past this, ``up`` gives up on the variant.
COMPILE_TIMEOUT_S = 4 * 3600


@dataclass(frozen=True)
class VariantOutcome:
    endpoint: str
    variant: str
    #: Where the compiler ran its step and wrote its log and report.
    log: Path
    report: CompileReport | None = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.report is not None and self.report.ok

    @property
    def served_uri(self) -> str:
        """What the model server serves: the artifact folder in place when it is local,
        else the tarball."""
        assert self.report is not None
        folder = self.report.artifact_dir_uri
        return folder if folder.startswith("file://") else self.report.artifact_uri

    def text(self) -> str:
        if self.report is None or not self.report.ok:
            return f"compiling failed: {self.error}"
        cached = " (from the artifact cache)" if self.report.artifact_cache_hit else ""
        return f"{outcome_text(self.report)}{cached}; serving {self.served_uri}"


def to_compile(item: LoadedEndpoint) -> list[tuple[int, str, VariantCompile]]:
    """(index, name, compile step) of the variants of ``item`` that compile (PURE)."""
    plan = plan_endpoint(item.endpoint, base_dir=item.base_dir)
    return [(i, v.name, v.compile) for i, v in enumerate(plan.variants)
            if v.compile is not None]


def compiler_env(step: VariantCompile, report: Path, work: Path,
                 home: Path | None = None) -> dict[str, str]:
    """The compiler's env for a variant: its settings, the artifact cache, local scratch."""
    values = {k: list(v) if isinstance(v, tuple) else v for k, v in step.settings().items()}
    cache = step.cache_uri or f"file://{compile_cache_root(home) / 'artifacts'}"
    env = compile_env({**values, "artifact_cache_uri": cache})
    return {**env, f"{ENV_PREFIX}REPORT_FILE": str(report),
            f"{ENV_PREFIX}WORK_DIR": str(work),
            f"{ENV_PREFIX}TUNING_CACHE_DIR": str(compile_cache_root(home) / "tuning")}


def run_compile(item: LoadedEndpoint, variant: str, step: VariantCompile, *,
                timeout_s: float = COMPILE_TIMEOUT_S,
                on_tick: Callable[[Path], None] | None = None) -> VariantOutcome:
    """Run the compiler for one variant, to its end; its outcome (never raises for a
    failed compile: the outcome says why). ``on_tick(log)`` is called while it runs."""
    folder = EndpointPaths.for_endpoint(item.name).root / "compile" / variant
    folder.mkdir(parents=True, exist_ok=True)
    log, report = folder / "compiler.log", folder / "report.json"
    report.unlink(missing_ok=True)
    env = {**os.environ, **compiler_env(step, report, folder / "work"),
           "COLUMNS": os.environ.get("COLUMNS", "160")}
    with open(log, "ab") as fh:
        fh.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} compile\n".encode())
    proc = spawn([sys.executable, "-m", "kubeinfer_runtime", "compile"], env=env, log_path=log)
    deadline = time.monotonic() + timeout_s
    try:
        while proc.poll() is None:
            if on_tick is not None:
                on_tick(log)
            if time.monotonic() > deadline:
                stop_popen(proc)
                return VariantOutcome(item.name, variant, log,
                                      error=f"it ran longer than {timeout_s:.0f} s; see {log}")
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(0.25)
    finally:
        if proc.poll() is None:  # interrupted: the compiler must not outlive ``up``
            stop_popen(proc)
    done = proc
    found = read_report(report)
    if done.returncode == 0 and found is not None and found.ok:
        return VariantOutcome(item.name, variant, log, report=found)
    said = (detail(report.read_text()) if report.is_file() else "") or detail(tail(log, 6))
    return VariantOutcome(item.name, variant, log, report=found,
                          error=f"{said or 'no report'} (exit code {done.returncode}; log: "
                                f"{log})")


def served(item: LoadedEndpoint, outcomes: dict[int, VariantOutcome]) -> LoadedEndpoint:
    """``item`` with each compiled variant's model replaced by its artifact (PURE)."""
    if not outcomes:
        return item
    document = copy.deepcopy(item.document)
    for index, outcome in outcomes.items():
        document["spec"]["variants"][index]["model"] = {"uri": outcome.served_uri,
                                                        "format": "compiled"}
    return LoadedEndpoint(Endpoint.model_validate(document), document, item.base_dir)
