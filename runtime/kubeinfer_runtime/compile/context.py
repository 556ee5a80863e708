"""What the pipeline and its candidate builders share: the run's context, results, progress.

Kept apart from ``pipeline`` so the TVM candidates (``tvm_candidates``) can use
them without importing the pipeline that imports them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from kubeinfer_runtime.compile.artifact import ArtifactFile
from kubeinfer_runtime.compile.bench import Bench
from kubeinfer_runtime.compile.choice import Outcome
from kubeinfer_runtime.compile.targets import TargetSpec
from kubeinfer_runtime.contract.compile import CandidateName, CompileSettings


class Progress(Protocol):
    """What the pipeline tells its caller (the CLI's display) while it works."""

    def step(self, text: str) -> None:
        """A stage started (replaces the previous status line)."""

    def done(self, text: str) -> None:
        """A stage finished: one line for the log."""


class NullProgress:
    def step(self, text: str) -> None:
        pass

    def done(self, text: str) -> None:
        pass


@dataclass
class Evaluated:
    """One candidate's results, as the choice and the report need them."""

    name: CandidateName
    accurate: bool = False
    p50_s: dict[int, float] = field(default_factory=dict)
    p99_s: dict[int, float] = field(default_factory=dict)
    max_abs_diff: float | None = None
    top1: float | None = None
    failure: str = ""
    gate_note: str = ""
    backend: Literal["tvm", "onnx"] = "onnx"
    files: list[ArtifactFile] = field(default_factory=list)

    def outcome(self) -> Outcome:
        return Outcome(self.name, self.accurate, self.p50_s, self.failure, self.gate_note)


@dataclass
class Context:
    settings: CompileSettings
    progress: Progress
    run_dir: Path
    model_path: Path
    model: Any
    bench: Bench
    spec: TargetSpec
    #: Why this host cannot run the target ("" when it can: candidates are timed).
    untimed: str
    source_sha256: str


