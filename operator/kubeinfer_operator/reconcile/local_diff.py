"""PURE diff of two endpoint plans for local mode: what must happen to which variant.

``kubeinfer up`` on a running endpoint hands the supervisor a new plan; this
module decides, per variant, the least disruptive way to get there:

* weight only          → rewrite the route table; no process is touched
* replicas             → start or stop replicas of that variant only
* model / env / resources (``VariantPlan.server_hash``) → roll the variant:
  start new servers, wait until ready, switch the route table, stop the old ones
* variant added / removed → start it / take it out of the table, then stop it

The same function tells the user what changed (``Change.describe``), so what is
printed is exactly what is done.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from kubeinfer_operator.render.plan import EndpointPlan, VariantPlan
from kubeinfer_runtime.contract.async_paths import FORMER_PATHS_ENV


class ChangeKind(StrEnum):
    ADD = "add"
    REMOVE = "remove"
    #: Restart every replica (new model servers before old ones stop).
    ROLL = "roll"
    SCALE = "scale"
    #: Route table only.
    REWEIGHT = "reweight"


@dataclass(frozen=True)
class Change:
    kind: ChangeKind
    variant: str
    old: VariantPlan | None
    new: VariantPlan | None
    #: Human-readable field changes, e.g. ``weight 0.1 → 0.5``.
    fields: tuple[str, ...] = ()

    @property
    def restarts_servers(self) -> bool:
        return self.kind is ChangeKind.ROLL

    def describe(self) -> str:
        what = ", ".join(self.fields)
        if self.kind is ChangeKind.ADD:
            assert self.new is not None
            return (f"variant {self.variant}: added ({self.new.replicas} replica(s), "
                    f"weight {_num(self.new.weight)})")
        if self.kind is ChangeKind.REMOVE:
            return f"variant {self.variant}: removed (its model servers stop)"
        if self.kind is ChangeKind.ROLL:
            return f"variant {self.variant}: {what} (model servers restart, no downtime)"
        if self.kind is ChangeKind.SCALE:
            return f"variant {self.variant}: {what} (other replicas keep running)"
        return f"variant {self.variant}: {what} (route table only, no restart)"


def _num(value: float) -> str:
    return f"{value:g}"


def _server_fields(old: VariantPlan, new: VariantPlan) -> list[str]:
    """Which restart-requiring fields differ (the parts of ``server_hash``)."""
    fields = []
    if old.model_uri != new.model_uri:
        fields.append(f"model.uri {old.model_uri} → {new.model_uri}")
    if old.model_format != new.model_format:
        fields.append(f"model.format {old.model_format.value} → {new.model_format.value}")
    if old.env != new.env:
        fields.append("env changed")
    if old.requests != new.requests or old.limits != new.limits:
        fields.append("resources changed")
    if not fields and old.server_hash != new.server_hash:
        # A field added to server_hash later must still roll the servers.
        fields.append("server settings changed")
    return fields


def diff_variant(old: VariantPlan, new: VariantPlan) -> Change | None:
    """The change of one variant present in both plans, or None when it is unchanged."""
    server = _server_fields(old, new)
    fields = list(server)
    if old.replicas != new.replicas:
        fields.append(f"replicas {old.replicas} → {new.replicas}")
    if old.weight != new.weight:
        fields.append(f"weight {_num(old.weight)} → {_num(new.weight)}")
    if ((old.max_in_flight_per_replica, old.max_queue_wait_s)
            != (new.max_in_flight_per_replica, new.max_queue_wait_s)):
        # A route-table change, like a weight: no model server restarts.
        fields.append("admission limits")
    if not fields:
        return None
    if server:
        kind = ChangeKind.ROLL
    elif old.replicas != new.replicas:
        kind = ChangeKind.SCALE
    else:
        kind = ChangeKind.REWEIGHT
    return Change(kind, new.name, old, new, tuple(fields))


def _async_fields(old: EndpointPlan, new: EndpointPlan) -> list[str]:
    """The async workers' settings that differ (their env, values unsaid: a webhook URL
    may carry a token); the former paths they carry follow from the others."""
    a, b = old.async_config, new.async_config
    if a is None or b is None:
        return []
    env_a = {k: v for k, v in a.worker_env(None).items() if k != FORMER_PATHS_ENV}
    env_b = {k: v for k, v in b.worker_env(None).items() if k != FORMER_PATHS_ENV}
    changed = sorted(k for k in env_a.keys() | env_b.keys() if env_a.get(k) != env_b.get(k))
    return [f"async settings changed ({', '.join(changed)})"] if changed else []


def diff_plans(old: EndpointPlan | None, new: EndpointPlan) -> list[Change]:
    """Changes from ``old`` (None: nothing runs yet) to ``new``, in the order to apply them.

    Capacity comes before removal: additions and rolls first, then scaling and
    weights, removals last, so traffic always has somewhere to go.
    """
    if old is not None and old.name != new.name:
        raise ValueError(f"cannot diff endpoint {old.name!r} against {new.name!r}")
    old_variants = {v.name: v for v in old.variants} if old else {}
    new_names = {v.name for v in new.variants}
    changes: list[Change] = []
    # The workers read their async settings at start: a change restarts them (rolled, as
    # a model change is); until then they would refuse what the gateway now accepts.
    async_fields = _async_fields(old, new) if old is not None else []
    for variant in new.variants:
        before = old_variants.get(variant.name)
        if before is None:
            changes.append(Change(ChangeKind.ADD, variant.name, None, variant))
            continue
        change = diff_variant(before, variant)
        if async_fields and (change is None or change.kind is not ChangeKind.ROLL):
            change = Change(ChangeKind.ROLL, variant.name, before, variant,
                            (*(change.fields if change else ()), *async_fields))
        if change is not None:
            changes.append(change)
    for name, before in old_variants.items():
        if name not in new_names:
            changes.append(Change(ChangeKind.REMOVE, name, before, None))
    order = [ChangeKind.ADD, ChangeKind.ROLL, ChangeKind.SCALE, ChangeKind.REWEIGHT,
             ChangeKind.REMOVE]
    return sorted(changes, key=lambda c: order.index(c.kind))
