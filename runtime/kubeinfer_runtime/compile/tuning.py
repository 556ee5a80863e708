"""MetaSchedule tuning within a time budget, cached so a recompile runs no new trials.

Tuning records live in a folder per (model sha256, target, TVM and tvm-ffi
versions): the same model for the same target with the same compiler reuses
them, and records of one version are never applied by another. A batch size
that was tuned before (its ``tuned-b<N>.json`` marker exists) is not tuned
again: its records are re-applied, which takes seconds.

Three things make short budgets useful on a small machine, all measured here:

* an in-process builder: MetaSchedule's default ``LocalBuilder`` starts a fresh
  process pool for every batch of candidates, and each worker re-imports
  TVM's tensor intrinsics (~20 s a batch on 2 cores); building in this process
  costs milliseconds per candidate (measuring still runs in a separate runner
  process, so a bad kernel cannot take the compiler down);
* importing ``tvm.s_tir.tensor_intrin`` with ``inspect``'s module cache
  primed for importlib's frozen frames: TVMScript parsing calls
  ``inspect.stack()`` hundreds of times, and each call scanned every loaded
  module for those frames (16 s → 3.6 s);
* a deadline measure-callback that terminates every task once the budget is
  spent (MetaSchedule itself only counts trials; the round in flight still
  finishes, so a budget can be overrun by one round), and for budgets under a
  minute a small evolutionary population, small rounds and no learned cost
  model (training XGBoost on a few dozen trials costs seconds and learns
  nothing).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Trials per task when no trial cap is given (the budget ends tuning first).
DEFAULT_TRIALS_PER_TASK = 256
#: Budgets under this many seconds use a small evolutionary population.
SMALL_BUDGET_S = 60.0


@dataclass(frozen=True)
class TuneResult:
    #: New trials measured in this run (0 on a cache hit).
    trials: int
    seconds: float
    cache_hit: bool
    database_dir: Path


def cache_key(source_sha256: str, target: dict[str, object], versions: dict[str, str]) -> str:
    """The tuning cache folder name: model, target and compiler versions, hashed."""
    material = json.dumps({"model": source_sha256, "target": target,
                           "tvm": versions.get("tvm", ""),
                           "tvm_ffi": versions.get("tvm_ffi", "")}, sort_keys=True)
    return hashlib.sha256(material.encode()).hexdigest()[:32]


def marker(database_dir: Path, batch: int | None) -> Path:
    return database_dir / f"tuned-b{batch if batch is not None else 'static'}.json"


def _import_intrinsics() -> None:
    """``import tvm.s_tir.tensor_intrin`` quickly (see the module docstring)."""
    for name in ("importlib._bootstrap", "importlib._bootstrap_external"):
        path = os.path.normcase(os.path.abspath(f"<frozen {name}>"))
        inspect.modulesbyfile.setdefault(path, name)
    import tvm.s_tir.tensor_intrin  # noqa: F401


def _in_process_builder() -> Any:
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.s_tir.meta_schedule.builder.local_builder import default_build, default_export

    @derived_object
    class InProcessBuilder(PyBuilder):  # type: ignore[misc]
        def build(self, build_inputs: list[Any]) -> list[Any]:
            out = []
            for item in build_inputs:
                try:
                    lib = default_build(item.mod, item.target, None)
                    out.append(BuilderResult(default_export(lib), None))
                except Exception as e:  # a candidate schedule that does not build
                    out.append(BuilderResult(None, f"build failed: {e}"))
            return out

    return InProcessBuilder()


class TuningBudgetSpent(Exception):
    """Raised from MetaSchedule's measure callback when the budget is spent: its way out."""


def _deadline_callback(deadline: float, on_trials: Callable[[int], None]) -> Any:
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    @derived_object
    class Deadline(PyMeasureCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.trials = 0
            self.expired = False

        def apply(self, task_scheduler: Any, task_id: int, measure_candidates: Any,
                  builder_results: Any, runner_results: Any) -> None:
            self.trials += len(runner_results)
            on_trials(self.trials)
            if time.monotonic() < deadline:
                return
            # Stop by raising, not by terminating the tasks from here: the scheduler may
            # then pick a task this terminated ("Check failed: !task->is_terminated"),
            # which a 60 s budget on the bench MLP did every time. The records measured
            # so far are already in the database (its callback runs before this one).
            self.expired = True
            raise TuningBudgetSpent(f"tuning budget spent after {self.trials} trials")

    return Deadline()


def tune(mod: Any, target: Any, database_dir: Path, batch: int | None, *, budget_s: float,
         max_trials: int | None, seed: int = 0,
         on_trials: Callable[[int], None] = lambda n: None) -> TuneResult:
    """Tune ``mod``'s kernels into ``database_dir`` for at most ``budget_s`` seconds.

    A cache hit (this batch size was tuned into this folder before) runs no
    trial. ``on_trials`` hears the running trial count.
    """
    database_dir.mkdir(parents=True, exist_ok=True)
    done = marker(database_dir, batch)
    if done.is_file():
        return TuneResult(0, 0.0, True, database_dir)
    t0 = time.monotonic()
    _import_intrinsics()
    from tvm.s_tir import meta_schedule as ms

    # MetaSchedule logs every round to stdout: keep its console quiet (its files keep all).
    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)
    tasks = ms.relax_integration.extract_tasks(mod, target)
    if not tasks:
        done.write_text(json.dumps({"trials": 0, "tasks": 0}))
        return TuneResult(0, time.monotonic() - t0, False, database_dir)
    per_task = max_trials if max_trials is not None else DEFAULT_TRIALS_PER_TASK
    small = budget_s < SMALL_BUDGET_S
    strategy = (ms.search_strategy.EvolutionarySearch(
        population_size=64, init_measured_ratio=0.2, init_min_unmeasured=16,
        genetic_num_iters=2, genetic_max_fail_count=3) if small else "evolutionary")
    callback = _deadline_callback(t0 + budget_s, on_trials)
    try:
        _tune_relax(ms, mod, target, database_dir, tasks, per_task, small, strategy,
                    callback, seed)
    except Exception:
        if not callback.expired:
            raise
    trials = int(callback.trials)
    done.write_text(json.dumps({"trials": trials, "tasks": len(tasks),
                                "budget_s": budget_s}))
    return TuneResult(trials, time.monotonic() - t0, False, database_dir)


def _tune_relax(ms: Any, mod: Any, target: Any, database_dir: Path, tasks: Any, per_task: int,
                small: bool, strategy: Any, callback: Any, seed: int) -> None:
    ms.relax_integration.tune_relax(
        mod, {}, target, str(database_dir),
        max_trials_global=per_task * len(tasks),
        max_trials_per_task=per_task,
        num_trials_per_iter=min(8 if small else 64, per_task),
        builder=_in_process_builder(),
        runner=ms.runner.LocalRunner(evaluator_config=ms.runner.EvaluatorConfig(
            number=3, repeat=1, min_repeat_ms=20)),
        measure_callbacks=[*ms.measure_callback.MeasureCallback.create("default"), callback],
        # A cost model learns nothing from a few dozen trials; training it costs seconds.
        cost_model="random" if small else "xgb",
        strategy=strategy, seed=seed)
