"""``kubeinfer-runtime recommend``: run a recommendation and report it.

    kubeinfer-runtime recommend --request FILE [--json] [--html FILE] [--report FILE]

The request (``RecommendRequest`` JSON) comes from ``--request`` or
``KUBEINFER_RECOMMEND_REQUEST``. Candidates without ``urls`` are started here as
local processes; with ``urls`` (a RecommendationJob's pod) they are only
loaded. Progress goes to stderr, the table (or ``--json``: the report) to
stdout; ``--report`` writes the report JSON, and ``--termination-log`` its
compact summary (a Kubernetes termination message). Exit codes: 0 recommended,
3 no candidate held the SLO, 42 bad request.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from pydantic import ValidationError
from rich.console import Console

from kubeinfer_runtime.contract.recommend import (
    EXIT_BAD_INPUT,
    EXIT_NO_RECOMMENDATION,
    RecommendReport,
    RecommendRequest,
)
from kubeinfer_runtime.recommend.report import table, to_html
from kubeinfer_runtime.recommend.search import Search
from kubeinfer_runtime.recommend.servers import BaseMeasurer, LocalMeasurer, RemoteMeasurer

ENV_REQUEST = "KUBEINFER_RECOMMEND_REQUEST"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kubeinfer-runtime recommend",
                                description="load-test candidates and recommend one")
    p.add_argument("--request", type=Path, help="RecommendRequest JSON file "
                                                f"(default: ${ENV_REQUEST})")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--html", type=Path, help="write an HTML report with plots")
    p.add_argument("--report", type=Path, help="write the report JSON here")
    p.add_argument("--termination-log", type=Path, help="write the compact summary here")
    return p


async def run(request: RecommendRequest, progress: Console | None = None) -> RecommendReport:
    remote = all(c.urls for c in request.candidates)
    measurer: BaseMeasurer = (RemoteMeasurer(request=request) if remote
                              else LocalMeasurer(request=request))

    def say(msg: str) -> None:
        if progress is not None:
            progress.print(msg, markup=False, highlight=False)

    search = Search(request=request, measurer=measurer, progress=say)  # type: ignore[arg-type]
    return await search.run()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    err = Console(stderr=True)
    try:
        raw = args.request.read_text() if args.request else os.environ.get(ENV_REQUEST)
        if not raw:
            err.print(f"No request: pass --request FILE or set {ENV_REQUEST}")
            return EXIT_BAD_INPUT
        request = RecommendRequest.model_validate_json(raw)
    except (OSError, ValidationError) as e:
        err.print(f"Invalid recommendation request: {e}", markup=False)
        return EXIT_BAD_INPUT
    try:
        import uvloop

        report = uvloop.run(run(request, err))
    except ImportError:  # pragma: no cover - uvloop is a dependency
        report = asyncio.run(run(request, err))
    text = report.model_dump_json(indent=2)
    if args.report:
        args.report.write_text(text)
    if args.termination_log:
        args.termination_log.write_text(report.termination_message())
    if args.html:
        try:
            args.html.write_text(to_html(report))
        except ImportError:
            err.print("--html needs matplotlib: pip install 'kubeinfer[recommend]'")
    if args.json:
        sys.stdout.write(text + "\n")
    else:
        out = Console()
        out.print(table(report))
        out.print(f"Recommended: {report.recommended or 'none'}: {report.reason}",
                  markup=False)
    return 0 if report.recommended else EXIT_NO_RECOMMENDATION


if __name__ == "__main__":
    sys.exit(main())
