"""Write the chosen candidate as an artifact: folder + manifest, tarball, report.

The folder holds only plain files at its top level (one library per batch size
for TVM, or one ``model.onnx``) and ``manifest.json`` listing each with its
sha256 and size; the tarball packs exactly that folder. Pure assembly of the
manifest is separate from the copying and hashing.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from kubeinfer_runtime.compile.bundle import pack
from kubeinfer_runtime.compile.manifest import (
    FileEntry,
    Manifest,
    SourceInfo,
    TargetInfo,
    TensorInfo,
    sha256_file,
)
from kubeinfer_runtime.contract.compile import (
    ARTIFACT_DIR,
    ARTIFACT_TARBALL,
    MANIFEST_NAME,
    REPORT_NAME,
    CandidateName,
    CandidateSummary,
    CompileReport,
)
from kubeinfer_runtime.models.base import TensorSpec


@dataclass(frozen=True)
class ArtifactFile:
    #: Where the candidate's file is now.
    source: Path
    #: Its name in the artifact.
    name: str
    batch_size: int | None = None


def tensor_info(t: TensorSpec, batched: bool) -> TensorInfo:
    shape = None if t.shape is None else list(t.shape)
    if batched and shape:
        shape[0] = None
    return TensorInfo(name=t.name, dtype=t.dtype.name if t.dtype.kind != "O" else "object",
                      shape=shape)


@dataclass(frozen=True)
class ArtifactPlan:
    """Everything the manifest says, except the files' hashes."""

    backend: Literal["tvm", "onnx"]
    candidate: CandidateName
    source: SourceInfo
    target: TargetInfo
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    batch_sizes: list[int]
    threads: int
    latency_s: dict[int, float]
    versions: dict[str, str]
    candidates: list[CandidateSummary]
    reason: str
    verification: str


def write(out: Path, plan: ArtifactPlan, files: list[ArtifactFile]) -> tuple[Manifest, str]:
    """Write ``out/artifact/`` and ``out/artifact.tar.gz``; returns the manifest and the
    tarball's sha256."""
    folder = out / ARTIFACT_DIR
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    entries = []
    for f in files:
        dest = folder / f.name
        shutil.copyfile(f.source, dest)
        entries.append(FileEntry(path=f.name, sha256=sha256_file(dest),
                                 size=dest.stat().st_size, batch_size=f.batch_size))
    manifest = Manifest(
        backend=plan.backend,
        candidate=plan.candidate, source=plan.source, target=plan.target,
        inputs=plan.inputs, outputs=plan.outputs, files=entries, batch_sizes=plan.batch_sizes,
        threads=plan.threads, latency_s=plan.latency_s, versions=plan.versions,
        candidates=plan.candidates, reason=plan.reason, verification=plan.verification,
        created=datetime.now(UTC).isoformat(timespec="seconds"))
    (folder / MANIFEST_NAME).write_text(manifest.to_json())
    tarball = out / ARTIFACT_TARBALL
    pack(folder, tarball)
    return manifest, sha256_file(tarball)


def write_report(out: Path, report: CompileReport) -> None:
    (out / REPORT_NAME).write_text(report.model_dump_json(indent=2))
