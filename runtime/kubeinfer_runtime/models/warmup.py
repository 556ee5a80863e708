"""Warm-up inputs made from a model's own signature, and the warm-up run that uses them.

Readiness means "answers", not "loaded": a model can load and then fail every
inference (a Reshape to a shape no input has, an index out of range), and a
server that called it ready would be rolled out and answer every request with
424. So before a server says ready it runs the model on inputs it makes up
from the declared signature (:class:`~kubeinfer_runtime.models.base.TensorSpec`).
Making the inputs is pure (:func:`warmup_inputs`, :func:`warmup_tries`); only
:func:`run_warmup` calls the backend.

The rules, and why:

* Shapes: a dynamic first dimension (the batch) is 1, and so is every other
  dynamic dimension on the first tries; a last try sets the non-batch dynamic
  dimensions to :data:`WIDE_DYNAMIC_DIM` (a convolution over a dynamic 1x1
  image fails where a real image works). Static dimensions are as declared.
* Values: zeros first, then ones. Zeros are not valid input for every model
  (integer division by an input fails in onnxruntime, a Range with a zero
  step fails), ones rarely trip the same nodes. Strings are ``"a"``.
* A model is broken only when *every* try raises: the error reported is the
  first try's. NaN or infinite outputs are no failure (onnxruntime answers
  ``x / 0.0`` with inf); only ``predict`` raising counts.
* A signature the inputs cannot be made from (an input of unknown rank, a
  non-tensor input such as a sequence or map, inputs over
  :data:`MAX_WARMUP_ELEMENTS`) is no evidence that the model is broken: the
  warm-up is *skipped*, with the reason for one log line, and the model is
  ready once loaded, as before warm-ups existed.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from dataclasses import dataclass
from enum import Enum

import numpy as np

from kubeinfer_runtime.errors import RuntimeServiceError
from kubeinfer_runtime.models.base import Backend, ModelMetadata, Tensors, TensorSpec

#: The last try's size for dynamic dimensions other than the batch.
WIDE_DYNAMIC_DIM = 64
#: A try whose inputs hold more elements than this (all inputs together) is
#: not made: warm-up must not need more memory than a large request would.
MAX_WARMUP_ELEMENTS = 1 << 24
#: What string inputs hold.
WARMUP_STRING = "a"
#: Timed runs after the first success (the median is the warm latency).
TIMED_RUNS = 5


class WarmupImpossible(Exception):
    """No warm-up input can be made from the signature; the message says why."""


@dataclass(frozen=True)
class WarmupTry:
    """One set of synthetic inputs and how to name it in messages."""

    label: str
    inputs: Tensors


def _shape(spec: TensorSpec, dynamic: int) -> tuple[int, ...]:
    if spec.shape is None:
        raise WarmupImpossible(f'input "{spec.name}" declares no rank, so no warm-up input '
                               "can be made for it")
    return tuple(1 if d is None and i == 0 else dynamic if d is None else d
                 for i, d in enumerate(spec.shape))


def warmup_inputs(meta: ModelMetadata, *, fill: int = 0, dynamic: int = 1) -> Tensors:
    """Inputs of batch 1 for every declared input: ``fill`` of the declared dtype.

    Dynamic dimensions after the first are ``dynamic``. Raises
    :class:`WarmupImpossible` when an input's rank is unknown (non-tensor
    inputs report none) or the inputs would exceed :data:`MAX_WARMUP_ELEMENTS`.
    """
    shapes = {spec.name: _shape(spec, dynamic) for spec in meta.inputs}
    total = sum(math.prod(s) for s in shapes.values())
    if total > MAX_WARMUP_ELEMENTS:
        raise WarmupImpossible(f"the inputs would hold {total} elements, more than the "
                               f"{MAX_WARMUP_ELEMENTS} a warm-up may use")
    out: Tensors = {}
    for spec in meta.inputs:
        shape = shapes[spec.name]
        if spec.dtype.kind in "USO":
            out[spec.name] = np.full(shape, WARMUP_STRING, dtype=object)
        else:
            out[spec.name] = np.full(shape, fill, dtype=spec.dtype)
    return out


def warmup_tries(meta: ModelMetadata) -> tuple[WarmupTry, ...]:
    """The tries, in order: zeros, ones, then ones with wide dynamic dimensions.

    The wide try exists only when some input has a dynamic dimension after the
    first, and is left out when it would be too large. Raises
    :class:`WarmupImpossible` when not even the first try can be made.
    """
    tries = [WarmupTry("zeros, batch 1", warmup_inputs(meta, fill=0)),
             WarmupTry("ones, batch 1", warmup_inputs(meta, fill=1))]
    wide = any(s.shape is not None and any(d is None for d in s.shape[1:]) for s in meta.inputs)
    if wide:
        with contextlib.suppress(WarmupImpossible):  # too large: the narrow tries only
            tries.append(WarmupTry(f"ones, batch 1, dynamic dimensions {WIDE_DYNAMIC_DIM}",
                                   warmup_inputs(meta, fill=1, dynamic=WIDE_DYNAMIC_DIM)))
    return tuple(tries)


class WarmupStatus(Enum):
    PASSED = "passed"
    SKIPPED = "skipped"
    FAILED = "failed"


@dataclass(frozen=True)
class WarmupResult:
    status: WarmupStatus
    #: Median warm latency of the passing try (PASSED only).
    latency_s: float | None = None
    #: PASSED: the try that answered; SKIPPED: why no input could be made;
    #: FAILED: the first try's error (the backend's message, never input bytes).
    detail: str = ""
    #: Labels of the tries that ran (FAILED: every one of them failed).
    tried: tuple[str, ...] = ()

    def failure(self) -> str:
        """The failure as a clause for readiness reasons and errors (FAILED only)."""
        return (f"its warm-up inference on inputs made from its signature failed "
                f"({'; '.join(self.tried)}): {self.detail}")


def _error_text(e: BaseException) -> str:
    if isinstance(e, RuntimeServiceError):
        return e.message
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def run_warmup(backend: Backend, meta: ModelMetadata, *, timed_runs: int = TIMED_RUNS
               ) -> WarmupResult:
    """Run the tries until one answers; then time ``timed_runs`` more runs of it.

    The first successful run also pays onnxruntime's lazy allocations, so the
    first real request does not. Never raises for a failing model: the result
    says FAILED.
    """
    try:
        tries = warmup_tries(meta)
    except WarmupImpossible as e:
        return WarmupResult(WarmupStatus.SKIPPED, detail=str(e))
    first_error = ""
    for n, attempt in enumerate(tries, 1):
        try:
            backend.predict(attempt.inputs)
        except Exception as e:
            first_error = first_error or _error_text(e)
            continue
        times = []
        try:
            for _ in range(timed_runs):
                t0 = time.perf_counter()
                backend.predict(attempt.inputs)
                times.append(time.perf_counter() - t0)
        except Exception as e:
            # It answered once and then failed on the same input: not dependable.
            return WarmupResult(WarmupStatus.FAILED, detail=_error_text(e),
                                tried=tuple(t.label for t in tries[:n]))
        return WarmupResult(WarmupStatus.PASSED, statistics.median(times) if times else None,
                            attempt.label, tuple(t.label for t in tries[:n]))
    return WarmupResult(WarmupStatus.FAILED, detail=first_error,
                        tried=tuple(t.label for t in tries))
