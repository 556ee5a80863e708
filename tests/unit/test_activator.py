"""The serverless activator (``gateway.activator``): admission and holding, no sockets.

Held requests are released by applying a route table that gains a replica,
exactly what the route-file reload does when the scaler routes a new server.
The replica URL is never contacted: ``hold`` only chooses it.
"""

from __future__ import annotations

import asyncio
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import orjson
import pytest

from kubeinfer_runtime.contract import (
    EndpointRoute,
    GatewaySettings,
    RouteTable,
    ServerlessRoute,
    VariantRoute,
)
from kubeinfer_runtime.contract.auth import AuthMode, AuthRoute
from kubeinfer_runtime.contract.scale import StartFailed
from kubeinfer_runtime.errors import NotReady, Throttled
from kubeinfer_runtime.gateway.activator import Activator, start_failure
from kubeinfer_runtime.gateway.app import GatewayApp
from kubeinfer_runtime.gateway.core import GatewayCore
from kubeinfer_runtime.gateway.routing import Pick, choose

REPLICA = "http://127.0.0.1:9"


def table(upstreams: list[str], *, max_concurrency: int = 2, timeout: float = 5.0,
          revision: int = 1) -> RouteTable:
    route = EndpointRoute(
        name="sl", type="Serverless",
        variants=[VariantRoute(name="main", weight=1, upstreams=upstreams),
                  VariantRoute(name="other", weight=0, upstreams=[REPLICA])],
        serverless=ServerlessRoute(max_concurrency=max_concurrency,
                                   cold_start_timeout_s=timeout))
    return RouteTable(revision=revision, endpoints={"sl": route})


def make_core(tmp_path: Path, t: RouteTable) -> GatewayCore:
    core = GatewayCore(GatewaySettings(route_table_path=str(tmp_path / "routes.json")))
    core.apply(t)
    return core


def test_admit_refuses_beyond_max_concurrency(tmp_path: Path) -> None:
    core = make_core(tmp_path, table([], max_concurrency=2))
    activator = Activator(core)
    endpoint = core.routes.endpoints["sl"]
    assert activator.admit(endpoint) is None
    assert activator.admit(endpoint) is None
    refused = activator.admit(endpoint)
    assert isinstance(refused, Throttled)
    assert refused.status == 429 and refused.code == "ThrottlingException"
    assert "maxConcurrency is 2" in refused.message
    activator.release("sl")
    assert activator.admit(endpoint) is None
    assert activator.in_flight["sl"] == 2


async def test_hold_forwards_once_a_replica_is_routed(tmp_path: Path) -> None:
    core = make_core(tmp_path, table([]))
    activator = Activator(core)
    endpoint = core.routes.endpoints["sl"]
    refusal = choose(endpoint, None, core.health.down, core.rng)
    assert isinstance(refusal, NotReady)
    held = asyncio.create_task(activator.hold(endpoint, None, refusal))
    await asyncio.sleep(0.1)
    assert not held.done() and activator.held == {("sl", "main"): 1}
    core.apply(table([REPLICA], revision=2))  # the scaler routed a ready replica
    pick = await asyncio.wait_for(held, 2)
    assert isinstance(pick, Pick) and pick.upstream == REPLICA and pick.variant.name == "main"
    assert activator.held == {("sl", "main"): 0}
    await activator.close()


async def test_hold_is_bounded(tmp_path: Path) -> None:
    core = make_core(tmp_path, table([], timeout=0.2))
    activator = Activator(core)
    endpoint = core.routes.endpoints["sl"]
    refusal = choose(endpoint, None, core.health.down, core.rng)
    assert isinstance(refusal, NotReady)
    result = await asyncio.wait_for(activator.hold(endpoint, None, refusal), 2)
    assert isinstance(result, NotReady)
    assert "became ready within 0.2s (coldStartTimeout)" in result.message
    await activator.close()


async def test_hold_passes_other_refusals_through(tmp_path: Path) -> None:
    core = make_core(tmp_path, table([]))
    activator = Activator(core)
    endpoint = core.routes.endpoints["sl"]
    unknown = choose(endpoint, "nope", core.health.down, core.rng)
    assert await activator.hold(endpoint, "nope", unknown) is unknown
    # A pinned variant that has a replica is not cold: nothing to hold for.
    down = NotReady("x")
    assert await activator.hold(endpoint, "other", down) is down


async def _call(app: GatewayApp, body: bytes, extra: list[tuple[bytes, bytes]] | None = None
                ) -> tuple[int, dict[str, str], bytes]:
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        await asyncio.Event().wait()  # a connected client sends nothing more
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(dict(message))

    path = "/endpoints/sl/invocations"
    scope = {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(),
             "query_string": b"",
             "headers": [(b"content-type", b"application/json"), *(extra or [])]}
    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    headers = {k.decode(): v.decode() for k, v in start["headers"]}
    return start["status"], headers, b"".join(m.get("body", b"") for m in sent
                                              if m["type"] == "http.response.body")


async def test_gateway_answers_429_and_413_for_serverless(tmp_path: Path) -> None:
    core = make_core(tmp_path, table([], max_concurrency=1, timeout=3))
    app = GatewayApp(core)
    held = asyncio.create_task(_call(app, b"{}"))
    await asyncio.sleep(0.1)  # the first request is held (no replica)
    status, headers, body = await _call(app, b"{}")
    assert status == 429
    assert headers["x-amzn-errortype"] == "ThrottlingException:"
    doc = orjson.loads(body)
    assert doc["ErrorCode"] == "ThrottlingException" and doc["Message"] == doc["message"]
    assert 'Endpoint "sl" has 1 requests in flight' in doc["Message"]
    held.cancel()
    with pytest.raises(asyncio.CancelledError):
        await held
    assert app.invocations.activator.in_flight["sl"] == 0  # released on cancel too
    # Serverless payload limit: 4 MB (the route table says so; the plan sets it).
    big = table([], max_concurrency=1)
    big = big.model_copy(update={"endpoints": {"sl": big.endpoints["sl"].model_copy(
        update={"max_payload_bytes": 4 * 1024 * 1024})}})
    core.apply(big)
    status, _, body = await _call(app, b"x" * (4 * 1024 * 1024 + 1))
    assert status == 413 and b"ValidationError" in body
    await app.shutdown()


async def test_callers_without_credentials_take_no_serverless_slot(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    (tokens / "token").write_text("tok-serverless-slots-0123456789\n")
    auth = AuthRoute(mode=AuthMode.TOKEN, credentials_dir=str(tokens))
    t = table([], max_concurrency=2, timeout=0.2)
    t = t.model_copy(update={"endpoints": {"sl": t.endpoints["sl"].model_copy(
        update={"auth": auth})}})
    app = GatewayApp(make_core(tmp_path, t))
    hogs = await _trickling(app, 2, content_length=1000)
    assert app.invocations.activator.in_flight.get("sl", 0) == 0
    status, _, _ = await _call(app, b"{}")  # a complete request without credentials
    assert status == 401
    assert app.invocations.activator.in_flight.get("sl", 0) == 0
    # The real caller is admitted (held for a replica that never comes: 503), not 429.
    status, _, body = await _call(app, b"{}", [(b"authorization",
                                                b"Bearer tok-serverless-slots-0123456789")])
    assert status == 503 and b"coldStartTimeout" in body, body
    assert app.invocations.activator.in_flight["sl"] == 0
    for hog in hogs:
        hog.cancel()
    await asyncio.gather(*hogs, return_exceptions=True)
    await app.shutdown()


async def test_callers_trickling_bodies_take_no_slot_without_auth(tmp_path: Path) -> None:
    """Without auth too, a slot is taken once the body is read: two callers trickling
    bodies (at the listener's minimum rate a 4 MB body takes over an hour) used to hold
    both slots and lock every other caller out with 429."""
    app = GatewayApp(make_core(tmp_path, table([], max_concurrency=2, timeout=0.2)))
    hogs = await _trickling(app, 2, content_length=4_000_000)
    assert app.invocations.activator.in_flight.get("sl", 0) == 0
    # A whole request is admitted (held for a replica that never comes: 503), not 429.
    status, headers, body = await _call(app, b"{}")
    assert status == 503 and b"coldStartTimeout" in body, body
    assert headers["retry-after"] == "1"
    assert app.invocations.activator.in_flight["sl"] == 0
    for hog in hogs:
        hog.cancel()
    await asyncio.gather(*hogs, return_exceptions=True)
    await app.shutdown()


async def test_a_full_endpoint_without_auth_answers_429_before_the_body(tmp_path: Path) -> None:
    app = GatewayApp(make_core(tmp_path, table([], max_concurrency=1, timeout=3)))
    held = asyncio.create_task(_call(app, b"{}"))
    await asyncio.sleep(0.1)  # held: the one slot is taken
    path = "/endpoints/sl/invocations"
    sent: list[MutableMapping[str, Any]] = []
    read = 0

    async def receive() -> dict[str, Any]:
        nonlocal read
        read += 1
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    await app({"type": "http", "method": "POST", "path": path, "raw_path": path.encode(),
               "query_string": b"", "headers": [(b"content-length", b"2")]}, receive, send)
    assert sent[0]["status"] == 429 and read == 0  # answered without reading the upload
    assert (b"retry-after", b"1") in sent[0]["headers"]
    held.cancel()
    await asyncio.gather(held, return_exceptions=True)
    await app.shutdown()


async def _trickling(app: GatewayApp, n: int, *, content_length: int) -> list[asyncio.Task[None]]:
    """``n`` requests to the serverless endpoint whose bodies never finish arriving,
    returned once each is waiting for its body (the gateway read its head)."""
    path = "/endpoints/sl/invocations"
    waiting = 0
    all_waiting = asyncio.Event()

    async def trickle() -> dict[str, Any]:
        nonlocal waiting
        waiting += 1
        if waiting == n:
            all_waiting.set()
        await asyncio.Event().wait()
        return {"type": "http.disconnect"}

    async def discard(_: MutableMapping[str, Any]) -> None:
        pass

    head = {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(),
            "query_string": b"", "headers": [(b"content-length", str(content_length).encode())]}
    hogs = [asyncio.create_task(app(dict(head), trickle, discard)) for _ in range(n)]
    await asyncio.wait_for(all_waiting.wait(), 10)
    return hogs


def failed_answer(retry_after_s: float = 7.0) -> bytes:
    return StartFailed(message="x", start_failed="its model failed to load",
                       retry_after_s=retry_after_s).model_dump_json().encode()


def test_only_a_start_failed_body_is_a_start_failure() -> None:
    assert start_failure(503, failed_answer()) is not None
    # A standby operator's 503, a proxy's, or an accepted request: not about the variant.
    assert start_failure(503, b'{"message": "This operator replica is a standby"}') is None
    assert start_failure(503, b"<html>bad gateway</html>") is None
    assert start_failure(202, failed_answer()) is None


async def test_held_requests_end_at_once_when_the_scaler_says_the_start_failed(
        tmp_path: Path) -> None:
    """A variant whose model fails to load: the requests held for it are answered 503
    naming it as soon as the scaler says so, not after coldStartTimeout (here 30 s)."""
    core = make_core(tmp_path, table([], timeout=30))
    activator = Activator(core)
    endpoint = core.routes.endpoints["sl"]
    refusal = choose(endpoint, None, core.health.down, core.rng)
    assert isinstance(refusal, NotReady)
    held = asyncio.create_task(activator.hold(endpoint, None, refusal))
    await asyncio.sleep(0.1)
    assert not held.done()
    assert activator.note_answer(("sl", "main"), 503, failed_answer()) is True
    result = await asyncio.wait_for(held, 1)
    assert isinstance(result, NotReady) and result.status == 503
    assert ('variant "main" (its model failed to load) failed to start a replica'
            in result.message)
    assert ("retry-after", "7") in [(k.decode(), v.decode()) for k, v in result.headers]
    assert activator.held == {("sl", "main"): 0}
    # Until the scaler tries again, a new request for it is answered at once too.
    again = await asyncio.wait_for(activator.hold(endpoint, None, refusal), 0.5)
    assert isinstance(again, NotReady) and "failed to start" in again.message
    # The scaler accepts the next request (it starts a replica again): held once more.
    assert activator.note_answer(("sl", "main"), 202, b'{"accepted": true}') is False
    waiting = asyncio.create_task(activator.hold(endpoint, None, refusal))
    await asyncio.sleep(0.1)
    assert not waiting.done()
    core.apply(table([REPLICA], revision=2))
    assert isinstance(await asyncio.wait_for(waiting, 2), Pick)
    await activator.close()


async def test_a_start_failure_ends_the_hold_only_when_every_waited_variant_failed(
        tmp_path: Path) -> None:
    both = RouteTable(revision=1, endpoints={"sl": EndpointRoute(
        name="sl", type="Serverless",
        variants=[VariantRoute(name="a", weight=1, upstreams=[]),
                  VariantRoute(name="b", weight=1, upstreams=[])],
        serverless=ServerlessRoute(max_concurrency=2, cold_start_timeout_s=30))})
    core = make_core(tmp_path, both)
    activator = Activator(core)
    endpoint = core.routes.endpoints["sl"]
    refusal = choose(endpoint, None, core.health.down, core.rng)
    assert isinstance(refusal, NotReady)
    held = asyncio.create_task(activator.hold(endpoint, None, refusal))
    activator.note_answer(("sl", "a"), 503, failed_answer())
    await asyncio.sleep(0.2)
    assert not held.done()  # b may still come up
    activator.note_answer(("sl", "b"), 503, failed_answer(retry_after_s=3))
    result = await asyncio.wait_for(held, 1)
    assert isinstance(result, NotReady) and '"a"' in result.message and '"b"' in result.message
    assert (b"retry-after", b"3") in result.headers  # the sooner of the two tries
    await activator.close()
