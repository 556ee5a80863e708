"""How every kind's reconcile handler meets kopf: the same triggers, the same error mapping.

Endpoints, TransformJobs and CompilationJobs each reconcile through one ``sync`` call
on create, resume and spec update, and map its errors alike: a bad spec is
permanent (a Warning Event says why; nothing is retried until the spec changes), a
cluster hiccup is retried with exponential backoff, never in a hot loop. Keeping it
here means the kinds cannot drift apart in how they fail.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import kopf

from kubeinfer_operator.errors import ClusterError, SpecError

MAX_BACKOFF_S = 60.0

#: What kopf passes as ``logger``.
Logger = logging.Logger | logging.LoggerAdapter[Any]

F = TypeVar("F", bound=Callable[..., Any])


def backoff_delay(retry: int) -> float:
    """Seconds before retry number ``retry`` (0-based): 1, 2, 4, … capped at a minute."""
    return float(min(MAX_BACKOFF_S, 2.0 ** max(0, retry)))


def on_reconcile(registry: kopf.OperatorRegistry,
                 resource: tuple[str, str, str]) -> Callable[[F], F]:
    """Register a handler as the kind's ``reconcile``: on create, spec update and resume."""
    def register(fn: F) -> F:
        # In the order stacked decorators would apply them (resume first).
        kopf.on.resume(*resource, id="reconcile", registry=registry,
                       backoff=MAX_BACKOFF_S)(fn)
        kopf.on.update(*resource, id="reconcile", registry=registry, field="spec",
                       backoff=MAX_BACKOFF_S)(fn)
        kopf.on.create(*resource, id="reconcile", registry=registry,
                       backoff=MAX_BACKOFF_S)(fn)
        return fn
    return register


async def reconcile_or_raise(sync: Awaitable[object], *, body: kopf.Body, retry: int,
                             logger: Logger) -> None:
    """Await one sync, mapping its errors to kopf's (permanent for a bad spec)."""
    try:
        await sync
    except SpecError as exc:
        # A Warning Event too, so `kubectl describe` shows why.
        kopf.warn(body, reason=getattr(exc, "reason", "InvalidSpec"), message=str(exc))
        raise kopf.PermanentError(str(exc)) from exc
    except ClusterError as exc:
        delay = backoff_delay(retry)
        logger.warning("%s; retrying in %.0f s", exc, delay)
        raise kopf.TemporaryError(str(exc), delay=delay) from exc
