"""Rollout decisions into an Endpoint's status and Events: PURE.

``serving_aliases`` lets the Endpoint's usual status code see each variant's
serving fleet under the variant's own Deployment name (after a rollout the
``<variant>-green`` slot serves). ``apply`` writes ``status.rollouts``, the
``RolledBack`` condition and, while a rollout runs, Progressing=True reason
RollingOut (Ready stays what blue's fleet says: it serves throughout).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from kubeinfer_operator.reconcile import rollout as ro
from kubeinfer_operator.reconcile.events import EventSpec
from kubeinfer_operator.reconcile.status import merge_conditions


def _object_name(endpoint: str, fleet: str) -> str:
    return f"{endpoint}-{fleet}"  # render.k8s_meta.variant_object_name


def serving_aliases(endpoint: str, deployments: Mapping[str, Mapping[str, Any]],
                    decisions: Mapping[str, ro.Decision]) -> dict[str, Mapping[str, Any]]:
    out = dict(deployments)
    for variant, d in decisions.items():
        serving = d.state.blue if d.active and d.state is not None else next(
            iter(d.fleets), variant)
        if serving != variant:
            found = deployments.get(_object_name(endpoint, serving))
            if found is not None:
                out[_object_name(endpoint, variant)] = found
            else:
                out.pop(_object_name(endpoint, variant), None)
    return out


def apply(status: dict[str, Any], decisions: Mapping[str, ro.Decision], generation: int,
          old: Mapping[str, Any], now: datetime) -> tuple[EventSpec, ...]:
    """Put the rollouts in ``status``; return the Events to post."""
    if not decisions:
        return ()
    status["rollouts"] = [d.state.to_status() for _, d in sorted(decisions.items())
                          if d.state is not None]
    fresh = ro.conditions(decisions, generation)
    progressing = ro.progressing(decisions, generation)
    conditions = [c for c in status.get("conditions") or []
                  if c.get("type") != ro.CONDITION_ROLLED_BACK
                  and not (progressing and c.get("type") == "Progressing")]
    previous = {c.get("type"): c for c in old.get("conditions") or []
                if isinstance(c, Mapping)}
    added = fresh + ([progressing] if progressing else [])
    merged = merge_conditions([previous[c["type"]] for c in added if c["type"] in previous],
                              added, now)
    status["conditions"] = conditions + merged
    return tuple(EventSpec(reason, message, type_)
                 for d in decisions.values() for reason, message, type_ in d.events)
