"""Deployment guardrails in local mode: the pure ``reconcile.rollout`` machine driving
model-server processes.

When a variant's servers must change (a ``ROLL`` of ``reconcile.local_diff``) under
``spec.deploymentConfig``, the supervisor hands the change here instead of rolling
in place. Every ``interval_s`` (and at once when a spec applies) each rollout
takes one ``decide`` step: what the two fleets run (the children of slot ``v``,
blue, and ``v-green``), the alarms over the local gateway's ``/metrics`` (the
green route's own series, as the operator reads them from gateway pods) and the
clock in; the servers to start or stop and the route-table weights out
(``expand``: the variant becomes one route per fleet, both answering as ``v``).

Local mode keeps blue in slot ``v``: when a rollout completes, blue's servers
stop and green's are renamed into slot ``v`` (they keep running; the gateway
routes the same upstreams under the variant's own name), so at rest the
supervisor's usual code sees one variant with its own name. The machine is fed
its previous state with that renaming applied (``_for_machine``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from kubeinfer_operator.api.deployment_config import DeploymentConfig
from kubeinfer_operator.local.children import Child
from kubeinfer_operator.reconcile import rollout as ro
from kubeinfer_operator.reconcile.local_diff import Change, ChangeKind
from kubeinfer_operator.reconcile.promql_scope import LOCAL_NAMESPACE
from kubeinfer_operator.reconcile.rollout_alarms import (
    FleetCounters,
    FleetWindow,
    evaluate,
    mirrors,
    parse_fleet_metrics,
    render_query,
)
from kubeinfer_operator.render.plan import EndpointPlan, VariantPlan

if TYPE_CHECKING:
    from kubeinfer_operator.local.supervisor import Supervisor

log = logging.getLogger("kubeinfer.local")

PROMETHEUS_FIELD = "deploymentConfig.autoRollback.prometheusUrl"


def steady_wall_clock(wall: Callable[[], float] = time.time,
                      monotonic: Callable[[], float] = time.monotonic) -> Callable[[], float]:
    """Epoch seconds that never step: the wall clock read once, monotonic time added.

    Bake windows and the alarm window run on it: on the wall clock an NTP step
    forward ended a bake at once (green promoted unbaked) and a step back held a
    rollout for as long as the step. The states live only in this process, so
    their printed times (startedAt) are off by a later step at most.
    """
    wall0, mono0 = wall(), monotonic()
    return lambda: wall0 + (monotonic() - mono0)


class LocalRollouts:
    def __init__(self, sup: Supervisor, interval_s: float = 0.5,
                 clock: Callable[[], float] | None = None) -> None:
        self.sup = sup
        self.interval_s = interval_s
        self.clock = clock if clock is not None else steady_wall_clock()
        #: ``spec.deploymentConfig`` of the spec last applied (None: plain rolls).
        self.config: DeploymentConfig | None = None
        #: Variant -> the plan rolled out (green) while its rollout runs.
        self.targets: dict[str, VariantPlan] = {}
        #: Variant -> its latest rollout as recorded (``status.rollouts`` in state.json).
        self.states: dict[str, ro.RolloutState] = {}
        #: Variant -> the decision routes follow while its rollout runs.
        self.decisions: dict[str, ro.Decision] = {}
        self.windows: dict[str, FleetWindow] = {}

    # -- what the supervisor asks ----------------------------------------------------------

    def active(self, variant: str) -> bool:
        return variant in self.targets

    def split(self, changes: Sequence[Change], plan: EndpointPlan) -> list[Change]:
        """The ``changes`` the supervisor still carries out; rolls under a deploymentConfig,
        and any change to a variant whose rollout runs, become rollout targets."""
        rest = []
        wanted = {v.name: v for v in plan.variants}
        for change in changes:
            v = change.variant
            blue = self.sup._variant_children(v, active=True)
            if change.kind is ChangeKind.REMOVE:
                self.targets.pop(v, None)  # its green servers go at the next step
                rest.append(change)
            elif v in wanted and wanted[v].shadow_sampling is not None:
                rest.append(change)  # shadows take no production traffic: never rolled out
            elif self.active(v) or (self.config is not None and change.kind is ChangeKind.ROLL
                                    and blue):
                self.targets[v] = wanted[v]
            else:
                rest.append(change)
        for v, target in list(self.targets.items()):
            if v in wanted and wanted[v] is not target:
                self.targets[v] = wanted[v]  # e.g. back to blue's spec: no change in the diff
        return rest

    def expand(self, plan: EndpointPlan) -> EndpointPlan:
        """``plan`` as the gateway routes it: a variant under a rollout becomes its fleets,
        each answering as the variant (``production_variant``), weights split."""
        variants: list[VariantPlan] = []
        mirrored = list(plan.mirrors)
        for v in plan.variants:
            decision = self.decisions.get(v.name)
            target = self.targets.get(v.name)
            if decision is None or target is None or v.shadow_sampling is not None:
                variants.append(v)
                continue
            mirrored += [m for m in mirrors(self.config, decision.state)
                         if m.source in decision.fleets and m.peer in decision.fleets]
            for fleet, fp in decision.fleets.items():
                source = v if fleet == v.name else target
                variants.append(replace(source, name=fleet, replicas=fp.replicas,
                                        weight=target.weight * decision.weights.get(fleet, 0.0),
                                        production_variant=v.name))
        return replace(plan, variants=tuple(variants), mirrors=tuple(mirrored))

    def status(self) -> list[dict[str, Any]]:
        return [s.to_status() for _, s in sorted(self.states.items())]

    # -- stepping --------------------------------------------------------------------------

    async def run(self) -> None:
        """Step every running rollout every ``interval_s`` (not while a spec applies)."""
        while True:
            await asyncio.sleep(self.interval_s)
            if not self.targets and not self._orphans():
                continue
            try:
                async with self.sup.scaler.lock:
                    await self.step_all()
            except Exception:  # one bad step must not end the rollouts
                log.exception("rollout step failed")

    def _orphans(self) -> list[Child]:
        """Green servers of variants no longer rolling out (removed, or the spec went)."""
        return [c for c in self.sup.children
                if c.spec.variant is not None and c.spec.variant.endswith(ro.GREEN_SUFFIX)
                and c.spec.variant[:-len(ro.GREEN_SUFFIX)] not in self.targets]

    async def step_all(self) -> None:
        """One step of each rollout (the caller holds the scaler's lock)."""
        orphans = self._orphans()
        if orphans:
            for v in {c.spec.variant for c in orphans}:
                self.decisions.pop(str(v)[:-len(ro.GREEN_SUFFIX)], None)
            await self.sup.drain(orphans)
        for v in list(self.targets):
            await self._step(v)
        self.sup.write_state()

    def _children(self, slot: str) -> list[Child]:
        return [c for c in self.sup.children if c.spec.variant == slot and c.wanted]

    def _fleet(self, slot: str) -> ro.Fleet | None:
        children = self._children(slot)
        if not children:
            return None
        newest = children[-1].spec.server_hash
        current = [c for c in children if c.spec.server_hash == newest]
        failure = next((f for c in current if (f := c.failure()) is not None), None)
        return ro.Fleet(newest, sum(1 for c in current if c.ready), failure)

    def _for_machine(self, v: str) -> ro.RolloutState | None:
        state = self.states.get(v)
        if state is not None and state.phase is ro.Phase.COMPLETE:
            return replace(state, blue=v, green=v)  # green was renamed into slot v
        return state

    async def _step(self, v: str) -> None:
        target = self.targets[v]
        previous = self._for_machine(v)
        fleets = {slot: f for slot in ro.fleet_names(v) if (f := self._fleet(slot))}
        evaluations = await self._evaluate(previous)
        decision = ro.decide(variant=v, config=self.config, replicas=target.replicas,
                             desired_hash=target.server_hash, previous=previous,
                             fleets=fleets, now=datetime.fromtimestamp(self.clock(), UTC),
                             evaluations=evaluations)
        for _, message, type_ in decision.events:
            self.sup.event(message, level="error" if type_ == "Warning" else "info")
        if decision.state is not None:
            self.states[v] = decision.state
        if decision.active:
            self.decisions[v] = decision
            await self._enact(v, target, decision)
        else:
            await self._finish(v, target, decision)

    async def _enact(self, v: str, target: VariantPlan, decision: ro.Decision) -> None:
        """Start green's missing servers, stop stale or extra ones, route by the weights."""
        green_slot = ro.other_fleet(v, v)
        stop: list[Child] = []
        for slot, fp in decision.fleets.items():
            children = self._children(slot)
            if slot == v:  # blue: fewer replicas only (rolling)
                stop += [c for c in children if (c.spec.replica or 0) >= fp.replicas]
                continue
            stale = [c for c in children if c.spec.server_hash != target.server_hash
                     or (c.spec.replica or 0) >= fp.replicas]
            stop += stale
            have = {c.spec.replica for c in children if c not in stale}
            plan = replace(target, name=slot, production_variant=v)
            for i in range(fp.replicas):
                if i not in have:
                    self.sup._server_child(plan, i).active = True
        if green_slot not in decision.fleets:
            stop += self._children(green_slot)
        self.sup.sync_routes()
        if stop:
            await self.sup.drain(stop)

    async def _finish(self, v: str, target: VariantPlan, decision: ro.Decision) -> None:
        """A rollout ended: all traffic on the fleet that serves, the other fleet stopped."""
        green_slot = ro.other_fleet(v, v)
        state = decision.state
        completed = (state is not None and state.phase is ro.Phase.COMPLETE
                     and state.green == green_slot and green_slot in decision.fleets)
        self.decisions[v] = decision
        self.windows.pop(v, None)
        if completed:
            # Green takes all traffic, blue stops, then green moves into slot v.
            if blue := self._children(v):
                await self.sup.drain(blue)
            for c in self._children(green_slot):
                c.spec = replace(c.spec, variant=v, name=f"{v}-{c.spec.replica}")
            self.sup.running[v] = replace(target, production_variant=None)
        self.targets.pop(v, None)
        self.decisions.pop(v, None)
        # Rolled back or superseded: blue serves all, green stops.
        self.sup.sync_routes()
        if green := self._children(green_slot):
            await self.sup.drain(green)

    async def _evaluate(self, state: ro.RolloutState | None) -> list[ro.AlarmEvaluation]:
        config = self.config
        if (config is None or not config.alarms or state is None
                or state.phase not in (ro.Phase.BAKING, ro.Phase.TERMINATING)):
            return []
        window = self.windows.setdefault(state.variant, FleetWindow())
        now = self.clock()
        if any(a.promQL is None for a in config.alarms):
            window.add(now, {"gateway": await self._scrape(state.green)})
        out = []
        for alarm in config.alarms:
            value = None
            if alarm.promQL is not None and config.autoRollback is not None \
                    and config.autoRollback.prometheusUrl:
                value = await self.sup.scaler._prometheus(
                    config.autoRollback.prometheusUrl,
                    render_query(alarm.promQL.query, self.sup.name, state.green,
                                 LOCAL_NAMESPACE),
                    PROMETHEUS_FIELD)
            out.append(evaluate(alarm, window, since=state.step_started_at,
                                promql_value=value))
        return out

    async def _scrape(self, route: str) -> FleetCounters | None:
        gateway, client = self.sup.gateway, self.sup._client
        if gateway is None or client is None:
            return None
        with contextlib.suppress(Exception):
            response = await client.get(gateway.url + "/metrics", timeout=2.0)
            if response.status_code == 200:
                return parse_fleet_metrics(response.text, self.sup.name).get(
                    route, FleetCounters())
        return None
