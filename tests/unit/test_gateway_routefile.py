"""Route-table file reload logic (gateway/routefile.py and GatewayCore.reload)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from kubeinfer_runtime.contract import EndpointRoute, GatewaySettings, RouteTable, VariantRoute
from kubeinfer_runtime.gateway.core import GatewayCore
from kubeinfer_runtime.gateway.routefile import Outcome, RouteTableFile, parse_route_table


def table(revision: int, weight_b: float = 0.1) -> RouteTable:
    return RouteTable(revision=revision, endpoints={"iris": EndpointRoute(name="iris", variants=[
        VariantRoute(name="a", weight=0.9, upstreams=["http://a:1"]),
        VariantRoute(name="b", weight=weight_b, upstreams=["http://b:1"]),
    ])})


def test_missing_file_then_appearing(tmp_path: Path) -> None:
    path = tmp_path / "routes.json"
    source = RouteTableFile(path)
    first = source.poll()
    assert (first.outcome, first.table) == (Outcome.MISSING, None)
    assert source.poll().outcome is Outcome.UNCHANGED
    table(1).write_atomic(path)
    loaded = source.poll()
    assert loaded.outcome is Outcome.LOADED and loaded.table == table(1)
    assert source.poll().outcome is Outcome.UNCHANGED


def test_valid_then_invalid_keeps_the_old_table(tmp_path: Path) -> None:
    path = tmp_path / "routes.json"
    table(1).write_atomic(path)
    source = RouteTableFile(path)
    assert source.poll().outcome is Outcome.LOADED

    path.write_text('{"endpoints": {"iris": {"name": "iris", "variants": [{"name": "a", '
                    '"weight": -1}]}}}')
    bad = source.poll()
    assert bad.outcome is Outcome.INVALID
    assert bad.table == table(1)
    assert bad.error is not None and "endpoints.iris.variants.0.weight" in bad.error
    # Reported once, not on every poll.
    assert source.poll().outcome is Outcome.UNCHANGED

    table(2, weight_b=0.5).write_atomic(path)
    fixed = source.poll()
    assert fixed.outcome is Outcome.LOADED and fixed.table == table(2, weight_b=0.5)


@pytest.mark.parametrize("content", [b"", b"{not json", b"\xff\xfe", b"[]",
                                     b'{"contract_version": "v9"}'])
def test_garbage_is_reported_not_raised(content: bytes) -> None:
    assert isinstance(parse_route_table(content), str)


def test_symlink_swap_like_a_configmap_is_noticed(tmp_path: Path) -> None:
    # kubelet: routes.json -> ..data/routes.json, ..data -> ..<timestamp> (swapped atomically).
    v1, v2 = tmp_path / "..v1", tmp_path / "..v2"
    v1.mkdir()
    v2.mkdir()
    (v1 / "routes.json").write_text(table(1).to_json())
    (v2 / "routes.json").write_text(table(2).to_json())
    (tmp_path / "..data").symlink_to(v1.name)
    (tmp_path / "routes.json").symlink_to("..data/routes.json")
    source = RouteTableFile(tmp_path / "routes.json")
    assert source.poll().table == table(1)

    tmp_link = tmp_path / "..data_tmp"
    tmp_link.symlink_to(v2.name)
    os.replace(tmp_link, tmp_path / "..data")
    result = source.poll()
    assert result.outcome is Outcome.LOADED and result.table == table(2)


def test_file_removed_later_keeps_the_table(tmp_path: Path) -> None:
    path = tmp_path / "routes.json"
    table(3).write_atomic(path)
    source = RouteTableFile(path)
    source.poll()
    path.unlink()
    gone = source.poll()
    assert gone.outcome is Outcome.MISSING and gone.table == table(3)


def test_core_reload_applies_good_tables_and_logs_bad_ones(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "routes.json"
    core = GatewayCore(GatewaySettings(route_table_path=str(path)))
    with caplog.at_level(logging.WARNING, logger="kubeinfer.gateway"):
        assert core.reload() == []
    assert "does not exist yet" in caplog.text
    assert core.routes.endpoints == {}

    table(1).write_atomic(path)
    assert core.reload() == ["http://a:1", "http://b:1"]
    assert core.routes.revision == 1
    old_routes = core.routes

    path.write_text("{oops")
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="kubeinfer.gateway"):
        assert core.reload() == []
    assert "is invalid, keeping revision 1" in caplog.text
    assert core.routes is old_routes

    table(2, weight_b=0.0).write_atomic(path)
    assert core.reload() == []  # same upstreams: nothing new to check
    assert core.routes.revision == 2
    assert core.routes.endpoints["iris"].weights == (0.9,)
