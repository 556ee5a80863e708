"""``kubeinfer recommend``: Inference Recommender on this machine.

    kubeinfer recommend -f endpoint.yaml [--variant V] [--candidates FILE]
        [--compiled ARTIFACT] [--slo-p99-ms N] [--max-minutes M]
        [--json] [--html FILE] [--out FILE]

Builds the recommender's request from the Endpoint's variant and the
candidates file (``render.recommend_plan``: pure), runs the runtime's
``kubeinfer-runtime recommend`` as a child process (it starts every candidate's
model servers as real local processes, load-tests them open-loop and stops
them; its progress and table go to this terminal), then writes the winner as a
ready Endpoint YAML (``--out``, default ``<name>-recommended.yaml`` next to the
manifest). The operator package never imports the load generator; it only
reads the report through the contract. Exit: 0 recommended, 3 no candidate
held the SLO, 1 bad input.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Annotated

import typer
import yaml
from pydantic import ValidationError
from rich.console import Console

from kubeinfer_operator.api.endpoint import format_validation_error
from kubeinfer_operator.errors import KubeinferError, SpecError
from kubeinfer_operator.local.manifest import load_manifest_file
from kubeinfer_operator.local.manifest_io import read_manifest, yaml_documents
from kubeinfer_operator.render.recommend_plan import (
    RecommendPlanError,
    recommend_request,
    recommended_endpoint,
)
from kubeinfer_runtime.contract.recommend import CandidateSearch, RecommendReport

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def load_search(path: Path | None) -> CandidateSearch:
    if path is None:
        return CandidateSearch()
    try:
        docs = yaml_documents(read_manifest(path, "--candidates path"), str(path))
        if len(docs) > 1:
            raise RecommendPlanError(f"Candidates file {path} holds {len(docs)} YAML "
                                     "documents; keep one")
        return CandidateSearch.model_validate(docs[0] if docs else {})
    except SpecError as e:
        raise RecommendPlanError(f"Candidates file: {e}") from e
    except ValidationError as e:
        raise RecommendPlanError(f"Candidates file {path}:\n{format_validation_error(e)}") from e


def recommend_command(
    file: Annotated[Path, typer.Option("-f", "--file", help="Endpoint manifest whose "
                                                            "variant is recommended for.")],
    candidates: Annotated[Path | None, typer.Option(
        "--candidates", metavar="FILE", help="Candidates (list or grid), price table and "
                                             "load settings (YAML).")] = None,
    variant: Annotated[str | None, typer.Option(help="The variant (default: the "
                                                     "first).")] = None,
    compiled: Annotated[str | None, typer.Option(
        metavar="ARTIFACT", help="Compiled artifact of the model (candidates with "
                                 "artifact: compiled).")] = None,
    slo_p99_ms: Annotated[float | None, typer.Option(
        "--slo-p99-ms", metavar="N", help="p99 latency SLO, ms (default: the candidates "
                                          "file's, else 100).", min=0.001)] = None,
    max_minutes: Annotated[float | None, typer.Option(
        "--max-minutes", metavar="M", help="Time budget (default 10).", min=0.01)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")]
    = False,
    html: Annotated[Path | None, typer.Option("--html", metavar="FILE",
                                              help="Write an HTML report with plots.")]
    = None,
    out_file: Annotated[Path | None, typer.Option(
        "--out", metavar="FILE", help="Where the recommended Endpoint YAML goes (default "
                                      "<name>-recommended.yaml next to the manifest).")]
    = None,
) -> None:
    """Load-test candidate settings of an Endpoint's variant locally and recommend one."""
    try:
        loaded = load_manifest_file(file)
        if len(loaded) != 1:
            raise RecommendPlanError(f"{file} holds {len(loaded)} Endpoints; recommend for "
                                     "one at a time")
        item = loaded[0]
        request = recommend_request(item.endpoint, load_search(candidates), variant=variant,
                                    base_dir=item.base_dir, compiled_uri=compiled,
                                    slo_p99_ms=slo_p99_ms, max_minutes=max_minutes)
    except (KubeinferError, RecommendPlanError) as e:
        err.print(str(e), markup=False)
        invalid = isinstance(e, (SpecError, RecommendPlanError))
        raise typer.Exit(2 if invalid else 1) from None
    with tempfile.TemporaryDirectory(prefix="kubeinfer-recommend-") as tmp:
        req_file = Path(tmp) / "request.json"
        req_file.write_text(request.model_dump_json())
        report_file = Path(tmp) / "report.json"
        argv = [sys.executable, "-m", "kubeinfer_runtime", "recommend", "--request",
                str(req_file), "--report", str(report_file)]
        if as_json:
            argv.append("--json")
        if html is not None:
            argv += ["--html", str(html.resolve())]
        try:
            code = subprocess.call(argv)
        except KeyboardInterrupt:
            raise typer.Exit(130) from None
        if not report_file.exists():
            err.print(f"The recommender exited with code {code} without a report")
            raise typer.Exit(1)
        report = RecommendReport.model_validate_json(report_file.read_text())
    if report.recommended is None:
        raise typer.Exit(3)
    target = out_file or file.with_name(f"{item.name}-recommended.yaml")
    moved = target.resolve().parent != file.resolve().parent
    doc = recommended_endpoint(item.document, report, variant=variant,
                               compiled_uri=request.compiledModelUri,
                               model_uri=request.modelUri if moved else None)
    target.write_text(f"# Recommended by kubeinfer recommend: {report.reason}\n"
                      + yaml.safe_dump(doc, sort_keys=False))
    (err if as_json else out).print(f"Wrote {target}: kubeinfer up -f {target}")
