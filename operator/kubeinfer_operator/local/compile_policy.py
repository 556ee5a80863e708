"""What local mode does when the compiler of a CompilationJob exits: PURE.

The same rules as the Job's podFailurePolicy and backoffLimit on Kubernetes
(``render.compile_jobs``), so a compilation fails or retries alike on a laptop
and on a cluster:

* exit 0: done (the report says what was chosen);
* exit 42 (bad input: not ONNX, a bad calibration set, bad settings): retrying
  cannot help, the job fails at once;
* anything else (a crash, a kill, an unreachable object store): restarted after
  an exponential backoff, at most ``backoffLimit`` times; then the job fails.
"""

from __future__ import annotations

from dataclasses import dataclass

from kubeinfer_operator.local.backoff import BackoffPolicy
from kubeinfer_operator.local.transform_policy import LOCAL_BACKOFF, REASON_BACKOFF_LIMIT, Next
from kubeinfer_operator.reconcile.compile_status import REASON_BAD_INPUT
from kubeinfer_runtime.contract.compile import EXIT_BAD_INPUT


@dataclass(frozen=True)
class ExitDecision:
    next: Next
    #: The job's Failed reason when it fails.
    reason: str = ""
    #: Seconds before the restart.
    delay_s: float = 0.0


def on_exit(code: int | None, *, restarts: int, retries: int,
            policy: BackoffPolicy = LOCAL_BACKOFF) -> ExitDecision:
    """What follows the compiler's exit with status ``code`` after ``restarts`` restarts."""
    if code == 0:
        return ExitDecision(Next.DONE)
    if code == EXIT_BAD_INPUT:
        return ExitDecision(Next.STOP_JOB, REASON_BAD_INPUT)
    if restarts < retries:
        return ExitDecision(Next.RESTART, delay_s=policy.delay(restarts + 1))
    return ExitDecision(Next.STOP_JOB, REASON_BACKOFF_LIMIT)
