"""Read ``CompilationJob`` documents from a YAML file for local mode, planned.

A file may hold several CompilationJobs (nothing else: a compile job names no
Endpoint, so nothing else in the file could concern it). They are validated as
the operator validates them, with local mode's limits (``file://`` anywhere is
fine here); relative ``file://`` URIs resolve against the file's folder. Every
problem of every document is reported at once, each naming the document and
the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubeinfer_operator.api import compilation_job as cj
from kubeinfer_operator.errors import SpecError
from kubeinfer_operator.local.manifest_io import read_manifest, yaml_documents
from kubeinfer_operator.local.transform_manifest import _label
from kubeinfer_operator.reconcile.compile_validate import (
    InvalidCompilationJob,
    validate_compilation_job,
)
from kubeinfer_operator.render.compile_plan import CompilePlan, plan_compile


@dataclass(frozen=True)
class LoadedCompileJob:
    job: cj.CompilationJob
    plan: CompilePlan

    @property
    def name(self) -> str:
        return self.job.name


def parse_compilation_jobs(text: str, *, source: str, base_dir: str) -> list[LoadedCompileJob]:
    """Every CompilationJob in ``text``, planned; SpecError listing every problem."""
    docs = yaml_documents(text, source)
    problems: list[str] = []
    loaded: list[LoadedCompileJob] = []
    for index, doc in enumerate(docs):
        label = _label(source, index, doc)
        kind = doc.get("kind") if isinstance(doc, dict) else None
        if kind != cj.KIND or not isinstance(doc, dict):
            problems.append(f"{label}: kind: {kind!r} cannot run beside a CompilationJob; put "
                            "it in a file of its own")
            continue
        raw_meta = doc.get("metadata")
        meta: dict[str, Any] = raw_meta if isinstance(raw_meta, dict) else {}
        extra = set(doc) - {"apiVersion", "kind", "metadata", "spec", "status"}
        if doc.get("apiVersion") != cj.API_VERSION or extra:
            problems.append(f"{label}: apiVersion must be {cj.API_VERSION}"
                            + (f" (unknown field(s) {', '.join(sorted(extra))})" if extra else ""))
            continue
        try:
            job = validate_compilation_job(str(meta.get("name") or ""), meta.get("namespace"),
                                           doc.get("spec"), on_kubernetes=False)
            loaded.append(LoadedCompileJob(job, plan_compile(job, base_dir=base_dir)))
        except InvalidCompilationJob as exc:
            problems += [f"{label}: {p}" for p in exc.problems]
        except SpecError as exc:
            problems.append(f"{label}: {exc}")
    if not loaded and not problems:
        raise SpecError(f"{source} holds no CompilationJob (apiVersion: {cj.API_VERSION}, "
                        f"kind: {cj.KIND})")
    names = [item.name for item in loaded]
    problems += [f"{source}: metadata.name: CompilationJob {n!r} appears twice; give each job "
                 "a unique name" for n in sorted({n for n in names if names.count(n) > 1})]
    if problems:
        raise SpecError("\n".join(problems))
    return loaded


def load_compile_file(path: Path) -> list[LoadedCompileJob]:
    text = read_manifest(path)
    return parse_compilation_jobs(text, source=str(path), base_dir=str(path.resolve().parent))
