"""The operator's own metrics (observability): a registry per operator, bounded labels."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kubeinfer_operator.errors import ClusterError, ConflictError, SpecError
from kubeinfer_operator.observability import OperatorMetrics, reconcile_result
from kubeinfer_operator.reconcile.cluster_scaling import ScaleChange


def samples(metrics: OperatorMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(metrics: OperatorMetrics, name: str, **labels: str) -> float:
    return samples(metrics).get((name, tuple(sorted(labels.items()))), 0.0)


def test_reconciles_counted_by_kind_and_result() -> None:
    m = OperatorMetrics()
    # Present at zero before anything happened.
    assert ("kubeinfer_operator_reconciles_total",
            (("kind", "TransformJob"), ("result", "ok"))) in samples(m)
    with m.reconcile("Endpoint"):
        pass
    for exc in (SpecError("bad"), ConflictError("taken"), ClusterError("down"),
                RuntimeError("bug")):
        with pytest.raises(type(exc)), m.reconcile("Endpoint"):
            raise exc
    assert value(m, "kubeinfer_operator_reconciles_total", kind="Endpoint", result="ok") == 1
    for result in ("invalid", "conflict"):
        assert value(m, "kubeinfer_operator_reconciles_total", kind="Endpoint",
                     result=result) == 1
    assert value(m, "kubeinfer_operator_reconciles_total", kind="Endpoint",
                 result="error") == 2
    assert value(m, "kubeinfer_operator_reconcile_duration_seconds_count",
                 kind="Endpoint") == 5


def test_a_cancelled_reconcile_is_not_counted() -> None:
    m = OperatorMetrics()
    with pytest.raises(asyncio.CancelledError), m.reconcile("CompilationJob"):
        raise asyncio.CancelledError
    assert value(m, "kubeinfer_operator_reconcile_duration_seconds_count",
                 kind="CompilationJob") == 0


def test_result_labels() -> None:
    assert reconcile_result(None) == "ok"
    assert reconcile_result(SpecError("x")) == "invalid"
    assert reconcile_result(ConflictError("x")) == "conflict"
    assert reconcile_result(ClusterError("x")) == "error"


def test_scale_decisions_active_and_registries_apart() -> None:
    one, two = OperatorMetrics(), OperatorMetrics()  # no "Duplicated timeseries" error
    one.scale_decision(ScaleChange("from_zero", "serverless"))
    one.scale_decision(ScaleChange("from_zero", "serverless"))
    one.set_active(True)
    assert value(one, "kubeinfer_operator_scale_decisions_total", direction="from_zero",
                 reason="serverless") == 2
    assert value(one, "kubeinfer_operator_active") == 1
    assert value(two, "kubeinfer_operator_scale_decisions_total", direction="from_zero",
                 reason="serverless") == 0
    assert value(two, "kubeinfer_operator_active") == 0
    one.set_active(False)
    assert value(one, "kubeinfer_operator_active") == 0


def test_pending_scale_requests_while_waiting() -> None:
    m = OperatorMetrics()

    async def scenario() -> None:
        release = asyncio.Event()
        seen: list[str] = []

        async def handle(namespace: str, endpoint: str) -> None:
            await release.wait()
            seen.append(f"{namespace}/{endpoint}")

        counted = m.counting_pending(handle)
        tasks = [asyncio.create_task(counted("ns", f"e{i}")) for i in range(3)]
        await asyncio.sleep(0)
        assert value(m, "kubeinfer_operator_pending_scale_requests") == 3
        release.set()
        await asyncio.gather(*tasks)
        assert sorted(seen) == ["ns/e0", "ns/e1", "ns/e2"]

    asyncio.run(scenario())
    assert value(m, "kubeinfer_operator_pending_scale_requests") == 0


def test_the_scalers_decisions_are_counted() -> None:
    """``ScalerMemory.on_change`` (wired to the metrics in ``main.build_registry``)."""
    from datetime import timedelta

    from kubeinfer_operator.reconcile.autoscale_metrics import GatewayView
    from kubeinfer_operator.reconcile.cluster_scaling import ScalerMemory
    from tests.unit.test_k8s_autoscaling import NOW, plan_of

    m = OperatorMetrics()
    plan = plan_of(None, extra={"type": "Serverless", "serverless": {"idleTimeout": 1}})
    memory = ScalerMemory()
    memory.on_change = m.scale_decision
    quiet = {"http://10.0.0.1:8080": GatewayView(invocations={}, held={}, in_flight=0.0)}
    memory.mark_requested(("ml", "ep", "main"), 0.0)
    memory.decide_scraped(plan, "ml", {"main": 0}, quiet, {}, now=NOW, now_m=0.5)
    memory.decide_scraped(plan, "ml", {"main": 1}, quiet, {},
                          now=NOW + timedelta(seconds=3), now_m=3.0)
    memory.decide_scraped(plan, "ml", {"main": 0}, quiet, {},
                          now=NOW + timedelta(seconds=4), now_m=4.0)  # no change
    for direction in ("from_zero", "to_zero"):
        assert value(m, "kubeinfer_operator_scale_decisions_total", direction=direction,
                     reason="serverless") == 1
    assert value(m, "kubeinfer_operator_scale_decisions_total", direction="up",
                 reason="serverless") == 0


def test_the_role_gauge_outlives_a_failed_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """An unexpected error reading the peering (not a ClusterError, which the peering
    treats itself) must not end the loop: the gauge would keep its last value for good."""
    from kubeinfer_operator import main
    from kubeinfer_operator.settings import OperatorSettings

    answers: list[bool | Exception] = [True, RuntimeError("boom"), False]

    class Peering:
        async def active(self, namespace: str) -> bool:
            answer = answers.pop(0) if answers else False
            if isinstance(answer, Exception):
                raise answer
            return answer

    metrics = OperatorMetrics()
    seen: list[bool] = []
    monkeypatch.setattr(main, "ROLE_POLL_S", 0.0)

    async def run() -> None:
        two = asyncio.Event()

        def record(active: bool) -> None:
            seen.append(active)
            if len(seen) >= 2:
                two.set()

        monkeypatch.setattr(metrics, "set_active", record)
        settings = OperatorSettings.model_construct(namespaces=[])
        task = asyncio.create_task(main._follow_role(Peering(), metrics,  # type: ignore[arg-type]
                                                     settings))
        await two.wait()
        task.cancel()

    asyncio.run(asyncio.wait_for(run(), 10))
    assert seen[:2] == [True, False]
