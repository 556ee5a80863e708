"""Compile's (SageMaker Neo's) contract: the compiler's settings, targets, report, exit codes.

A compilation runs as one process, ``kubeinfer-runtime compile`` (a Kubernetes
Job's pod, or a local process started by ``kubeinfer compile``), reading
``CompileSettings`` from ``KUBEINFER_*`` env (or the same settings as command-line
flags). It compiles one ONNX model for one target, measures every candidate
against onnxruntime fp32 on the same machine, keeps only what passes the accuracy
gate and is at least as fast, and writes under ``output_uri``:

* ``artifact/``: ``manifest.json`` plus the chosen files (TVM ``.so`` per batch
  size, or one ``.onnx``): serve it with model format ``compiled``;
* ``artifact.tar.gz``: the same directory as one object (what an ``s3://``
  variant points at);
* ``report.json``: the full ``CompileReport``.

The report also goes to ``report_file`` (the termination log on Kubernetes,
bounded to 4 KiB by :meth:`CompileReport.termination_message`).

Artifact cache (a variant's ``compile: {target: native}``): with
``artifact_cache_uri`` set (env ``KUBEINFER_ARTIFACT_CACHE_URI``, flag
``--artifact-cache``), the compiler first works out the artifact's content key
(:data:`ARTIFACT_KEY_FIELDS`: the source model's sha256, the target with its
resolved triple, CPU name and CPU features, the TVM, tvm-ffi and onnxruntime
versions, and every setting that changes the choice). If
``<artifact_cache_uri>/<key>/`` already holds a complete artifact (its
``report.json``, written last, and a tarball whose sha256 the report names), it
is reused without compiling; otherwise the model is compiled and published
there. ``output_uri`` may then be omitted: the report's ``artifact_uri`` names
``<artifact_cache_uri>/<key>/artifact.tar.gz``. With both set, the artifact
is also copied under ``output_uri`` and the report names that copy. The report
says which happened (``artifact_cache_hit``, ``artifact_key``). The key needs
the compiling machine's CPU, so only the compiler can work it out: the
operator runs the compile on the kind of node that serves, and reads the
artifact URI from the report.

The operator imports this module (the settings it renders, the report it reads,
the exit codes its podFailurePolicy names), so it stays free of heavy
dependencies.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kubeinfer_runtime.contract import _RoleSettings
from kubeinfer_runtime.contract.env_settings import NoDecode

#: The model or the settings are bad (not ONNX, unreadable calibration set, bad
#: target): retrying cannot help, fail the job at once.
EXIT_BAD_INPUT = 42
#: Anything else (object store unreachable, a compiler crash): a retry may help.
EXIT_FAILED = 1
#: Where the report goes by default (Kubernetes reads at most 4 KiB of it).
TERMINATION_LOG = "/dev/termination-log"
MAX_TERMINATION_BYTES = 4096
#: Names under ``output_uri``.
ARTIFACT_DIR = "artifact"
ARTIFACT_TARBALL = "artifact.tar.gz"
REPORT_NAME = "report.json"
#: The manifest inside an artifact directory.
MANIFEST_NAME = "manifest.json"
#: What an artifact cache key is made of, besides the source model's sha256, the
#: resolved target (name, triple, CPU, CPU features) and the compiler versions:
#: the settings that change which candidate is chosen. Timing length
#: (``measure_s``) is left out: it changes how sure a measurement is, not what it
#: measures.
ARTIFACT_KEY_FIELDS = (
    "batch_sizes", "allow_quantization", "min_top1_agreement", "max_abs_diff",
    "min_speedup", "force_candidate", "threads", "tuning_budget_s", "tuning_trials",
)


class CompileTarget(StrEnum):
    """What the artifact runs on (``kubeinfer compile --target``)."""

    #: The CPU of the machine compiling (LLVM's name for it, e.g. ``emeraldrapids``).
    NATIVE = "native"
    #: Any x86-64 CPU (SSE2 only).
    X86_64 = "x86-64"
    #: x86-64-v3: AVX2, FMA, BMI (Haswell and later, Zen 1 and later).
    X86_64_V3 = "x86-64-v3"
    HASWELL = "haswell"
    SKYLAKE_AVX512 = "skylake-avx512"
    ZNVER4 = "znver4"
    #: 64-bit ARM Linux (Graviton, Raspberry Pi 4/5, Jetson), cross-compiled.
    AARCH64 = "aarch64"
    #: 32-bit ARM Linux, hard-float (Raspberry Pi 2/3 on a 32-bit OS), cross-compiled.
    ARMV7 = "armv7"


#: Names accepted for a target, beyond the enum's values.
TARGET_ALIASES: dict[str, CompileTarget] = {
    "x86_64": CompileTarget.X86_64, "arm64": CompileTarget.AARCH64,
    "armv7l": CompileTarget.ARMV7, "armhf": CompileTarget.ARMV7,
}


def parse_target(name: str) -> CompileTarget:
    """A target by name or alias; ValueError naming the accepted ones."""
    key = name.strip().lower()
    try:
        return TARGET_ALIASES.get(key) or CompileTarget(key)
    except ValueError:
        raise ValueError(f"unknown target {name[:40]!r}: use one of "
                         + ", ".join(t.value for t in CompileTarget)) from None


class CandidateName(StrEnum):
    """Every way of running the model the compiler measures."""

    #: The baseline: the ONNX model as given, onnxruntime, all graph optimisations.
    ORT_FP32 = "onnxruntime-fp32"
    #: onnxruntime's offline-optimised graph, saved (``optimized_model_filepath``).
    ORT_OPTIMIZED = "onnxruntime-optimized"
    #: onnxruntime dynamic INT8 quantization (only with quantization allowed).
    ORT_INT8 = "onnxruntime-int8"
    #: TVM (Relax), default schedules.
    TVM_UNTUNED = "tvm-untuned"
    #: TVM with MetaSchedule tuning within the budget.
    TVM_TUNED = "tvm-tuned"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CandidateSummary(_Strict):
    """One candidate in a report: its timings (ms, keyed by batch size), accuracy, verdict."""

    name: CandidateName
    p50_ms: dict[int, float] = Field(default_factory=dict)
    p99_ms: dict[int, float] = Field(default_factory=dict)
    #: Largest absolute difference from onnxruntime fp32 over the test inputs.
    max_abs_diff: float | None = None
    #: Share of rows whose argmax matches onnxruntime fp32's (quantized candidates).
    top1_agreement: float | None = None
    #: Geometric mean over batch sizes of onnxruntime fp32 latency / this one's.
    speedup: float | None = None
    #: Passed the accuracy gate (and, where it applies, ran at all).
    accurate: bool = False
    chosen: bool = False
    #: Why it was (not) chosen, or why it was skipped, in a few words.
    note: str = ""


class CompileReport(_Strict):
    """What ``kubeinfer-runtime compile`` reports (termination message, ``report.json``)."""

    ok: bool = False
    #: ``<output_uri>/artifact.tar.gz``: one object, servable from s3:// and file://.
    artifact_uri: str = ""
    #: ``<output_uri>/artifact``: the same, unpacked (servable from file:// only).
    artifact_dir_uri: str = ""
    #: sha256 of the tarball.
    sha256: str = ""
    source_sha256: str = ""
    target: str = ""
    #: The target's CPU as LLVM names it (``emeraldrapids`` for native here).
    target_cpu: str = ""
    chosen: CandidateName | None = None
    #: Which backend serves the artifact: ``tvm`` (a .so) or ``onnx``.
    backend: Literal["tvm", "onnx", ""] = ""
    #: The chosen candidate's speedup over onnxruntime fp32 (None: not timed).
    speedup: float | None = None
    #: The chosen candidate's accuracy delta vs onnxruntime fp32.
    max_abs_diff: float | None = None
    top1_agreement: float | None = None
    #: How correctness and speed were established, for humans.
    verification: str = ""
    #: Why the chosen candidate won, or why the ONNX model itself is served.
    reason: str = ""
    #: Empty when TVM imported the model; else ``not compilable with TVM: ops A, B``.
    tvm_status: str = ""
    batch_sizes: list[int] = Field(default_factory=list)
    #: New MetaSchedule trials measured in this run (0 when the tuning cache had them).
    tuning_trials: int = 0
    #: Seconds the tuned candidate took from its first trial (or from reading cached
    #: records) to its built libraries.
    tuning_seconds: float = 0.0
    #: A previous run's tuning records were reused (no new trials needed).
    tuning_cache_hit: bool = False
    #: The artifact came from ``artifact_cache_uri`` as it was: nothing was
    #: compiled or measured in this run (the candidates are the original run's).
    artifact_cache_hit: bool = False
    #: The artifact's content key (the folder under ``artifact_cache_uri``); set
    #: whenever an artifact cache was used.
    artifact_key: str = ""
    seconds: float = 0.0
    candidates: list[CandidateSummary] = Field(default_factory=list)
    #: Why the compilation failed (no model bytes, ever).
    error: str = ""

    def termination_message(self) -> bytes:
        """The report as JSON, at most 4 KiB: candidates' notes, then candidates, go first."""
        data = self.model_dump_json().encode()
        if len(data) <= MAX_TERMINATION_BYTES:
            return data
        slim = self.model_copy(update={
            "candidates": [c.model_copy(update={"note": c.note[:40]}) for c in self.candidates],
            "reason": self.reason[:300], "error": self.error[:600],
            "verification": self.verification[:200], "tvm_status": self.tvm_status[:300]})
        data = slim.model_dump_json().encode()
        if len(data) <= MAX_TERMINATION_BYTES:
            return data
        return slim.model_copy(update={"candidates": []}).model_dump_json().encode()[
            :MAX_TERMINATION_BYTES]


def _int_list(value: object) -> object:
    """``"1,64"`` or ``"[1, 64]"`` or ``[1, 64]`` -> ``[1, 64]`` (pydantic checks the items)."""
    if isinstance(value, str):
        text = value.strip().strip("[]")
        return [p.strip() for p in text.split(",") if p.strip()]
    if isinstance(value, int):
        return [value]
    return value


class CompileSettings(_RoleSettings):
    """Settings of ``kubeinfer-runtime compile`` (env ``KUBEINFER_*``, or flags).

    Object-store access (``KUBEINFER_S3_*`` or the AWS variables) and ``log_level``
    come from the shared role settings; the HTTP ones are not used.
    """

    #: The ONNX model: ``file:///abs/model.onnx`` or ``s3://bucket/key``.
    model_uri: str
    target: CompileTarget = CompileTarget.NATIVE
    #: Folder the artifact, tarball and report are written under
    #: (``file:///abs/dir`` or ``s3://bucket/prefix``). May be omitted when
    #: ``artifact_cache_uri`` is set: the artifact then lives in the cache only.
    output_uri: str | None = None
    #: Content-addressed artifact cache (``file:///abs/dir`` or
    #: ``s3://bucket/prefix``): one folder per artifact key, reused instead of
    #: compiling again (see the module docstring).
    artifact_cache_uri: str | None = None
    #: Seconds of MetaSchedule tuning per batch size (0: no tuned candidate).
    tuning_budget_s: float = Field(default=0.0, ge=0)
    #: Most tuning trials per batch size (None: as many as the budget allows).
    tuning_trials: int | None = Field(default=None, ge=1)
    #: Batch sizes compiled (TVM needs static shapes: one library each) and
    #: measured. The first is the latency one, the last the throughput one;
    #: other request sizes are served by splitting and padding.
    batch_sizes: Annotated[list[int], NoDecode] = Field(default_factory=lambda: [1])
    #: Allow the onnxruntime dynamic INT8 candidate (its accuracy gate is top-1
    #: agreement, not max-abs-diff).
    allow_quantization: bool = False
    #: Rows to check accuracy on besides generated ones: ``.npz`` (one array per
    #: input name) or ``.npy`` (the one input), file:// or s3://.
    calibration_uri: str | None = None
    #: Quantized candidates: least share of rows whose top-1 class matches fp32's.
    min_top1_agreement: float = Field(default=0.99, gt=0, le=1)
    #: fp32 candidates: largest absolute difference from onnxruntime fp32 allowed.
    max_abs_diff: float = Field(default=1e-5, ge=0)
    #: A candidate replaces onnxruntime fp32 only when this much faster (geometric
    #: mean over batch sizes) and no slower at any batch size: the margin keeps
    #: timing noise from picking a candidate that is merely as fast.
    min_speedup: float = Field(default=1.05, ge=1.0)
    #: Publish this candidate whenever it passes the accuracy gate, even when it is
    #: slower than onnxruntime fp32 (an A/B test on the device; the report says
    #: how it compares). None: the rules choose.
    force_candidate: CandidateName | None = None
    #: Seconds of timing per candidate and batch size (p50 and p99 from them).
    measure_s: float = Field(default=1.0, gt=0)
    #: Threads one inference uses while measuring (onnxruntime intra-op threads,
    #: TVM_NUM_THREADS): serve with the same ``KUBEINFER_INTRA_OP_THREADS``.
    threads: int = Field(default=1, ge=1)
    #: Local tuning records, one folder per (model sha256, target, TVM version):
    #: a recompile with a warm cache runs no new trials.
    tuning_cache_dir: str = "/tmp/kubeinfer/tuning-cache"
    #: Object-store folder the tuning cache is restored from and saved to
    #: (``s3://bucket/kubeinfer/tuning-cache``), so Jobs share it.
    tuning_cache_uri: str | None = None
    #: Scratch space (downloads, candidate files).
    work_dir: str = "/tmp/kubeinfer/compile"
    #: Cross targets: a folder with the target's TVM runtime (``libtvm_runtime.so``,
    #: ``libtvm_ffi.so``, directly or under ``lib/``) for the check under qemu-user.
    #: Unset or missing: the cross artifact cannot be verified and is not chosen.
    cross_runtime_dir: str | None = None
    report_file: str = TERMINATION_LOG

    @field_validator("target", mode="before")
    @classmethod
    def _target(cls, v: object) -> object:
        return parse_target(v) if isinstance(v, str) else v

    @field_validator("batch_sizes", mode="before")
    @classmethod
    def _batch_list(cls, v: object) -> object:
        return _int_list(v)

    @field_validator("batch_sizes")
    @classmethod
    def _batch_sizes(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("give at least one batch size, e.g. 1,64")
        if any(b < 1 or b > 65536 for b in v):
            raise ValueError("batch sizes must be between 1 and 65536")
        return list(dict.fromkeys(v))  # unique, order kept

    @field_validator("model_uri", "output_uri", "artifact_cache_uri", "calibration_uri",
                     "tuning_cache_uri")
    @classmethod
    def _uri(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("file://", "s3://")):
            raise ValueError(f"{v[:80]!r} must be a file:// or s3:// URI")
        return v

    @model_validator(mode="after")
    def _somewhere_to_write(self) -> CompileSettings:
        if not self.output_uri and not self.artifact_cache_uri:
            raise ValueError("give an output folder (KUBEINFER_OUTPUT_URI, --out) or an "
                             "artifact cache (KUBEINFER_ARTIFACT_CACHE_URI, --artifact-cache)")
        return self

    def key_settings(self) -> dict[str, object]:
        """The settings an artifact cache key is made of (:data:`ARTIFACT_KEY_FIELDS`)."""
        return self.model_dump(mode="json", include=set(ARTIFACT_KEY_FIELDS))
