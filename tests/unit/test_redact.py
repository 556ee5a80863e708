"""Credentials never reach what people read: redacted URLs in route tables and messages."""

from __future__ import annotations

import json

from kubeinfer_runtime.contract import AsyncRoute, EndpointRoute, RouteTable, VariantRoute
from kubeinfer_runtime.contract.redact import redact_url, redact_urls


def test_passwords_user_names_and_query_values_are_redacted() -> None:
    assert redact_url("redis://:s3cret@redis:6379/0") == "redis://:***@redis:6379/0"
    assert redact_url("rediss://app:s3cret@redis:6380/1") == "rediss://app:***@redis:6380/1"
    assert redact_url("https://tok3n@hooks.example/x") == "https://***@hooks.example/x"
    assert redact_url("https://h.example/hook?key=s3cret&x") == "https://h.example/hook?key=***&***"
    assert redact_url("http://plain:8080/p") == "http://plain:8080/p"
    assert redact_url("s3://[bad") == "***"


def test_a_route_table_dump_carries_no_redis_password() -> None:
    table = RouteTable(endpoints={"a": EndpointRoute(
        name="a", type="Async", variants=[VariantRoute(name="v", weight=1)],
        async_config=AsyncRoute(queue="q", redis_url="redis://:hunter2@r:6379/0",
                                output_path="s3://b/o", failure_path="s3://b/f"))})
    shown = json.dumps(redact_urls(table.model_dump(mode="json")))
    assert "hunter2" not in shown and "redis://:***@r:6379/0" in shown
