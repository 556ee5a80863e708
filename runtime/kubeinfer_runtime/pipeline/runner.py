"""Running a multi-container variant: Serial chains the steps, Direct picks one.

Serial: each step's response body and Content-Type are the next step's
request; the client's Accept applies to the last step only (intermediate
model steps answer JSON, the codec's default). A failure at step k is a 424
ModelError naming step k and passing its message on; a step that is not ready
stays a 503 (retrying helps).

Direct: ``X-Amzn-SageMaker-Target-Container-Hostname`` names the step (its
``name``); a missing or unknown name is a 400 listing the valid ones.
"""

from __future__ import annotations

from collections.abc import Sequence

from kubeinfer_runtime.contract import InferenceExecution
from kubeinfer_runtime.errors import ModelError, NotReady, RuntimeServiceError, ValidationError
from kubeinfer_runtime.pipeline.steps import Result, Step


class Pipeline:
    def __init__(self, steps: Sequence[Step], execution: InferenceExecution) -> None:
        self.steps = list(steps)
        self.execution = execution
        self.by_name = {s.name: s for s in self.steps}

    def names(self) -> str:
        return ", ".join(s.name for s in self.steps)

    def not_ready(self) -> str | None:
        for i, step in enumerate(self.steps, 1):
            reason = step.not_ready()
            if reason is not None:
                return f'Step {i} ("{step.name}") is not ready: {reason}'
        return None

    async def run(self, body: bytes, content_type: str | None, accept: str | None,
                  target: str | None) -> Result:
        if self.execution is InferenceExecution.DIRECT:
            return await self._direct(body, content_type, accept, target)
        return await self._serial(body, content_type, accept)

    async def _direct(self, body: bytes, content_type: str | None, accept: str | None,
                      target: str | None) -> Result:
        if not target:
            raise ValidationError("Header X-Amzn-SageMaker-Target-Container-Hostname is "
                                  "missing: this endpoint invokes containers directly; set "
                                  f"TargetContainerHostname= to one of {self.names()}")
        step = self.by_name.get(target)
        if step is None:
            raise ValidationError(f'Target container "{target[:100]}" does not exist: set '
                                  f"TargetContainerHostname= to one of {self.names()}")
        return await step.invoke(body, content_type, accept)

    async def _serial(self, body: bytes, content_type: str | None,
                      accept: str | None) -> Result:
        n = len(self.steps)
        ct: str | None = content_type
        for i, step in enumerate(self.steps, 1):
            try:
                body, ct = await step.invoke(body, ct, accept if i == n else None)
            except NotReady:
                raise
            except RuntimeServiceError as e:
                raise ModelError(f'Step {i} of {n} ("{step.name}") failed with {e.status} '
                                 f"{e.code}: {e.message}") from None
            except Exception as e:
                raise ModelError(f'Step {i} of {n} ("{step.name}") failed: '
                                 f"{type(e).__name__}: {e}") from None
        assert ct is not None
        return body, ct
