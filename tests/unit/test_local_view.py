"""Phase rules and status rows of local endpoints (pure)."""

from __future__ import annotations

from kubeinfer_operator.local.state import (
    EndpointState,
    Phase,
    ProcessState,
    ProcState,
    VariantState,
)
from kubeinfer_operator.local.view import process_rows, status_document, summarize, variant_rows


def proc(name: str, variant: str | None, state: ProcState, *, routed: bool = False,
         reason: str = "") -> ProcessState:
    role = "gateway" if variant is None else "model-server"
    return ProcessState(name=name, role=role, variant=variant, pid=10, port=1000,
                        url="http://127.0.0.1:1000", state=state, routed=routed, reason=reason,
                        log="/x.log")


GW = proc("gateway", None, ProcState.READY)


def test_ready_when_gateway_and_every_replica_are() -> None:
    s = summarize(gateway=GW, variants=[VariantState(name="a", weight=1, replicas=1, ready=1)],
                  processes=[proc("a-0", "a", ProcState.READY, routed=True)], applying=False,
                  started=True)
    assert s.phase is Phase.READY and s.message == ""


def test_degraded_when_a_replica_is_missing_and_reason_is_given() -> None:
    s = summarize(gateway=GW, variants=[VariantState(name="a", weight=1, replicas=2, ready=1)],
                  processes=[proc("a-0", "a", ProcState.READY, routed=True),
                             proc("a-1", "a", ProcState.BACKOFF, reason="crashed (exit code 1)")],
                  applying=False, started=True)
    assert s.phase is Phase.DEGRADED
    assert "variant a: 1/2 replicas ready (a-1: crashed (exit code 1))" in s.message


def test_failed_when_nothing_serves() -> None:
    s = summarize(gateway=GW, variants=[VariantState(name="a", weight=1, replicas=1, ready=0)],
                  processes=[proc("a-0", "a", ProcState.NOT_READY, reason="Model failed")],
                  applying=False, started=True)
    assert s.phase is Phase.FAILED
    down = proc("gateway", None, ProcState.BACKOFF, reason="crashed")
    s = summarize(gateway=down, variants=[VariantState(name="a", weight=1, replicas=1, ready=1)],
                  processes=[], applying=False, started=True)
    assert s.phase is Phase.FAILED and "gateway: crashed" in s.message


def test_starting_updating_stopping_and_unsynced_gateway() -> None:
    v = [VariantState(name="a", weight=1, replicas=1, ready=1)]
    assert summarize(gateway=GW, variants=v, processes=[], applying=True,
                     started=False).phase is Phase.STARTING
    assert summarize(gateway=GW, variants=v, processes=[], applying=True,
                     started=True).phase is Phase.UPDATING
    assert summarize(gateway=GW, variants=v, processes=[], applying=False, started=True,
                     stopping=True).phase is Phase.STOPPING
    s = summarize(gateway=GW, variants=v, processes=[], applying=False, started=True,
                  gateway_synced=False)
    assert s.phase is Phase.DEGRADED and "latest route table" in s.message


def test_rows_and_json_document() -> None:
    state = EndpointState(
        endpoint="iris", supervisor_pid=1, url="http://127.0.0.1:9",
        variants=[VariantState(name="a", weight=0.25, replicas=2, ready=1, model_uri="file:///m")],
        processes=[GW, proc("a-0", "a", ProcState.READY, routed=False)])
    assert variant_rows(state) == [{"endpoint": "iris", "variant": "a", "weight": "0.25",
                                    "replicas": "1/2", "model": "file:///m"}]
    rows = process_rows(state)
    assert rows[0]["state"] == "ready" and rows[0]["pid"] == "10"
    assert rows[1]["state"] == "ready (not routed)"
    doc = status_document([state], ["note"])
    assert doc["endpoints"][0]["processes"][1]["name"] == "a-0"
    assert doc["stale"] == ["note"]


def test_a_failed_apply_is_not_ready_even_when_the_rest_serves() -> None:
    v = [VariantState(name="a", weight=1, replicas=1, ready=1)]
    s = summarize(gateway=GW, variants=v, processes=[], applying=False, started=True,
                  apply_error="variant b: model server b-0 is not ready: Model failed")
    assert s.phase is Phase.DEGRADED
    assert s.message == "last spec not applied: variant b: model server b-0 is not ready: " \
        "Model failed"
    s = summarize(gateway=GW, variants=[], processes=[], applying=False, started=True,
                  apply_error="variant b: ...")
    assert s.phase is Phase.FAILED
