"""An async endpoint's former output paths, read from the workers it runs (PURE).

Why this exists: requests queued before ``spec.async.outputPath`` or
``failurePath`` changed must still be written where their callers were told
(``contract.async_paths`` says why and how long). The operator keeps no status
for it: the async workers' Deployments are the record. Their env holds the
paths they write under and the former pairs they carry, so the next rendering
carries the pair being replaced forward with a deadline fixed when it was
first replaced (re-rendering the same spec changes no env, so nothing rolls).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

from kubeinfer_operator.render.async_plan import AsyncPlan
from kubeinfer_runtime.contract import Role
from kubeinfer_runtime.contract.async_paths import (
    FORMER_PATHS_ENV,
    FormerAsyncPaths,
    carry_former_paths,
    parse_former_paths,
)


def _worker_env(deployment: Mapping[str, Any]) -> dict[str, str] | None:
    """The literal env of the Deployment's async-worker container, or None."""
    spec = deployment.get("spec")
    template = spec.get("template") if isinstance(spec, Mapping) else None
    pod = template.get("spec") if isinstance(template, Mapping) else None
    containers = pod.get("containers") if isinstance(pod, Mapping) else None
    for container in containers if isinstance(containers, list) else []:
        if isinstance(container, Mapping) and container.get("name") == Role.ASYNC_WORKER.value:
            return {e["name"]: e["value"] for e in container.get("env") or []
                    if isinstance(e, Mapping) and isinstance(e.get("name"), str)
                    and isinstance(e.get("value"), str)}
    return None


def with_former_paths(plan: AsyncPlan, deployments: Iterable[Mapping[str, Any]],
                      now: float) -> AsyncPlan:
    """``plan`` carrying the paths the endpoint's running workers (``deployments``: its
    Deployments, any kind) write under and carry, less its own current pair."""
    current = (plan.output_path, plan.failure_path)
    previous: list[tuple[str, str]] = []
    former: list[FormerAsyncPaths] = list(plan.former_paths)
    for deployment in deployments:
        env = _worker_env(deployment)
        if env is None:
            continue
        output, failure = env.get("KUBEINFER_OUTPUT_PATH"), env.get("KUBEINFER_FAILURE_PATH")
        if output and failure:
            previous.append((output, failure))
        # Edited by hand into garbage: what it carried is lost, the current pair is not.
        with contextlib.suppress(ValueError):
            former += parse_former_paths(env.get(FORMER_PATHS_ENV, ""))
    carried = carry_former_paths(None, former, current, now)
    for pair in dict.fromkeys(previous):
        carried = carry_former_paths(pair, carried, current, now)
    return replace(plan, former_paths=tuple(carried))
