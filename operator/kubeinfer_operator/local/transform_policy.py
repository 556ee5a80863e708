"""What local mode does when a batch process of a TransformJob exits: PURE.

The same rules as the workers' podFailurePolicy on Kubernetes
(``render.transform_jobs``), so a job fails or retries alike on a laptop and on
a cluster:

* exit 0: the process is done;
* exit 43 (the model cannot load): the whole job fails at once;
* exit 42 (bad input): retrying cannot help. With ``maxFailedRecords: 0`` the
  job fails at once (``maxFailedIndexes: 0``); otherwise the other workers
  finish first (their outputs and error lists are kept for the next run);
* anything else (a crash, a kill): restarted after an exponential backoff, at
  most ``backoffLimitPerIndex`` times; then as bad input.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from kubeinfer_operator.local.backoff import BackoffPolicy
from kubeinfer_operator.reconcile.transform_observe import ExitKind, classify_exit
from kubeinfer_operator.render.transform_names import REASON_BAD_INPUT, REASON_MODEL_FAILED

REASON_BACKOFF_LIMIT = "BackoffLimitExceeded"
#: Restarts of the planner and the finalizer, as their Jobs' backoffLimit.
STEP_RETRIES = 3
#: Local restarts: quicker than a kubelet's (10 s doubling), for a laptop.
LOCAL_BACKOFF = BackoffPolicy(initial_s=1.0, factor=2.0, cap_s=30.0)


class Next(StrEnum):
    DONE = "done"
    RESTART = "restart"
    #: This process failed for good; the others may finish.
    FAIL = "fail"
    #: The job fails now: stop every other process.
    STOP_JOB = "stop-job"


@dataclass(frozen=True)
class ExitDecision:
    next: Next
    #: The job's Failed reason when the process failed for good.
    reason: str = ""
    #: Seconds before the restart.
    delay_s: float = 0.0


def on_exit(code: int | None, *, restarts: int, retries: int, tolerant: bool = False,
            policy: BackoffPolicy = LOCAL_BACKOFF) -> ExitDecision:
    """What follows the exit of a batch process with status ``code``.

    ``restarts``: how often it was restarted already; ``tolerant``: a bad shard lets
    the others finish (workers with ``maxFailedRecords`` above 0).
    """
    kind = classify_exit(code)
    if kind is ExitKind.OK:
        return ExitDecision(Next.DONE)
    if kind is ExitKind.MODEL_FAILED:
        return ExitDecision(Next.STOP_JOB, REASON_MODEL_FAILED)
    if kind is ExitKind.TRANSIENT and restarts < retries:
        return ExitDecision(Next.RESTART, delay_s=policy.delay(restarts + 1))
    reason = REASON_BAD_INPUT if kind is ExitKind.BAD_INPUT else REASON_BACKOFF_LIMIT
    return ExitDecision(Next.FAIL if tolerant else Next.STOP_JOB, reason)
