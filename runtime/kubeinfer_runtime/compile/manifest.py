"""``manifest.json``: what a compiled artifact is, for whom, and the checksum of every file.

Written by the compiler (``artifact``), read by the model server
(``models.compiled``) before it loads anything: the manifest says which backend
serves the artifact, which tensors it takes, which target it was built for
(checked against the host by ``hostcheck`` before any ``dlopen``) and the
sha256 of each file (checked before use: a tampered or truncated file is
refused, not executed). Light on purpose (pydantic, hashlib): the model server
imports it without TVM or onnx.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kubeinfer_runtime.compile.hostcheck import ArtifactTarget
from kubeinfer_runtime.contract.compile import MANIFEST_NAME, CandidateName, CandidateSummary

FORMAT: Literal["kubeinfer.compiled/v1"] = "kubeinfer.compiled/v1"
#: A manifest is a few KiB; anything far bigger is not one.
MAX_MANIFEST_BYTES = 1 << 20
#: Files an artifact may list (one library per batch size, a model, a few extras).
MAX_FILES = 64
_CHUNK = 1 << 20


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorInfo(_Strict):
    name: str
    #: numpy dtype name (``float32``).
    dtype: str
    #: None entries are dynamic (the batch); None as a whole: any shape.
    shape: list[int | None] | None


class FileEntry(_Strict):
    #: A plain file name inside the artifact directory (no folders, no ``..``).
    path: str
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    size: int = Field(ge=0)
    #: The static batch size a TVM library was built for (None: not a library, or
    #: a model without a batch dimension).
    batch_size: int | None = None

    @field_validator("path")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if not v or "/" in v or "\\" in v or v in (".", "..") or v.startswith(".") \
                or v == MANIFEST_NAME:
            raise ValueError(f"file {v[:80]!r} must be a plain file name inside the artifact")
        return v


class TargetInfo(_Strict):
    name: str
    triple: str
    cpu: str = ""
    #: /proc/cpuinfo flags the code may use (``hostcheck.required_flags``).
    flags: list[str] = Field(default_factory=list)
    #: An ONNX file: runs wherever onnxruntime does.
    portable: bool = False

    def artifact_target(self) -> ArtifactTarget:
        return ArtifactTarget(self.name, self.triple, self.cpu, tuple(self.flags),
                              self.portable)


class SourceInfo(_Strict):
    name: str
    sha256: str


class Manifest(_Strict):
    format: Literal["kubeinfer.compiled/v1"] = FORMAT
    #: Which backend serves the files: ``tvm`` (libraries) or ``onnx`` (one model).
    backend: Literal["tvm", "onnx"]
    candidate: CandidateName
    source: SourceInfo
    target: TargetInfo
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    files: Annotated[list[FileEntry], Field(min_length=1, max_length=MAX_FILES)]
    batch_sizes: list[int] = Field(default_factory=list)
    #: Threads per inference the candidates were measured with.
    threads: int = 1
    #: Median latency of the chosen candidate per batch size, seconds (the TVM
    #: backend plans how to split and pad a request from them).
    latency_s: dict[int, float] = Field(default_factory=dict)
    #: Compiler and library versions (tvm, tvm_ffi, onnxruntime, onnx, kubeinfer).
    versions: dict[str, str] = Field(default_factory=dict)
    candidates: list[CandidateSummary] = Field(default_factory=list)
    reason: str = ""
    verification: str = ""
    created: str = ""

    @field_validator("files")
    @classmethod
    def _unique(cls, v: list[FileEntry]) -> list[FileEntry]:
        names = [f.path for f in v]
        if len(set(names)) != len(names):
            raise ValueError("files are listed twice")
        return v

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)


class ArtifactError(Exception):
    """The artifact is not one, is damaged, or is not for this host; the message says which."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(root: Path) -> Manifest:
    """The manifest of the artifact directory ``root`` (ArtifactError when missing or invalid)."""
    path = root / MANIFEST_NAME
    try:
        size = path.stat().st_size
    except OSError:
        raise ArtifactError(f"{root} holds no {MANIFEST_NAME}: point the model URI at a "
                            "compiled artifact (a folder or .tar.gz written by kubeinfer "
                            "compile), or set the model format to onnx") from None
    if size > MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{MANIFEST_NAME} is {size} bytes, over {MAX_MANIFEST_BYTES}: it "
                            "is not a kubeinfer manifest")
    try:
        return Manifest.model_validate_json(path.read_bytes())
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "manifest"
        raise ArtifactError(f"{MANIFEST_NAME} is invalid ({where}: {first['msg']}): recompile "
                            "the model with kubeinfer compile") from None


def file_problems(manifest: Manifest, actual: dict[str, str | None]) -> list[str]:
    """Pure: each listed file whose sha256 (``actual``; None: missing) differs, in words."""
    out = []
    for entry in manifest.files:
        got = actual.get(entry.path)
        if got is None:
            out.append(f"{entry.path} is missing")
        elif got != entry.sha256:
            out.append(f"{entry.path} has sha256 {got[:12]}…, the manifest says "
                       f"{entry.sha256[:12]}…")
    return out


def verify_files(root: Path, manifest: Manifest) -> None:
    """Hash every listed file; ArtifactError naming each mismatch."""
    actual: dict[str, str | None] = {}
    for entry in manifest.files:
        path = root / entry.path
        actual[entry.path] = sha256_file(path) if path.is_file() else None
    problems = file_problems(manifest, actual)
    if problems:
        raise ArtifactError("Artifact files do not match their manifest (" + "; ".join(problems)
                            + "): the artifact was modified or damaged; recompile it or copy "
                            "it again")
