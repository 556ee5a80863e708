"""Records gateway metrics cheaply: label children are resolved once and cached.

The metrics themselves live in ``kubeinfer_runtime.metrics`` (gateway section)
with the rest of the runtime's. ``Counter.labels(...)`` costs a few
microseconds per call, a noticeable part of the hop's budget, so the hot path
goes through the caches here instead. Label values come from the route table
(bounded), never from raw client input: an unknown endpoint is counted as
``UNKNOWN`` so a client cannot blow up the series count.
"""

from __future__ import annotations

import contextlib
from typing import Any

from kubeinfer_runtime import metrics

UNKNOWN = "(unknown)"

_ok: dict[tuple[str, str], tuple[Any, Any, Any]] = {}
_errors: dict[tuple[str, str, str], Any] = {}


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
