"""An Endpoint's status from what its Deployments report: PURE (the clock is an argument).

Two questions, two answers:

* *Routing* (``serving_variants``): a variant gets traffic from the gateway as
  soon as its Deployment has one available replica, old or new template.
* *Readiness* (the conditions): a Deployment is *rolled out* when its
  controller has observed its latest generation (``status.observedGeneration``)
  and its updated and available replicas both meet ``spec.replicas`` with no
  pod of an older template left, as ``kubectl rollout status`` decides. The
  Endpoint is Ready when the gateway and every variant are rolled out; GitOps
  tools and ``kubectl wait`` then know the new spec is serving, not the old
  pods beside it. A Deployment whose
  controller reports ``Progressing=False`` (``ProgressDeadlineExceeded``) is
  stalled: its variant's condition carries the Deployment's reason and
  message, and Ready follows.

Conditions (metav1.Condition, one per type) are written for three audiences:
``Ready`` (``kubectl wait``, Argo CD's health check in docs/gitops.md),
``Progressing`` (True while Deployments roll out, as on a Deployment), and
kstatus's abnormal-true pair ``Reconciling`` / ``Stalled`` (Flux, kpt,
cli-utils: InProgress while Reconciling, Failed when Stalled, Current when
neither and ``status.observedGeneration`` matches). ``lastTransitionTime``
changes only when a condition's status flips, so re-running the reconcile on
an unchanged cluster yields an identical status (and no write).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kubeinfer_operator.render import k8s_meta as meta
from kubeinfer_operator.render.plan import EndpointPlan

READY = "Ready"
PROGRESSING = "Progressing"
#: kstatus's standard conditions ("abnormal-true": True means work left / stuck).
RECONCILING = "Reconciling"
STALLED = "Stalled"
#: Per-variant condition types are ``VariantReady-<variant>`` (valid metav1
#: condition types; ``kubectl wait --for=condition=VariantReady-canary`` works).
VARIANT_READY_PREFIX = "VariantReady-"

REASON_READY = "AllVariantsReady"
REASON_GATEWAY_UNAVAILABLE = "GatewayUnavailable"
REASON_VARIANTS_UNAVAILABLE = "VariantsUnavailable"
REASON_AVAILABLE = "Available"
REASON_UNAVAILABLE = "Unavailable"
REASON_ROLLING_OUT = "RollingOut"
REASON_ROLLOUT_COMPLETE = "RolloutComplete"
#: What the Deployment controller reports when a rollout stops making progress.
REASON_DEADLINE_EXCEEDED = "ProgressDeadlineExceeded"
REASON_NAME_CONFLICT = "NameConflict"
REASON_REJECTED = "RejectedByAPI"
#: The operator's Redis refuses to keep the namespace's user (``redis_acl``).
REASON_REDIS_ACL = "RedisAclUnavailable"


def timestamp(now: datetime) -> str:
    """RFC 3339 in UTC, second precision, as Kubernetes writes times."""
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class DeploymentState:
    exists: bool = False
    desired: int = 0
    ready: int = 0
    available: int = 0
    updated: int = 0
    #: ``status.replicas``: pods of every template (old ones linger while a rollout runs).
    total: int = 0
    #: ``metadata.generation`` / ``status.observedGeneration`` (None: not reported).
    generation: int | None = None
    observed_generation: int | None = None
    #: The controller's ``Progressing=False`` reason and message, if it gave up.
    stall_reason: str | None = None
    stall_message: str = ""

    @property
    def serving(self) -> bool:
        """At least one replica answers: the gateway may route here."""
        return self.available >= 1

    @property
    def observed(self) -> bool:
        """The controller has seen the latest template and replica count. Unknown (either
        field missing, as on a Deployment no controller has touched yet) counts as seen,
        as kstatus does: the replica counts decide then."""
        return (self.generation is None or self.observed_generation is None
                or self.observed_generation >= self.generation)

    @property
    def stalled(self) -> bool:
        # A stale Progressing=False from the previous template is no verdict on this one.
        return self.exists and self.observed and self.stall_reason is not None

    @property
    def rolled_out(self) -> bool:
        return (self.exists and self.observed and not self.stalled
                and self.updated >= self.desired and self.available >= self.desired
                and self.total <= self.updated)


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _opt_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def deployment_state(deployment: Mapping[str, Any] | None) -> DeploymentState:
    if deployment is None:
        return DeploymentState()
    spec = deployment.get("spec") or {}
    status = deployment.get("status") or {}
    stall = next((c for c in status.get("conditions") or []
                  if isinstance(c, Mapping) and c.get("type") == "Progressing"
                  and c.get("status") == "False"), None)
    return DeploymentState(exists=True, desired=_int(spec.get("replicas", 1)),
                           ready=_int(status.get("readyReplicas")),
                           available=_int(status.get("availableReplicas")),
                           updated=_int(status.get("updatedReplicas")),
                           total=_int(status.get("replicas")),
                           generation=_opt_int((deployment.get("metadata") or {}).get(
                               "generation")),
                           observed_generation=_opt_int(status.get("observedGeneration")),
                           stall_reason=(str(stall.get("reason") or REASON_DEADLINE_EXCEEDED)
                                         if stall is not None else None),
                           stall_message=str(stall.get("message") or "") if stall else "")


def deployments_by_name(objects: Iterable[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    return {str((o.get("metadata") or {}).get("name")): o for o in objects
            if o.get("kind") == "Deployment"}


def serving_variants(plan: EndpointPlan, deployments: Mapping[str, Mapping[str, Any]]) -> set[str]:
    """Variants whose Deployment has an available replica: the only ones the gateway routes to."""
    return {
        v.name for v in plan.variants
        if deployment_state(deployments.get(meta.variant_object_name(plan.name, v.name))).serving
    }


def condition(type_: str, status: bool, reason: str, message: str,
              generation: int) -> dict[str, Any]:
    return {"type": type_, "status": "True" if status else "False", "reason": reason,
            "message": message, "observedGeneration": generation}


#: Endpoint-level condition types this module owns (written on every reconcile).
def condition_true(status: Mapping[str, Any], type_: str) -> bool:
    """Whether ``status.conditions`` holds ``type_`` with status "True"."""
    return any(c.get("type") == type_ and c.get("status") == "True"
               for c in status.get("conditions") or [] if isinstance(c, Mapping))


ENDPOINT_CONDITIONS = (READY, PROGRESSING, RECONCILING, STALLED)
#: Reasons that need a person (a spec change, a freed name, a fixed rollout): Stalled=True.
STALL_REASONS = frozenset({"InvalidSpec", REASON_REJECTED, REASON_NAME_CONFLICT,
                           REASON_DEADLINE_EXCEEDED})


def _ours(type_: str) -> bool:
    return type_ in ENDPOINT_CONDITIONS or type_.startswith(VARIANT_READY_PREFIX)


def merge_conditions(old: Iterable[Mapping[str, Any]], new: Iterable[dict[str, Any]],
                     now: datetime, *, keep_variants: bool = False) -> list[dict[str, Any]]:
    """``new`` with lastTransitionTime carried over where the status did not flip.

    Conditions other writers own are kept; our per-variant conditions that are
    not in ``new`` are dropped (the variant is gone) unless ``keep_variants``.
    """
    previous = {str(c.get("type")): c for c in old if isinstance(c, Mapping)}
    out: list[dict[str, Any]] = []
    fresh_types = set()
    for fresh in new:
        before = previous.get(fresh["type"])
        same = before is not None and before.get("status") == fresh["status"]
        c = dict(fresh)
        c["lastTransitionTime"] = (str(before.get("lastTransitionTime")) if same and before
                                   else timestamp(now))
        fresh_types.add(c["type"])
        out.append(c)
    for type_, kept in previous.items():
        if type_ in fresh_types:
            continue
        if not _ours(type_) or (keep_variants and type_.startswith(VARIANT_READY_PREFIX)):
            out.append(dict(kept))
    return out


def _sentence(text: str) -> str:
    """A controller's message in our style: no final period."""
    return text.strip().rstrip(".")


def _describe(namespace: str | None, name: str) -> str:
    return f"kubectl describe deployment {name} -n {namespace}"


def _rollout_problem(namespace: str | None, name: str,
                     state: DeploymentState) -> tuple[str, str] | None:
    """(reason, message) of why a Deployment is not rolled out, or None if it is."""
    dep = f"Deployment {namespace}/{name}"
    if not state.exists:
        return REASON_UNAVAILABLE, f"{dep}: not created yet"
    if state.stalled:
        return (state.stall_reason or REASON_DEADLINE_EXCEEDED,
                f"{dep}: {_sentence(state.stall_message) or 'rollout stopped progressing'}; "
                "fix what keeps its new pods from becoming available "
                f"({_describe(namespace, name)}) or change the Endpoint spec back")
    if not state.observed:
        return (REASON_ROLLING_OUT,
                f"{dep}: generation {state.generation} not yet observed by its controller "
                f"(observed {state.observed_generation})")
    if state.updated < state.desired:
        return (REASON_ROLLING_OUT,
                f"{dep}: {state.updated}/{state.desired} replicas updated, "
                f"{state.available} available")
    if state.total > state.updated:
        return (REASON_ROLLING_OUT,
                f"{dep}: {state.total - state.updated} old replicas pending termination, "
                f"{state.available} available")
    if state.available < state.desired:
        return (REASON_UNAVAILABLE,
                f"{dep}: {state.available}/{state.desired} replicas available")
    return None


def _variant_condition(plan: EndpointPlan, name: str, state: DeploymentState,
                       generation: int) -> dict[str, Any]:
    obj = meta.variant_object_name(plan.name, name)
    problem = _rollout_problem(plan.namespace, obj, state)
    if problem is None:
        return condition(VARIANT_READY_PREFIX + name, True, REASON_AVAILABLE,
                         f"Deployment {plan.namespace}/{obj}: {state.available}/{state.desired}"
                         " replicas available", generation)
    reason, message = problem
    if not state.serving and (state.desired > 0 or not state.exists) and (
            reason != REASON_DEADLINE_EXCEEDED):
        message += (f"; the gateway does not route to variant {name} until a replica is "
                    f"available ({_describe(plan.namespace, obj)})")
    return condition(VARIANT_READY_PREFIX + name, False, reason, message, generation)


def _progress_conditions(ready: dict[str, Any], *, stalled: bool,
                         generation: int) -> list[dict[str, Any]]:
    """Progressing, Reconciling and Stalled, derived from Ready and whether it is stuck."""
    reason, message = ready["reason"], ready["message"]
    if ready["status"] == "True":
        done = "Every Deployment has rolled out the current spec"
        return [condition(PROGRESSING, False, REASON_ROLLOUT_COMPLETE, done, generation),
                condition(RECONCILING, False, REASON_ROLLOUT_COMPLETE, done, generation),
                condition(STALLED, False, REASON_ROLLOUT_COMPLETE, done, generation)]
    if stalled:
        return [condition(PROGRESSING, False, reason, message, generation),
                condition(RECONCILING, False, reason, message, generation),
                condition(STALLED, True, reason, message, generation)]
    return [condition(PROGRESSING, True, REASON_ROLLING_OUT, message, generation),
            condition(RECONCILING, True, reason, message, generation),
            condition(STALLED, False, REASON_ROLLING_OUT, message, generation)]


def endpoint_status(plan: EndpointPlan, deployments: Mapping[str, Mapping[str, Any]], *,
                    url: str, old: Mapping[str, Any] | None, now: datetime) -> dict[str, Any]:
    """The full status of a valid Endpoint whose children have been applied."""
    gen = plan.generation
    states = {v.name: deployment_state(deployments.get(meta.variant_object_name(plan.name, v.name)))
              for v in plan.variants}
    gw = meta.gateway_name(plan.name)
    gateway = deployment_state(deployments.get(gw))
    rolled_out = [v.name for v in plan.variants if states[v.name].rolled_out]
    stalled_variants = [v.name for v in plan.variants if states[v.name].stalled]
    waiting = [v.name for v in plan.variants if not states[v.name].rolled_out]
    gateway_problem = _rollout_problem(plan.namespace, gw, gateway)
    if gateway_problem is not None:
        reason, message = gateway_problem
        if reason != REASON_DEADLINE_EXCEEDED:
            reason = REASON_GATEWAY_UNAVAILABLE
            if not gateway.serving:
                message = (f"Deployment {plan.namespace}/{gw} has no available replica yet "
                           f"({_describe(plan.namespace, gw)})")
        ready = condition(READY, False, reason, message, gen)
    elif stalled_variants:
        first = stalled_variants[0]
        problem = _rollout_problem(plan.namespace, meta.variant_object_name(plan.name, first),
                                   states[first])
        assert problem is not None  # a stalled Deployment is never rolled out
        ready = condition(READY, False, problem[0], f"Variant {first}: {problem[1]}", gen)
    elif waiting:
        ready = condition(READY, False, REASON_VARIANTS_UNAVAILABLE,
                          f"Variants not rolled out: {', '.join(waiting)}; "
                          "see their VariantReady conditions", gen)
    else:
        ready = condition(READY, True, REASON_READY,
                          f"Gateway and {len(rolled_out)}/{len(plan.variants)} variants "
                          f"rolled out and available at {url}", gen)
    stalled = gateway.stalled or bool(stalled_variants)
    conditions = [ready, *_progress_conditions(ready, stalled=stalled, generation=gen),
                  *(_variant_condition(plan, v.name, states[v.name], gen)
                    for v in plan.variants)]
    return {
        "observedGeneration": gen,
        "url": url,
        "readyVariants": f"{len(rolled_out)}/{len(plan.variants)}",
        "variants": [{"name": v.name, "desiredReplicas": v.replicas,
                      "readyReplicas": states[v.name].ready, "weight": v.weight}
                     for v in plan.variants],
        "conditions": merge_conditions((old or {}).get("conditions") or [], conditions, now),
    }


def failed_status(generation: int, reason: str, message: str, *,
                  old: Mapping[str, Any] | None, now: datetime) -> dict[str, Any]:
    """Ready=False with ``reason``; what was reported about running children stays."""
    out = {k: v for k, v in (old or {}).items() if k != "conditions"}
    out["observedGeneration"] = generation
    ready = condition(READY, False, reason, message, generation)
    fresh = [ready, *_progress_conditions(ready, stalled=reason in STALL_REASONS,
                                          generation=generation)]
    out["conditions"] = merge_conditions((old or {}).get("conditions") or [], fresh, now,
                                         keep_variants=True)
    return out
