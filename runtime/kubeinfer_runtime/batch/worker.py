"""The ``work`` step: this worker's shards, each ending in a done marker.

A shard with a done marker (``_kubeinfer/done/<shard>.json``) is skipped: a
retried pod or a re-run job re-processes only the shards that were in flight when
it stopped. A shard's outputs are all written before its errors file and then
its marker, so a marker always means "every output of this shard is in place".
The model is loaded only when some shard is left to do.

Progress: the running :class:`~kubeinfer_runtime.contract.batch.WorkerReport`
goes to ``progress_file`` (atomically, at most twice a second, and at exit); the
final one to ``report_file`` (the termination log on Kubernetes).
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from kubeinfer_runtime.batch.errors import BadInput
from kubeinfer_runtime.batch.filters import DataProcessor
from kubeinfer_runtime.batch.invoke import Model, make_model
from kubeinfer_runtime.batch.plan import (
    confine,
    done_uri,
    errors_uri,
    output_folder,
    read_plan,
    state_uri,
)
from kubeinfer_runtime.batch.shard import Job, ShardRun, Tally
from kubeinfer_runtime.batch.store import Store
from kubeinfer_runtime.contract.batch import (
    BatchSettings,
    Shard,
    ShardPlan,
    WorkerReport,
    select_shards,
)

log = logging.getLogger("kubeinfer.batch")

#: Shortest time between two progress-file writes, seconds.
PROGRESS_INTERVAL_S = 0.5


def write_atomic(path: str, data: bytes) -> None:
    """Replace a local file at once (readers never see half of it)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".progress-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


class Progress:
    """The worker's counters, and the progress file they are written to."""

    def __init__(self, path: str | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self.clock = clock
        self.started = clock()
        self.tally = Tally()
        self.assigned = self.shards_started = self.done = self.skipped = 0
        self._last = -PROGRESS_INTERVAL_S

    def report(self, error: str = "") -> WorkerReport:
        t = self.tally
        return WorkerReport(shards_assigned=self.assigned, shards_started=self.shards_started,
                            shards_done=self.done, shards_skipped=self.skipped,
                            records=t.records, failed_records=t.failed, bytes_in=t.bytes_in,
                            bytes_out=t.bytes_out,
                            seconds=round(self.clock() - self.started, 3), error=error)

    def tick(self, force: bool = False) -> None:
        if self.path is None:
            return
        now = self.clock()
        if force or now - self._last >= PROGRESS_INTERVAL_S:
            self._last = now
            write_atomic(self.path, self.report().model_dump_json().encode())


def run_work(settings: BatchSettings, store: Store, progress: Progress,
             stop: threading.Event) -> WorkerReport:
    """Process this worker's shards; raises on the first failure (the caller reports it)."""
    plan = read_plan(settings, store)
    if plan is None:
        raise BadInput(f"No plan at {state_uri(settings, 'plan.json')}: run "
                       "`kubeinfer-runtime batch plan` for this job first")
    confine(settings, store)
    problems = settings.problems()
    if problems:
        raise BadInput("; ".join(problems))
    # Filters are compiled (and refused) before any model loads.
    processor = DataProcessor(settings) if settings.data_processing else None
    indexes = select_shards(settings.shards, len(plan.shards))
    progress.assigned = len(indexes)
    todo = []
    for index in indexes:
        if store.size(done_uri(settings, index)) is not None:
            progress.skipped += 1
        else:
            todo.append(index)
    progress.tick(force=True)
    if not todo:
        return progress.report()
    model = make_model(settings)
    try:
        model.start()
        settings = model.parameters.apply(settings)
        _run_shards(settings, store, plan_shards=[plan.shards[i] for i in todo], plan=plan,
                    model=model, processor=processor, progress=progress, stop=stop)
    finally:
        model.close()
    return progress.report()


def _run_shards(settings: BatchSettings, store: Store, *, plan_shards: list[Shard],
                plan: ShardPlan, model: Model, processor: DataProcessor | None,
                progress: Progress, stop: threading.Event) -> None:
    width = settings.effective_max_concurrent_transforms
    with ThreadPoolExecutor(width, thread_name_prefix="invoke") as pool, \
            ThreadPoolExecutor(8, thread_name_prefix="batch-io") as io_pool:
        job = Job(settings, plan, store, model, processor, output_folder(settings), pool,
                  io_pool, stop, progress.tally, progress.tick)
        # One shard ahead: the next shard is read and its first requests sent while the
        # previous one's last requests run (with one request in flight per shard, a
        # worker would otherwise alternate between reading and inferring). A worker
        # killed now re-does at most these two shards.
        previous: ShardRun | None = None
        for shard in plan_shards:
            progress.shards_started += 1
            progress.tick(force=True)
            run = ShardRun(job, shard)
            run.start()
            if previous is not None:
                _finish(previous, settings, store, progress)
            previous = run
        if previous is not None:
            _finish(previous, settings, store, progress)


def _finish(run: ShardRun, settings: BatchSettings, store: Store, progress: Progress) -> None:
    """Wait for a shard's last requests, then write its errors and its done marker."""
    report = run.finish()
    shard = run.shard
    try:
        if run.failures:
            run.failures.upload(store, errors_uri(settings, shard.index))
        else:
            store.delete(errors_uri(settings, shard.index))  # a stale one of a dead run
    finally:
        run.failures.close()
    store.write_bytes(done_uri(settings, shard.index), report.model_dump_json().encode(),
                      "application/json")
    progress.done += 1
    progress.tick(force=True)
    log.info("Shard %d done: %d records (%d failed) in %.1f s", shard.index,
             report.records, report.failed_records, report.seconds)
