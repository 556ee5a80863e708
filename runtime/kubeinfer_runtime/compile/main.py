"""``kubeinfer-runtime compile``: settings from env and flags, progress, the table, the report.

Two ways to call it, one set of settings (``contract.compile.CompileSettings``):

* a Job or the local runner sets ``KUBEINFER_*`` env and runs
  ``kubeinfer-runtime compile`` with no arguments;
* a person (or ``kubeinfer compile``, the CLI twin) passes flags:
  ``kubeinfer-runtime compile MODEL.onnx --target native --out DIR [--tune S]
  [--allow-quantization] [--calibration FILE] [--batch N]``. Flags win over env;
  plain paths become ``file://`` URIs.

Progress goes to stderr (a live status line on a terminal, one line per
finished stage); the candidates table (or, with ``--json``, the report) to
stdout; the report to ``report_file`` (the termination log on Kubernetes,
written only where that file exists or another path was given). Exit codes:
0 (an artifact was published, possibly the ONNX model itself),
``EXIT_BAD_INPUT`` (42: the model, calibration set or settings are wrong) or
``EXIT_FAILED`` (1: may pass on a retry).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError as SettingsError

from kubeinfer_runtime.contract import ENV_PREFIX
from kubeinfer_runtime.contract.compile import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    TERMINATION_LOG,
    CandidateName,
    CompileReport,
    CompileSettings,
    CompileTarget,
)

log = logging.getLogger("kubeinfer.compile")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``compile`` subcommand's flags (every one optional: env fills the rest)."""
    p.add_argument("model", nargs="?", help="ONNX model: a path, file:// or s3:// URI")
    p.add_argument("--target", help="one of " + ", ".join(t.value for t in CompileTarget)
                   + " (default native)")
    p.add_argument("--out", help="output folder: a path, file:// or s3:// URI")
    p.add_argument("--tune", type=float, metavar="SECONDS",
                   help="MetaSchedule tuning budget per batch size (default 0: no tuning)")
    p.add_argument("--trials", type=int, help="most tuning trials per task")
    p.add_argument("--allow-quantization", action="store_true", default=None,
                   help="also try onnxruntime dynamic INT8 (gated on top-1 agreement)")
    p.add_argument("--calibration", help="inputs to check accuracy on (.npz/.npy)")
    p.add_argument("--min-top1", type=float, metavar="SHARE",
                   help="quantized candidates' least top-1 agreement (default 0.99)")
    p.add_argument("--force", metavar="CANDIDATE",
                   help="publish this candidate if accurate, even when slower: one of "
                        + ", ".join(c.value for c in CandidateName))
    p.add_argument("--batch", type=int, metavar="N",
                   help="the batch size to compile and measure besides 1")
    p.add_argument("--threads", type=int, help="threads per inference (default 1)")
    p.add_argument("--measure", type=float, metavar="SECONDS",
                   help="timing per candidate and batch size (default 1)")
    p.add_argument("--cache-dir", help="tuning cache folder")
    p.add_argument("--artifact-cache", metavar="URI",
                   help="reuse the artifact stored under URI/<key> for this model, target and "
                        "settings, else compile and store it there (--out then optional)")
    p.add_argument("--report", help="also write the report JSON to this file")
    p.add_argument("--json", action="store_true", help="print the report JSON, not the table")


def _uri(value: str) -> str:
    return value if value.startswith(("file://", "s3://")) else \
        "file://" + str(Path(value).expanduser().resolve())


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Settings given as flags (None: not given, env or default applies)."""
    out: dict[str, Any] = {
        "model_uri": _uri(args.model) if args.model else None,
        "output_uri": _uri(args.out) if args.out else None,
        "target": args.target, "tuning_budget_s": args.tune, "tuning_trials": args.trials,
        "allow_quantization": args.allow_quantization,
        "calibration_uri": _uri(args.calibration) if args.calibration else None,
        "min_top1_agreement": args.min_top1, "force_candidate": args.force,
        "batch_sizes": [1, args.batch] if args.batch else None, "threads": args.threads,
        "measure_s": args.measure, "tuning_cache_dir": args.cache_dir,
        "artifact_cache_uri": _uri(args.artifact_cache) if args.artifact_cache else None,
        "report_file": args.report,
    }
    return {k: v for k, v in out.items() if v is not None}


def _settings_error(e: SettingsError) -> str:
    flags = {"model_uri": "MODEL", "output_uri": "--out", "target": "--target"}

    def name(loc: tuple[int | str, ...]) -> str:
        field = str(loc[0])
        env = ENV_PREFIX + field.upper()
        return f"{env} ({flags[field]})" if field in flags else env

    # A rule over several fields has no location; its message names them.
    problems = "; ".join(f"{name(err['loc'])}: {err['msg']}" if err["loc"] else
                         err["msg"].removeprefix("Value error, ") for err in e.errors())
    return (f"Invalid compile settings ({problems}): set the environment variables or pass "
            "the flags (kubeinfer-runtime compile --help)")


def write_report(path: str, report: CompileReport) -> None:
    """The termination message: written where the file exists (Kubernetes made it) or
    where a path other than the default was given."""
    if path == TERMINATION_LOG and not os.path.exists(path):
        return
    try:
        with open(path, "wb") as f:
            f.write(report.termination_message())
    except OSError as e:
        log.debug("Report not written to %s (%s)", path, e.strerror)


def run(args: argparse.Namespace) -> int:
    from kubeinfer_runtime.compile.display import Display, print_table

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        settings = CompileSettings(**overrides(args))
    except SettingsError as e:
        print(_settings_error(e), file=sys.stderr)
        return EXIT_BAD_INPUT
    logging.getLogger().setLevel(settings.log_level.upper())
    # Before anything imports TVM: its thread pool reads this once.
    os.environ["TVM_NUM_THREADS"] = str(settings.threads)
    from kubeinfer_runtime.compile.errors import BadInput, CompileError
    from kubeinfer_runtime.compile.pipeline import compile_model

    display = Display()
    try:
        with display:
            report = compile_model(settings, display)
    except BadInput as e:
        return _failed(settings, e.message, EXIT_BAD_INPUT)
    except CompileError as e:
        return _failed(settings, e.message, EXIT_FAILED)
    except Exception as e:
        log.error("Compilation failed unexpectedly", exc_info=e)
        return _failed(settings, f"{type(e).__name__}: {e}"[:1000], EXIT_FAILED)
    write_report(settings.report_file, report)
    if args.json:
        print(report.model_dump_json(indent=2))
    else:
        print_table(report)
    return 0


def _failed(settings: CompileSettings, message: str, code: int) -> int:
    print(f"Compilation failed: {message}", file=sys.stderr)
    write_report(settings.report_file, CompileReport(ok=False, target=settings.target.value,
                                                     error=message[:1000]))
    return code


def main(argv: list[str] | None = None) -> int:
    """``kubeinfer-runtime compile ...`` on its own (``__main__`` delegates here)."""
    p = argparse.ArgumentParser(prog="kubeinfer-runtime compile",
                                description="Compile an ONNX model for a target (settings "
                                            "from KUBEINFER_* env, overridden by flags)")
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
