"""Credentials never reach what people read: redacted URLs in route tables and messages."""

from __future__ import annotations

import json

import pytest

from kubeinfer_runtime.contract import AsyncRoute, EndpointRoute, RouteTable, VariantRoute
from kubeinfer_runtime.contract.redact import redact_url, redact_urls, unreadable_host_problem


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


def test_a_password_with_an_unencoded_slash_hash_or_question_mark_is_redacted() -> None:
    # urlsplit ends the netloc at the first '/', '?' or '#': "redis://:pa/ss@h" has
    # netloc ":pa" and path "/ss@h", so the password went out whole.
    assert redact_url("redis://:c2Vj/cmV0@redis:6379/0") == "redis://***@redis:6379/0"
    assert redact_url("redis://app:pa#ss@redis:6379/0") == "redis://***@redis:6379/0"
    assert redact_url("rediss://app:p/a?ss@r/1?ssl=x") == "rediss://***@r/1?ssl=***"
    # Without '//' there is no netloc at all: the userinfo was in the path.
    assert redact_url("redis:/:s3cret@redis:6379/0") == "redis://***@redis:6379/0"
    assert redact_url("app:s3cret@redis:6379") == "app://***@redis:6379"
    # A path with an '@' under a readable host is no password.
    assert redact_url("http://h.example:8080/a@b") == "http://h.example:8080/a@b"
    assert redact_url("file:///models/a@b.onnx") == "file:///models/a@b.onnx"


def test_an_unreadable_host_is_refused_naming_the_setting_only() -> None:
    problem = unreadable_host_problem("KUBEINFER_REDIS_URL", "redis://app:c2Vj/cmV0@r:6379/0")
    assert problem is not None and "KUBEINFER_REDIS_URL" in problem
    assert "c2Vj" not in problem and "cmV0" not in problem
    assert unreadable_host_problem("X", "redis://[::1/0") is not None
    assert unreadable_host_problem("X", "redis:/:s3cret@r:6379/0") is not None
    for good in ("redis://:p%2Fw@r:6379/0", "redis://r", "rediss://u:p@[::1]:6380/1",
                 "unix:///run/redis.sock"):
        assert unreadable_host_problem("X", good) is None


def test_runtime_settings_refuse_such_a_redis_url_and_quote_no_setting(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    from kubeinfer_runtime.contract import AsyncWorkerSettings, GatewaySettings
    from kubeinfer_runtime.contract.edge import FleetServerSettings

    bad = "redis://app:c2Vj/cmV0@redis:6379/0"
    given = {"redis_url": bad, "queue": "q", "output_path": "s3://b/o",
             "failure_path": "s3://b/f", "model_uri": "file:///m.onnx",
             "bootstrap_token": "t" * 20, "fleet": "f", "packages_uri": "s3://b/p"}
    for cls in (GatewaySettings, AsyncWorkerSettings, FleetServerSettings):
        with pytest.raises(ValidationError) as refused:
            cls.given({k: v for k, v in given.items() if k in cls.model_fields})
        text = str(refused.value)
        assert "KUBEINFER_REDIS_URL" in text and "c2Vj" not in text and "cmV0" not in text
    # Nor does any other settings error quote the values read (a model validator's
    # input is every setting: S3 keys, tokens).
    monkeypatch.setenv("KUBEINFER_S3_SECRET_KEY", "TOPSECRETKEY")
    monkeypatch.delenv("KUBEINFER_MODEL_URI", raising=False)
    from kubeinfer_runtime.contract import ModelServerSettings

    with pytest.raises(ValidationError) as none_given:
        ModelServerSettings()
    assert "KUBEINFER_MODEL_URI" in str(none_given.value)
    assert "TOPSECRETKEY" not in str(none_given.value)
