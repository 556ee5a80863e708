"""``kubeinfer-runtime batch plan|work|finalize``: settings, the step, its report.

Each step reads ``BatchSettings`` from the environment (refused with the same
readable message as ``serve``, exit ``EXIT_BAD_INPUT``: retrying cannot fix
settings), runs, writes its report (``PlanReport``, ``WorkerReport``,
``JobSummary``; at most 4 KiB) to ``report_file`` — the termination log on
Kubernetes; skipped, with a debug line, where it cannot be written — and exits
with the contract's codes: 0, ``EXIT_BAD_INPUT`` (42), ``EXIT_MODEL_FAILED`` (43),
``EXIT_STOPPED`` (143, SIGTERM) or 1 (retry).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable

from pydantic import BaseModel
from pydantic import ValidationError as SettingsError

from kubeinfer_runtime.batch.errors import BadInput, exit_code, short
from kubeinfer_runtime.batch.store import Store
from kubeinfer_runtime.contract import ENV_PREFIX
from kubeinfer_runtime.contract.batch import (
    EXIT_BAD_INPUT,
    EXIT_STOPPED,
    TERMINATION_LOG,
    BatchSettings,
    JobSummary,
    PlanReport,
    WorkerReport,
)
from kubeinfer_runtime.errors import RuntimeServiceError

log = logging.getLogger("kubeinfer.batch")

STEPS = ("plan", "work", "finalize")
#: What Kubernetes keeps of a termination message.
MAX_REPORT_BYTES = 4096


def write_report(path: str, report: BaseModel) -> None:
    data = report.model_dump_json().encode()
    if len(data) > MAX_REPORT_BYTES and hasattr(report, "error"):
        data = report.model_copy(update={"error": short(str(report.error), 1000)}
                                 ).model_dump_json().encode()
    try:
        with open(path, "wb") as f:
            f.write(data[:MAX_REPORT_BYTES])
    except OSError as e:
        log.debug("Report not written to %s (%s)", path, e.strerror)


def _settings_error(e: SettingsError) -> str:
    def env(loc: tuple[int | str, ...]) -> str:
        name = "_".join(str(p) for p in loc).upper()
        return name if name.startswith(ENV_PREFIX) or "_INDEX" in name else ENV_PREFIX + name

    problems = "; ".join(f"{env(err['loc']) if err['loc'] else 'settings'}: {err['msg']}"
                         for err in e.errors())
    return f"Invalid batch settings ({problems}): set the environment variables"


def run(step: str) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        settings = BatchSettings()
    except SettingsError as e:
        message = _settings_error(e)
        print(message, file=sys.stderr)
        # The report still goes where Kubernetes (or local mode) reads it.
        path = os.environ.get(ENV_PREFIX + "REPORT_FILE", TERMINATION_LOG)
        report: BaseModel = (WorkerReport(error=short(message, 1000)) if step == "work" else
                             JobSummary(failed=True, reason="InvalidSettings",
                                        message=short(message, 1500)) if step == "finalize"
                             else PlanReport(shards=0, objects=0, bytes=0))
        write_report(path, report)
        return EXIT_BAD_INPUT
    logging.getLogger().setLevel(settings.log_level.upper())
    if settings.start_gate and not wait_for_gate(step, settings):
        return EXIT_STOPPED
    steps: dict[str, Callable[[BatchSettings], int]] = {
        "plan": _plan, "work": _work, "finalize": _finalize}
    return steps[step](settings)


def wait_for_gate(step: str, settings: BatchSettings) -> bool:
    """Import what ``step`` will use, then wait for the runner's word on stdin: True
    on a line (go on), False on EOF (the runner no longer needs this process).

    Only imports happen before the gate: a model is loaded (and can fail) only once
    the step runs, as without a gate.
    """
    if step == "work":
        import kubeinfer_runtime.batch.worker

        if settings.model_uri and settings.model_url is None and settings.pipeline is None:
            from kubeinfer_runtime.models.registry import create_backend

            # The backend's module and its runtime (onnxruntime, NumPy), not the model.
            with contextlib.suppress(Exception):
                create_backend(settings.model_format)
    elif step == "finalize":
        import kubeinfer_runtime.batch.finalize
    else:
        import kubeinfer_runtime.batch.plan  # noqa: F401
    try:
        return bool(sys.stdin.buffer.readline())
    except (OSError, ValueError, AttributeError):
        return False  # no stdin to wait on: nobody can open the gate


def _store(settings: BatchSettings) -> Store:
    from kubeinfer_runtime.batch.plan import input_root, output_folder

    return Store(settings.s3(), file_roots=[input_root(settings), output_folder(settings)])


def _failed(settings: BatchSettings, e: BaseException, report: BaseModel | None = None) -> int:
    message = e.message if isinstance(e, RuntimeServiceError) else f"{type(e).__name__}: {e}"
    if not isinstance(e, RuntimeServiceError):
        log.error("Batch step failed unexpectedly", exc_info=e)
    else:
        log.error("%s", message)
    if report is not None and hasattr(report, "error"):
        write_report(settings.report_file, report.model_copy(update={"error": short(message,
                                                                                     1000)}))
    else:
        print(short(message, 1000), file=sys.stderr)
    return exit_code(e)


def _plan(settings: BatchSettings) -> int:
    from kubeinfer_runtime.batch.plan import make_plan

    try:
        store = _store(settings)
        problems = settings.problems()
        if problems:
            raise BadInput("; ".join(problems))
        plan = make_plan(settings, store)
    except Exception as e:
        code = _failed(settings, e)
        write_report(settings.report_file, PlanReport(shards=0, objects=0, bytes=0))
        return code
    report = PlanReport(shards=len(plan.shards), objects=len(plan.objects),
                        bytes=sum(o.size for o in plan.objects))
    write_report(settings.report_file, report)
    log.info("Plan: %d objects, %d bytes, %d shards", report.objects, report.bytes,
             report.shards)
    return 0


def _work(settings: BatchSettings) -> int:
    from kubeinfer_runtime.batch.worker import Progress, run_work

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    progress = Progress(settings.progress_file)
    try:
        store = _store(settings)
        report = run_work(settings, store, progress, stop)
    except Exception as e:
        code = _failed(settings, e, progress.report())
        progress_error(progress, e)
        return code
    write_report(settings.report_file, report)
    progress.tick(force=True)
    return 0


def progress_error(progress: object, e: BaseException) -> None:
    """The progress file says why the worker stopped, too (local mode shows it)."""
    from kubeinfer_runtime.batch.worker import Progress, write_atomic

    if isinstance(progress, Progress) and progress.path is not None:
        message = e.message if isinstance(e, RuntimeServiceError) else type(e).__name__
        write_atomic(progress.path, progress.report(short(message, 1000)).model_dump_json()
                     .encode())


def _finalize(settings: BatchSettings) -> int:
    from kubeinfer_runtime.batch.errors import TooManyFailures
    from kubeinfer_runtime.batch.finalize import run_finalize

    try:
        store = _store(settings)
        summary = run_finalize(settings, store)
    except Exception as e:
        code = _failed(settings, e)
        message = e.message if isinstance(e, RuntimeServiceError) else type(e).__name__
        write_report(settings.report_file, JobSummary(
            failed=code != 1, reason="FinalizeFailed" if code != 1 else "",
            message=short(message, 1500)))
        return code
    write_report(settings.report_file, summary)
    if summary.failed:
        log.error("%s", summary.message)
        return exit_code(TooManyFailures(summary.message))
    log.info("Job complete: %d records (%d failed), %d objects", summary.records,
             summary.failed_records, summary.objects)
    return 0
