"""A route table's JSON as tests read it: every field, defaults included.

The operator and local mode write route tables without default values (an older
gateway reads what it knows; ``RouteTable.to_json``), so a test that looks into the
JSON itself reads it through the model first, as the gateway does.
"""

from __future__ import annotations

from typing import Any

from kubeinfer_runtime.contract import RouteTable


def full_table(text: str) -> dict[str, Any]:
    """``text`` (a route table's JSON; blank or ``{}``: none yet) with every field."""
    if not text.strip() or text.strip() == "{}":
        return {}
    table: dict[str, Any] = RouteTable.from_json(text).model_dump(mode="json")
    return table
