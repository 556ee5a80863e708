"""The gateway app's refusals and side routes, called as ASGI (no sockets).

Every case here is answered before any upstream is contacted: the unit-test
network guard would turn an attempted forward into a loud failure.
"""

from __future__ import annotations

import asyncio
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import orjson
import pytest

from kubeinfer_runtime.contract import EndpointRoute, GatewaySettings, RouteTable, VariantRoute
from kubeinfer_runtime.gateway.app import GatewayApp, create_app, is_loopback

Result = tuple[int, dict[str, str], bytes]


async def _call(app: GatewayApp, method: str, path: str, headers: list[tuple[bytes, bytes]],
                chunks: list[bytes], client: str = "127.0.0.1") -> Result:
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
                for i, c in enumerate(chunks)]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(dict(message))

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": method, "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "scheme": "http", "headers": headers,
             "client": (client, 1), "server": ("127.0.0.1", 8080)}
    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, body


def call(app: GatewayApp, method: str, path: str, headers: list[tuple[bytes, bytes]] | None = None,
         chunks: list[bytes] | None = None, client: str = "127.0.0.1") -> Result:
    return asyncio.run(_call(app, method, path, headers or [], chunks or [b""], client))


@pytest.fixture
def app(tmp_path: Path) -> GatewayApp:
    path = tmp_path / "routes.json"
    RouteTable(revision=3, endpoints={"iris": EndpointRoute(
        name="iris", max_payload_bytes=100, variants=[
            VariantRoute(name="primary", weight=1.0, upstreams=["http://127.0.0.1:9"]),
            VariantRoute(name="canary", weight=0.0, upstreams=["http://127.0.0.1:10"]),
        ])}).write_atomic(path)
    gateway = create_app(GatewaySettings(route_table_path=str(path)))
    gateway.core.reload()
    return gateway


def sagemaker_error(result: Result, status: int, code: str) -> str:
    got_status, headers, body = result
    assert got_status == status, body
    assert headers["x-amzn-errortype"] == f"{code}:"
    parsed = orjson.loads(body)
    assert parsed["ErrorCode"] == code and parsed["Message"] == parsed["message"]
    return str(parsed["Message"])


def test_unknown_endpoint_is_404_validation_error(app: GatewayApp) -> None:
    msg = sagemaker_error(call(app, "POST", "/endpoints/nope/invocations"), 404, "ValidationError")
    assert '"nope"' in msg


def test_declared_oversized_body_is_413_before_forwarding(app: GatewayApp) -> None:
    result = call(app, "POST", "/endpoints/iris/invocations",
                  [(b"content-length", b"101")], [b"x" * 101])
    msg = sagemaker_error(result, 413, "ValidationError")
    assert "101 bytes" in msg and "100 bytes" in msg


def test_chunked_oversized_body_is_413_before_forwarding(app: GatewayApp) -> None:
    result = call(app, "POST", "/endpoints/iris/invocations", chunks=[b"x" * 60, b"x" * 60])
    sagemaker_error(result, 413, "ValidationError")


def test_unknown_target_variant_is_404_listing_variants(app: GatewayApp) -> None:
    result = call(app, "POST", "/endpoints/iris/invocations",
                  [(b"x-amzn-sagemaker-target-variant", b"blue")], [b"{}"])
    msg = sagemaker_error(result, 404, "ValidationError")
    assert '"blue"' in msg and "primary, canary" in msg


def test_variant_with_no_healthy_upstream_is_503_naming_it(app: GatewayApp) -> None:
    app.core.health.mark_unreachable("http://127.0.0.1:9")
    msg = sagemaker_error(call(app, "POST", "/endpoints/iris/invocations", chunks=[b"{}"]),
                          503, "ServiceUnavailable")
    assert '"primary"' in msg


def test_ping_is_up_even_without_a_route_table(tmp_path: Path) -> None:
    gateway = create_app(GatewaySettings(route_table_path=str(tmp_path / "missing.json")))
    gateway.core.reload()
    status, _, body = call(gateway, "GET", "/ping")
    assert status == 200 and orjson.loads(body)["endpoints"] == 0
    sagemaker_error(call(gateway, "POST", "/endpoints/iris/invocations"), 404, "ValidationError")


def test_routes_shows_the_table_in_force(app: GatewayApp) -> None:
    status, _, body = call(app, "GET", "/routes")
    assert status == 200
    parsed = orjson.loads(body)
    assert parsed["table"]["revision"] == 3 and parsed["down"] == []


def test_routes_answers_loopback_callers_only(app: GatewayApp) -> None:
    """It names upstream pods and auth settings: a remote caller (of an endpoint that
    may require SigV4 or a token) gets 403, the host itself (port-forward) the page."""
    for remote in ("10.1.2.3", "192.168.0.7", "2001:db8::1"):
        msg = sagemaker_error(call(app, "GET", "/routes", client=remote), 403,
                              "AccessDeniedException")
        assert "loopback callers only" in msg and "127.0.0.1:9" not in msg
    for local in ("127.0.0.1", "127.0.0.53", "::1", "::ffff:127.0.0.1"):
        assert call(app, "GET", "/routes", client=local)[0] == 200, local
    assert not any(is_loopback(h) for h in (None, "", "testclient", "::ffff:10.0.0.1",
                                            "0.0.0.0"))
    # Liveness and metrics stay open to probes and scrapers.
    assert call(app, "GET", "/ping", client="10.1.2.3")[0] == 200
    assert call(app, "GET", "/metrics", client="10.1.2.3")[0] == 200


def test_other_paths_and_methods_fall_through_to_fastapi(app: GatewayApp) -> None:
    assert call(app, "GET", "/endpoints/iris/invocations")[0] == 404
    assert call(app, "POST", "/endpoints/a/b/invocations")[0] == 404
    assert call(app, "POST", "/endpoints//invocations")[0] == 404
    status, _, body = call(app, "GET", "/metrics")
    assert status == 200 and b"kubeinfer_gateway_route_table_revision" in body


def test_lifespan_starts_and_stops_background_loops(tmp_path: Path) -> None:
    # No route table, so the health loop has nothing to connect to.
    app = create_app(GatewaySettings(route_table_path=str(tmp_path / "routes.json")))

    async def run() -> list[dict[str, Any]]:
        inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        sent: list[dict[str, Any]] = []
        answered = asyncio.Event()

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)
            answered.set()

        task = asyncio.create_task(app({"type": "lifespan"}, inbox.get, send))  # type: ignore[arg-type]
        await inbox.put({"type": "lifespan.startup"})
        await asyncio.wait_for(answered.wait(), 5)
        assert [t.get_name() for t in app._tasks] == ["route-reload", "health-check",
                                                   "async-backlog"]
        await inbox.put({"type": "lifespan.shutdown"})
        await asyncio.wait_for(task, 5)
        return sent

    sent = asyncio.run(run())
    assert [m["type"] for m in sent] == ["lifespan.startup.complete",
                                        "lifespan.shutdown.complete"]
    assert app._tasks == []


def test_unknown_route_is_a_sagemaker_style_404(app: GatewayApp) -> None:
    message = sagemaker_error(call(app, "GET", "/nope"), 404, "ValidationError")
    assert message.startswith("No route GET /nope: the gateway serves POST /endpoints/")


def test_response_stream_api_is_refused_with_the_alternative(app: GatewayApp) -> None:
    message = sagemaker_error(call(app, "POST", "/endpoints/iris/invocations-response-stream"),
                              400, "ValidationError")
    assert "InvokeEndpointWithResponseStream" in message and "call InvokeEndpoint" in message
