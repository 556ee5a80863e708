"""How a model is compiled: the options a CompilationJob and a variant's ``model.compile`` share.

A variant may say ``model: {uri: x.onnx, compile: {target: native}}``: its model
is compiled for the node that serves it before the model server starts (an init
container on Kubernetes, a step of ``kubeinfer up`` locally), cached by content,
and served as the artifact; when nothing beats onnxruntime fp32 the artifact is
the ONNX model itself and the status says why. The tuning and quantization
blocks mean the same there as in a CompilationJob, so they are defined once,
here (this module imports no other API module: ``api.endpoint`` imports it).
"""

from __future__ import annotations

from typing import Annotated
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, field_validator

from kubeinfer_runtime.contract.compile import CompileTarget

#: The runtime compiles one library per batch size: bound the work one compile asks for.
MAX_BATCH_SIZES = 8
MAX_BATCH_SIZE = 65536
#: A variant compiles on the node that serves it, so only targets that node runs make
#: sense: cross targets can be verified under emulation but never timed there.
CROSS_TARGETS = frozenset({CompileTarget.AARCH64, CompileTarget.ARMV7})
OBJECT_URI = "^(s3|file)://.+"
FOLDER_URI = r"^(s3://[^/]+(/.*)?|file://.+)$"


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def object_uri_problem(field: str, uri: str, *, folder: bool = False) -> str | None:
    """Why ``uri`` names no object (or, ``folder``, no folder) we can read, or None."""
    parsed = urlparse(uri)
    example = "s3://bucket/prefix" if folder else "s3://bucket/key"
    if parsed.scheme == "s3":
        if not parsed.netloc or not (folder or parsed.path.strip("/")):
            return f"{field}: {uri!r} must look like {example}"
    elif parsed.scheme == "file":
        if not (parsed.netloc + parsed.path).strip("/"):
            return f"{field}: {uri!r} names no path; write file:///absolute/path"
    else:
        return (f"{field}: {uri!r} has unsupported scheme {parsed.scheme or '(none)'!r}; use "
                f"{example} or file:///path")
    if ".." in (parsed.netloc + parsed.path).split("/"):
        return f"{field}: {uri!r} contains '..'; name the location without it"
    return None


def batch_sizes_field(description: str) -> object:
    return Field(description=description, min_length=1, max_length=MAX_BATCH_SIZES)


BatchSize = Annotated[int, Field(ge=1, le=MAX_BATCH_SIZE)]


def unique_sizes(field: str, sizes: list[int] | None) -> list[int] | None:
    if sizes is not None and len(set(sizes)) != len(sizes):
        raise ValueError(f"{field}: {sizes} repeats a size; list each once, e.g. [1, 64]")
    return sizes


class Tuning(_Options):
    """TVM MetaSchedule tuning (none by default: untuned TVM rarely beats onnxruntime)."""

    budgetSeconds: Annotated[
        float,
        Field(description="Seconds of tuning per batch size; 0: no tuned candidate. Records "
                          "are cached by (model sha256, target, TVM version): a recompile "
                          "with a warm cache runs no new trials.", ge=0, le=86400),
    ] = 0.0
    trials: Annotated[
        int | None,
        Field(description="Most tuning trials per batch size (unset: as many as the budget "
                          "allows).", ge=1, le=100000),
    ] = None


class Quantization(_Options):
    """Whether an onnxruntime dynamic INT8 candidate may be published, and its gate."""

    allowed: Annotated[
        bool,
        Field(description="Also try onnxruntime dynamic INT8 quantization (often 2x faster, "
                          "not bit-exact: gated on top-1 agreement with fp32, not on "
                          "max-abs-diff)."),
    ] = False
    calibrationUri: Annotated[
        str | None,
        Field(description="Inputs to check accuracy on besides generated ones: .npz (one "
                          "array per input name) or .npy (the one input), s3:// or file://.",
              min_length=1, max_length=1024, json_schema_extra={"pattern": OBJECT_URI}),
    ] = None
    minTop1Agreement: Annotated[
        float,
        Field(description="Least share of rows whose top-1 class matches fp32's for a "
                          "quantized candidate to pass.", gt=0, le=1),
    ] = 0.99

    @field_validator("calibrationUri")
    @classmethod
    def _check_uri(cls, uri: str | None) -> str | None:
        problem = object_uri_problem("quantization.calibrationUri", uri) if uri else None
        if problem:
            raise ValueError(problem)
        return uri


class ModelCompile(_Options):
    """Compile a variant's ONNX model for the node that serves it, before serving it."""

    target: Annotated[
        CompileTarget,
        Field(description="native (the serving node's CPU), or an x86-64 flavour the nodes "
                          "run: x86-64, x86-64-v3, haswell, skylake-avx512, znver4."),
    ] = CompileTarget.NATIVE
    batchSizes: Annotated[
        list[BatchSize] | None,
        batch_sizes_field("Batch sizes compiled and measured (default [1]); other request "
                          "sizes are split and padded."),
    ] = None
    tuning: Annotated[Tuning, Field(description="TVM MetaSchedule tuning.")] = Field(
        default_factory=Tuning)
    quantization: Annotated[
        Quantization, Field(description="The INT8 candidate and its accuracy gate."),
    ] = Field(default_factory=Quantization)
    cacheUri: Annotated[
        str | None,
        Field(description="Object-store folder artifacts are cached in by content (model, "
                          "CPU, versions, these options): replicas and restarts on the same "
                          "kind of node reuse the first one's artifact instead of compiling. "
                          "Unset on Kubernetes: every pod compiles when it starts.",
              min_length=1, max_length=1024, json_schema_extra={"pattern": FOLDER_URI}),
    ] = None

    @field_validator("target")
    @classmethod
    def _host_target(cls, target: CompileTarget) -> CompileTarget:
        if target in CROSS_TARGETS:
            raise ValueError(f"{target.value} is cross-compiled and cannot be timed where it "
                             "is compiled, and a variant compiles on the node that serves it: "
                             "use native, or a CompilationJob for another machine")
        return target

    @field_validator("batchSizes")
    @classmethod
    def _unique(cls, sizes: list[int] | None) -> list[int] | None:
        return unique_sizes("batchSizes", sizes)

    @field_validator("cacheUri")
    @classmethod
    def _check_cache(cls, uri: str | None) -> str | None:
        problem = object_uri_problem("compile.cacheUri", uri, folder=True) if uri else None
        if problem:
            raise ValueError(problem)
        return uri
