"""PURE summaries of local endpoints: the phase the supervisor reports and ``status`` rows.

Kept apart from the supervisor and the CLI so the rules (when is an endpoint
Ready, Degraded, Failed; what a status row shows) are unit-tested without
starting anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kubeinfer_operator.local.state import (
    EndpointState,
    Phase,
    ProcessState,
    ProcState,
    VariantState,
)


@dataclass(frozen=True)
class Summary:
    phase: Phase
    message: str


def summarize(*, gateway: ProcessState | None, variants: Sequence[VariantState],
              processes: Sequence[ProcessState], applying: bool, started: bool,
              stopping: bool = False, gateway_synced: bool = True,
              apply_error: str = "") -> Summary:
    """The endpoint's phase and a one-line reason when it is not Ready.

    ``started``: a first apply has finished (before that the endpoint is Starting).
    ``apply_error``: why the last spec was not fully applied; the endpoint then
    runs (part of) what it ran before, which is not what was asked: not Ready.
    """
    if stopping:
        return Summary(Phase.STOPPING, "stopping every process")
    problems: list[str] = []
    if gateway is None or gateway.state is not ProcState.READY:
        why = gateway.reason if gateway is not None and gateway.reason else "not ready"
        problems.append(f"gateway: {why}")
    elif not gateway_synced:
        problems.append("gateway: has not loaded the latest route table yet")
    serving = 0
    for variant in variants:
        if variant.ready >= 1:
            serving += 1
        if variant.ready < variant.replicas:
            missing = [p for p in processes if p.variant == variant.name and p.routed is False
                       and p.state is not ProcState.STOPPING]
            detail = "; ".join(f"{p.name}: {p.reason or p.state.value}" for p in missing[:3])
            problems.append(f"variant {variant.name}: {variant.ready}/{variant.replicas} "
                            "replicas ready" + (f" ({detail})" if detail else ""))
    for p in processes:
        # The private redis-server of an async endpoint: nothing is queued without it.
        if p.role == "redis" and p.state is not ProcState.READY:
            problems.append(f"{p.name}: {p.reason or p.state.value}")
    if apply_error:
        problems.append(f"last spec not applied: {apply_error}")
    message = "; ".join(problems)
    if not started:
        return Summary(Phase.STARTING, message)
    if applying:
        return Summary(Phase.UPDATING, message or "applying a new spec")
    if not problems:
        return Summary(Phase.READY, "")
    gateway_ok = gateway is not None and gateway.state is ProcState.READY
    if not variants or serving == 0 or not gateway_ok:
        return Summary(Phase.FAILED, message or "no variant is running")
    return Summary(Phase.DEGRADED, message)


def variant_rows(state: EndpointState) -> list[dict[str, Any]]:
    return [
        {"endpoint": state.endpoint, "variant": v.name, "weight": f"{v.weight:g}",
         "replicas": f"{v.ready}/{v.replicas}", "model": v.model_uri}
        for v in state.variants
    ]


def process_rows(state: EndpointState) -> list[dict[str, Any]]:
    rows = []
    for p in state.processes:
        rows.append({
            "endpoint": state.endpoint,
            "process": p.name,
            "role": p.role,
            "pid": "-" if p.pid is None else str(p.pid),
            "port": str(p.port),
            "state": p.state.value + ("" if p.routed or p.role != "model-server"
                                      or p.state is not ProcState.READY else " (not routed)"),
            "restarts": str(p.restarts),
            "last exit": last_exit(p),
            "reason": p.reason,
        })
    return rows


def last_exit(p: ProcessState) -> str:
    """``OOMKilled (-9)``, like kubectl's lastState (reason, exit code), or just the code."""
    if p.last_exit is None:
        return "-"
    if p.last_termination:
        return f"{p.last_termination} ({p.last_exit})"
    return str(p.last_exit)


def status_document(states: Sequence[EndpointState],
                    stale: Sequence[str] = ()) -> dict[str, Any]:
    """What ``kubeinfer status --json`` prints: the supervisors' states as they wrote them."""
    return {
        "endpoints": [s.model_dump(mode="json") for s in states],
        "stale": list(stale),
    }
