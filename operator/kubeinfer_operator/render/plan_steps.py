"""The plan of multi-model and multi-container variants: PURE, no I/O.

``render.plan`` stays the one place that turns a spec into a ``VariantPlan``;
this module holds what those two variant kinds add to it (the multi-model
cache settings, the steps of a multi-container variant) and how they become
the model server's ``KUBEINFER_*`` settings, through the runtime's contract
(``PipelineSpec``), so operator and runtime cannot disagree on the format.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kubeinfer_runtime.contract import (
    InferenceExecution,
    ModelFormat,
    PipelineSpec,
    PipelineStep,
)

#: Image steps listen on FIRST_IMAGE_PORT + their index unless the spec says.
FIRST_IMAGE_PORT = 8081
#: How SageMaker tells each container of a multi-container endpoint its port; the
#: operator renders it into every image step, so a step's env may not set it.
BIND_TO_PORT_ENV = "SAGEMAKER_BIND_TO_PORT"
IMAGE_STEP_ENV = frozenset({BIND_TO_PORT_ENV})


@dataclass(frozen=True)
class MultiModelPlan:
    prefix: str
    cache_bytes: int
    disk_cache_bytes: int

    def env(self) -> dict[str, str]:
        return {
            "KUBEINFER_MULTI_MODEL_PREFIX": self.prefix,
            "KUBEINFER_CACHE_BYTES": str(self.cache_bytes),
            "KUBEINFER_DISK_CACHE_BYTES": str(self.disk_cache_bytes),
        }


@dataclass(frozen=True)
class StepPlan:
    """One step of a multi-container variant; ``kind`` says which fields apply."""

    name: str
    kind: str  # "model" | "handler" | "image"
    model_uri: str | None = None
    model_format: ModelFormat = ModelFormat.ONNX
    handler: str | None = None
    code_uri: str | None = None
    image: str | None = None
    port: int | None = None
    env: tuple[tuple[str, str], ...] = ()
    #: Image steps: the spec's resources of its container (empty: the operator's defaults).
    #: Out of ``repr`` (``VariantPlan.server_hash`` hashes steps by it) so pods of image steps
    #: that set none keep their hash.
    requests: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    limits: tuple[tuple[str, str], ...] = field(default=(), repr=False)

    @property
    def url(self) -> str | None:
        """Where the runtime reaches an image step: the same pod, its own port."""
        return f"http://127.0.0.1:{self.port}" if self.kind == "image" else None

    def contract(self) -> PipelineStep:
        return PipelineStep(name=self.name, model_uri=self.model_uri,
                            model_format=self.model_format, handler=self.handler,
                            code_dir=self.code_uri, url=self.url)


def pipeline_env(steps: tuple[StepPlan, ...], execution: str) -> dict[str, str]:
    spec = PipelineSpec(execution=InferenceExecution(execution),
                        steps=[s.contract() for s in steps])
    return {"KUBEINFER_PIPELINE": spec.model_dump_json(exclude_defaults=True)}


def describe_steps(steps: tuple[StepPlan, ...], execution: str) -> str:
    """What ``kubeinfer status`` shows where a single-model variant shows its URI."""
    return f"containers ({execution}): " + " → ".join(f"{s.name} ({s.kind})" for s in steps)
