"""Records gateway metrics cheaply: label children are resolved once and cached.

The metrics themselves live in ``kubeinfer_runtime.metrics`` (gateway section)
with the rest of the runtime's. ``Counter.labels(...)`` costs a few
microseconds per call, a noticeable part of the hop's budget, so the hot path
goes through the caches here instead. Label values come from the route table
(bounded), never from raw client input: an unknown endpoint is counted as
``UNKNOWN`` so a client cannot blow up the series count. Error codes passed through
from model servers are bounded too (``upstream_code``).
"""

from __future__ import annotations

import contextlib
import re
from typing import Any

from kubeinfer_runtime import metrics

UNKNOWN = "(unknown)"

_ok: dict[tuple[str, str], tuple[Any, Any, Any]] = {}
_errors: dict[tuple[str, str, str], Any] = {}

#: Distinct error codes a process takes from model servers' ``x-amzn-ErrorType`` as
#: ``code`` labels; a code first seen after these is counted as ``HTTP<status>``.
MAX_UPSTREAM_CODES = 32
#: What an error code looks like (SageMaker's are CamelCase words).
_CODE = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,63}")
_upstream_codes: set[str] = set()


def upstream_code(error_type: bytes | None, status: int, seen: set[str] | None = None,
                  limit: int = MAX_UPSTREAM_CODES) -> str:
    """The ``code`` label of an upstream error answer (PURE but for ``seen``).

    The header is the model server's: a handler or an image may put anything in it
    (an exception message, a request id), and every distinct value would be a new
    series held for the process's life, exported on every scrape (the operator's
    scaler ignores a gateway whose /metrics grows past its bound). So a code must look
    like one, and only the first ``limit`` distinct codes (``seen``, process-wide by
    default) are labels; anything else is counted as ``HTTP<status>``.
    """
    fallback = f"HTTP{status}"
    if not error_type:
        return fallback
    code = error_type.decode("latin-1").split(":", 1)[0]
    if not _CODE.fullmatch(code):
        return fallback
    known = _upstream_codes if seen is None else seen
    if code not in known:
        if len(known) >= limit:
            return fallback
        known.add(code)
    return code


def _children(endpoint: str, variant: str) -> tuple[Any, Any, Any]:
    key = (endpoint, variant)
    found = _ok.get(key)
    if found is None:
        found = _ok[key] = (
            metrics.GATEWAY_INVOCATIONS.labels(endpoint, variant),
            metrics.GATEWAY_OVERHEAD_SECONDS.labels(endpoint, variant),
            metrics.GATEWAY_MODEL_LATENCY_SECONDS.labels(endpoint, variant),
        )
    return found


def invocation(endpoint: str, variant: str, overhead_s: float, model_s: float) -> None:
    """A request the model server answered (whatever its status)."""
    invocations, overhead, model = _children(endpoint, variant)
    invocations.inc()
    overhead.observe(overhead_s)
    model.observe(model_s)


def error(endpoint: str, variant: str, code: str) -> None:
    """An error answer, from the gateway itself or passed through from the model server."""
    key = (endpoint, variant, code)
    child = _errors.get(key)
    if child is None:
        child = _errors[key] = metrics.GATEWAY_ERRORS.labels(endpoint, variant, code)
    child.inc()


def upstream_health(url: str, up: bool) -> None:
    metrics.GATEWAY_UPSTREAM_UP.labels(url).set(1 if up else 0)


def forget_upstream(url: str) -> None:
    with contextlib.suppress(KeyError):
        metrics.GATEWAY_UPSTREAM_UP.remove(url)


def route_table_loaded(revision: int) -> None:
    metrics.GATEWAY_ROUTE_TABLE_REVISION.set(revision)


def route_table_rejected() -> None:
    metrics.GATEWAY_ROUTE_TABLE_REJECTED.inc()
