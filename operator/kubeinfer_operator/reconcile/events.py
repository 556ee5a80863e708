"""Which Kubernetes Events a reconcile posts, and how an Event object looks: PURE.

kopf posts Events only for problems (its posting level is WARNING, see
``main.configure_kopf``), so the milestones a person runs ``kubectl describe``
for are decided here, from what the reconcile saw before (the old status), what
it wrote (the new status) and what it changed (``diff.Changes``):

=================  =======  ==================================================
reason             type     when
=================  =======  ==================================================
Created            Normal   an Endpoint's first successful reconcile (its
                            children created, its first full status written)
Updated            Normal   a new generation of an Endpoint applied: which
                            variants roll, which went away, what else changed
RolloutComplete    Normal   an Endpoint is Ready at a generation for the first
                            time (once per generation)
Scaled             Normal   the scaler changed a variant's replicas
                            (``cluster_scaling.scaling_event``)
Started            Normal   a TransformJob / CompilationJob started running
Completed          Normal   a job finished (its Complete condition turned True)
Failed             Warning  a job failed (its Failed condition turned True)
=================  =======  ==================================================

Each decision compares old and new, so a refresh that changes nothing posts
nothing. "Once per generation" for RolloutComplete needs one fact the status does
not keep (the Ready condition can go False and True again at one generation when
pods come and go): :class:`EndpointEventMemory` remembers, per Endpoint, the last
generation announced, and seeds it from a status that is already Ready (an
operator restart does not announce again).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kubeinfer_operator.reconcile.diff import Changes, ObjectKey, key_of
from kubeinfer_operator.reconcile.status import READY
from kubeinfer_operator.render import k8s_meta as meta

REASON_CREATED = "Created"
REASON_UPDATED = "Updated"
REASON_ROLLOUT_COMPLETE = "RolloutComplete"
REASON_SCALED = "Scaled"
REASON_STARTED = "Started"
REASON_COMPLETED = "Completed"
REASON_FAILED = "Failed"

NORMAL = "Normal"
WARNING = "Warning"
#: ``source.component`` of every Event the operator posts itself.
COMPONENT = "kubeinfer-operator"
#: Longest message posted (the API server refuses bigger ones; a person reads less).
MAX_MESSAGE = 1024

#: A job's conditions (``job_status``): imported by name to keep this module standalone.
_COMPLETE = "Complete"
_FAILED = "Failed"
_RUNNING = "Running"
_NOT_STARTED_PHASES = frozenset({"", "Pending"})


@dataclass(frozen=True)
class EventSpec:
    """One Event to post: its reason, message and type (Normal or Warning)."""

    reason: str
    message: str
    type: str = NORMAL


def event_manifest(*, api_version: str, kind: str, namespace: str, name: str, uid: str,
                   event: EventSpec, now: datetime) -> dict[str, Any]:
    """A core/v1 Event on the object (``kubectl describe`` and ``kubectl events`` show it)."""
    stamp = (now.astimezone(UTC) if now.tzinfo else now).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"generateName": f"{name}.", "namespace": namespace},
        "involvedObject": {"apiVersion": api_version, "kind": kind, "name": name,
                           "namespace": namespace, "uid": uid},
        "reason": event.reason, "message": event.message[:MAX_MESSAGE], "type": event.type,
        "source": {"component": COMPONENT},
        "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1,
    }


# -- Endpoints --------------------------------------------------------------------------------


def _condition(status: Mapping[str, Any], type_: str) -> Mapping[str, Any] | None:
    return next((c for c in status.get("conditions") or []
                 if isinstance(c, Mapping) and c.get("type") == type_), None)


def _ready_generation(status: Mapping[str, Any]) -> int | None:
    """The generation ``status`` says is Ready (rolled out), or None when not Ready."""
    ready = _condition(status, READY)
    if ready is None or ready.get("status") != "True":
        return None
    gen = ready.get("observedGeneration", status.get("observedGeneration"))
    return gen if isinstance(gen, int) and not isinstance(gen, bool) else None


def _variant_names(status: Mapping[str, Any]) -> list[str]:
    return [str(v["name"]) for v in status.get("variants") or []
            if isinstance(v, Mapping) and v.get("name")]


def _names(items: Iterable[str]) -> str:
    return ", ".join(items)


def _plural(word: str, items: list[str]) -> str:
    return f"{word}{'s' if len(items) > 1 else ''} {_names(items)}"


def describe_changes(endpoint: str, changes: Changes, variants: Iterable[str],
                     generation: int) -> str:
    """What a new generation changed, at the level of variants (``variants``: the old and
    new variant names)."""
    by_deployment = {meta.variant_object_name(endpoint, v): v for v in variants}
    written = [key_of(m) for m in (*changes.create, *changes.patch)]
    rolling = sorted({by_deployment[k.name] for k in written
                      if k.kind == "Deployment" and k.name in by_deployment})
    removed = sorted({by_deployment[k.name] for k in changes.delete
                      if k.kind == "Deployment" and k.name in by_deployment})
    gateway = ObjectKey("Deployment", meta.gateway_name(endpoint))
    others = sorted({k.kind for k in (*written, *changes.delete)
                     if k.kind != "Deployment"})
    parts = []
    if rolling:
        parts.append(f"{_plural('variant', rolling)} rolling to generation {generation}")
    if removed:
        parts.append(f"{_plural('variant', removed)} removed")
    if gateway in written:
        parts.append("gateway rolling")
    if others:
        parts.append(f"{_names(others)} updated")
    if not parts:
        return f"Generation {generation} applied: no child object changed"
    return f"Generation {generation} applied: {'; '.join(parts)}"


@dataclass(frozen=True)
class EndpointEvents:
    """The Events of one Endpoint reconcile and the generation now announced as rolled out."""

    events: tuple[EventSpec, ...]
    announced: int | None


def endpoint_events(endpoint: str, old: Mapping[str, Any] | None, new: Mapping[str, Any],
                    changes: Changes, *, announced: int | None) -> EndpointEvents:
    """The Events of a successful Endpoint reconcile that turned ``old`` into ``new``.

    ``announced``: the last generation a RolloutComplete was posted for (None: unknown,
    e.g. after an operator restart; a status already Ready at its generation counts as
    announced then, so nothing repeats).
    """
    old = old or {}
    events: list[EventSpec] = []
    generation = new.get("observedGeneration")
    gen = generation if isinstance(generation, int) else 0
    # ``url`` and ``variants`` are written by the first successful reconcile only
    # (a failed one writes conditions alone): their absence means "never set up".
    first = "url" not in old
    if first:
        variants = _variant_names(new)
        events.append(EventSpec(REASON_CREATED, (
            f"Created the gateway and {_plural('variant', variants)} for generation {gen}"
            if variants else f"Created the gateway for generation {gen}")))
    elif old.get("observedGeneration") != generation:
        names = dict.fromkeys([*_variant_names(old), *_variant_names(new)])
        events.append(EventSpec(REASON_UPDATED, describe_changes(endpoint, changes, names,
                                                                 gen)))
    was_ready = _ready_generation(old)
    if announced is None and was_ready is not None:
        announced = was_ready  # already Ready before this reconcile: announced before
    now_ready = _ready_generation(new)
    if now_ready is not None and now_ready != announced:
        ready = _condition(new, READY) or {}
        events.append(EventSpec(REASON_ROLLOUT_COMPLETE,
                                f"Generation {now_ready} rolled out: {ready.get('message', '')}"
                                .rstrip(": ")))
        announced = now_ready
    return EndpointEvents(tuple(events), announced)


class EndpointEventMemory:
    """Per Endpoint, the generation last announced as rolled out (see the module doc)."""

    def __init__(self) -> None:
        self._announced: dict[tuple[str, str], int] = {}

    def decide(self, namespace: str, endpoint: str, old: Mapping[str, Any] | None,
               new: Mapping[str, Any], changes: Changes) -> tuple[EventSpec, ...]:
        """:func:`endpoint_events`, remembering what was announced. Call it only once the
        new status is written (a failed write must not count as announced)."""
        key = (namespace, endpoint)
        decided = endpoint_events(endpoint, old, new, changes,
                                  announced=self._announced.get(key))
        if decided.announced is not None:
            self._announced[key] = decided.announced
        return decided.events

    def forget(self, namespace: str, endpoint: str) -> None:
        """A deleted Endpoint: nothing about it stays."""
        self._announced.pop((namespace, endpoint), None)


# -- TransformJobs and CompilationJobs --------------------------------------------------------


def _true(status: Mapping[str, Any], type_: str) -> Mapping[str, Any] | None:
    c = _condition(status, type_)
    return c if c is not None and c.get("status") == "True" else None


def job_events(kind: str, old: Mapping[str, Any] | None,
               new: Mapping[str, Any]) -> tuple[EventSpec, ...]:
    """The Events of a batch job's sync that turned status ``old`` into ``new``: Started
    (first Running), Completed, Failed (Warning). Each condition turns True once: the
    kinds' Complete and Failed are monotonic."""
    old = old or {}
    events: list[EventSpec] = []
    ended_before = _true(old, _COMPLETE) or _true(old, _FAILED)
    running = _true(new, _RUNNING)
    if (running is not None and not ended_before and _true(old, _RUNNING) is None
            and str(old.get("phase") or "") in _NOT_STARTED_PHASES):
        phase = str(new.get("phase") or _RUNNING)
        events.append(EventSpec(REASON_STARTED, f"{kind} started ({phase}): "
                                f"{running.get('message', '')}".rstrip(": ")))
    complete = _true(new, _COMPLETE)
    if complete is not None and _true(old, _COMPLETE) is None:
        events.append(EventSpec(REASON_COMPLETED, f"{kind} completed: "
                                f"{complete.get('message', '')}".rstrip(": ")))
    failed = _true(new, _FAILED)
    if failed is not None and _true(old, _FAILED) is None:
        events.append(EventSpec(REASON_FAILED, f"{kind} failed ({failed.get('reason', '')}): "
                                f"{failed.get('message', '')}".rstrip(": "), WARNING))
    return tuple(events)
