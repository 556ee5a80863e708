"""Scale requests at the scalers' ``/scale`` handlers, and the bounded answer reads.

The handlers are called with stand-in requests (no socket here); the real
listeners, their connection bounds and answers over the wire are in
tests/integration/test_operator_http_bounds.py.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import aiohttp
import pytest
from aiohttp import web

from kubeinfer_operator.http_bounds import AnswerLimit, read_bounded
from kubeinfer_operator.local.scaler import LocalScaler, start_failure_summary
from kubeinfer_operator.reconcile.cluster_scaling import authorized_scale
from kubeinfer_operator.render.k8s_secrets import scaler_token
from kubeinfer_operator.scaling.cluster import ClusterScaler
from kubeinfer_runtime.contract import ScaleRequest
from kubeinfer_runtime.contract.scale import StartFailed

KEY = b"k" * 32
NS = "ml"
BODY = ScaleRequest(endpoint="ep", variant="main", namespace=NS).model_dump_json().encode()
#: What a header's undecodable bytes (``\xff\xfe``) become: aiohttp decodes with
#: surrogateescape.
UNDECODABLE = b"\xff\xfe".decode("utf-8", "surrogateescape")


class Posted:
    """What the handlers read of a request: its headers (as aiohttp decoded them, which
    ``make_mocked_request`` cannot do for undecodable bytes) and its body."""

    def __init__(self, token: str, body: bytes) -> None:
        self.headers = {"Authorization": f"Bearer {token}", "Content-Length": str(len(body))}
        self.body = body

    async def read(self) -> bytes:
        return self.body


def post(token: str, body: bytes = BODY) -> web.Request:
    return cast(web.Request, Posted(token, body))


# -- tokens that are not ASCII -------------------------------------------------------------------


@pytest.mark.parametrize("token", [UNDECODABLE, "é", "\u0661" * 64])
def test_a_token_that_is_not_ascii_is_simply_not_authorized(token: str) -> None:
    assert authorized_scale(token, KEY, NS) is False
    assert authorized_scale(scaler_token(KEY, NS), KEY, NS) is True


@pytest.mark.parametrize("token", [UNDECODABLE, "é"])
async def test_the_cluster_scaler_answers_401_to_a_token_that_is_not_ascii(
        token: str, caplog: pytest.LogCaptureFixture) -> None:
    scaler = ClusterScaler(signing_key=KEY)
    scaler.known[(NS, "ep")] = frozenset({"main"})
    response = await scaler._on_scale(post(token))
    assert response.status == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert response.text is not None and "malformed bearer token" in response.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_the_local_scaler_answers_401_to_a_token_that_is_not_ascii(
        tmp_path: Path) -> None:
    supervisor = SimpleNamespace(name="ep", running={"main": object()}, paths=SimpleNamespace(
        root=tmp_path, log_file=lambda name: tmp_path / f"{name}.log"))
    scaler = LocalScaler(cast(Any, supervisor))
    for token in (UNDECODABLE, "é"):
        assert (await scaler._on_scale(post(token))).status == 401
    assert (await scaler._on_scale(post(scaler.token))).status == 202


# -- requests for one Endpoint share its scaling round ----------------------------------------


class Rounds:
    """A slow ``on_request``: each round waits for ``release``; counts calls and overlap."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.running = 0
        self.most_at_once = 0
        self.release = asyncio.Event()
        self.started = asyncio.Event()

    async def __call__(self, namespace: str, endpoint: str) -> None:
        self.calls.append((namespace, endpoint))
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        self.started.set()
        try:
            await self.release.wait()
        finally:
            self.running -= 1


def scaler_with(rounds: Rounds) -> ClusterScaler:
    scaler = ClusterScaler(signing_key=KEY)
    scaler.known[(NS, "ep")] = frozenset({"main"})
    scaler.known[(NS, "other")] = frozenset({"main"})
    scaler.on_request = rounds
    return scaler


async def settle(scaler: ClusterScaler) -> None:
    while scaler._pending:
        await asyncio.gather(*scaler._pending)


async def test_a_flood_of_valid_requests_runs_one_round_and_queues_one_more() -> None:
    rounds = Rounds()
    scaler = scaler_with(rounds)
    token = scaler_token(KEY, NS)
    # Accepted before the round starts: that round covers them all.
    for _ in range(50):
        assert (await scaler._on_scale(post(token))).status == 202
    await asyncio.wait_for(rounds.started.wait(), 5)
    assert len(rounds.calls) == 1 and len(scaler._pending) == 1
    # Accepted while it runs (it may have read its inputs): exactly one more round.
    for _ in range(50):
        assert (await scaler._on_scale(post(token))).status == 202
    assert len(scaler._pending) == 1
    rounds.release.set()
    await asyncio.wait_for(settle(scaler), 5)
    assert rounds.calls == [(NS, "ep")] * 2
    assert rounds.most_at_once == 1
    assert scaler._rounds == {}


async def test_a_request_after_the_last_round_starts_a_new_one() -> None:
    rounds = Rounds()
    rounds.release.set()
    scaler = scaler_with(rounds)
    token = scaler_token(KEY, NS)
    assert (await scaler._on_scale(post(token))).status == 202
    await asyncio.wait_for(settle(scaler), 5)
    assert (await scaler._on_scale(post(token))).status == 202
    await asyncio.wait_for(settle(scaler), 5)
    assert rounds.calls == [(NS, "ep")] * 2


async def test_endpoints_do_not_wait_for_each_other() -> None:
    rounds = Rounds()
    scaler = scaler_with(rounds)
    token = scaler_token(KEY, NS)
    other = ScaleRequest(endpoint="other", variant="main", namespace=NS).model_dump_json()
    assert (await scaler._on_scale(post(token))).status == 202
    assert (await scaler._on_scale(post(token, other.encode()))).status == 202
    await asyncio.sleep(0)
    assert sorted(rounds.calls) == [(NS, "ep"), (NS, "other")]
    rounds.release.set()
    await asyncio.wait_for(settle(scaler), 5)


async def test_a_failing_round_does_not_block_the_next_request() -> None:
    calls = []

    async def failing(namespace: str, endpoint: str) -> None:
        calls.append(endpoint)
        raise RuntimeError("the API server is down")

    scaler = ClusterScaler(signing_key=KEY)
    scaler.known[(NS, "ep")] = frozenset({"main"})
    scaler.on_request = failing
    for _ in range(2):
        assert (await scaler._on_scale(post(scaler_token(KEY, NS)))).status == 202
        await asyncio.gather(*scaler._pending, return_exceptions=True)
    assert calls == ["ep", "ep"] and scaler._rounds == {}


# -- answers read with a bound ------------------------------------------------------------------


class FakeContent:
    """A response body arriving in 64 KiB chunks; counts what was read."""

    def __init__(self, size: int) -> None:
        self.left = size
        self.read_bytes = 0

    async def read(self, n: int) -> bytes:
        chunk = min(n, self.left, 65536)
        self.left -= chunk
        self.read_bytes += chunk
        return b"x" * chunk


def response(size: int, declared: int | None) -> tuple[aiohttp.ClientResponse, FakeContent]:
    content = FakeContent(size)
    return cast(aiohttp.ClientResponse,
                SimpleNamespace(content_length=declared, content=content)), content


@pytest.mark.parametrize("size", [0, 1000, 1 << 20])
async def test_an_answer_within_the_limit_is_read_whole(size: int) -> None:
    for declared in (size, None):
        resp, _ = response(size, declared)
        assert await read_bounded(resp, 1 << 20) == b"x" * size


async def test_an_answer_over_the_limit_is_refused_reading_at_most_one_byte_past_it() -> None:
    resp, content = response(400 << 20, 400 << 20)  # says so: nothing is read
    assert await read_bounded(resp, 1 << 20) is None
    assert content.read_bytes == 0
    resp, content = response(400 << 20, None)  # chunked: read until one byte past
    assert await read_bounded(resp, 1 << 20) is None
    assert content.read_bytes == (1 << 20) + 1
    resp, content = response(400 << 20, 10)  # lies about its length
    assert await read_bounded(resp, 1 << 20) is None
    assert content.read_bytes == (1 << 20) + 1


async def test_an_oversized_answer_is_warned_about_once_per_source_without_its_body(
        caplog: pytest.LogCaptureFixture) -> None:
    limit = AnswerLimit(1 << 20, "Prometheus answer")
    with caplog.at_level(logging.WARNING, logger="kubeinfer_operator.http_bounds"):
        for source in ("http://prom-a:9090", "http://prom-a:9090", "http://prom-b:9090"):
            resp, _ = response(2 << 20, None)
            assert await limit.read(resp, source) is None
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "Prometheus answer from http://prom-a:9090 over 1 MiB: ignored, as if unreachable, "
        "until it is smaller",
        "Prometheus answer from http://prom-b:9090 over 1 MiB: ignored, as if unreachable, "
        "until it is smaller"]
    resp, _ = response(10, None)
    assert await limit.read(resp, "http://prom-a:9090") == b"x" * 10


async def test_requested_rounds_of_one_endpoint_start_at_most_once_per_interval() -> None:
    """A flood of valid requests (a namespace's token is readable from its Secret) used to
    run rounds back to back: ~200 API requests a second against the emulator."""
    calls: list[float] = []
    loop = asyncio.get_running_loop()

    async def quick(namespace: str, endpoint: str) -> None:
        calls.append(loop.time())

    scaler = ClusterScaler(signing_key=KEY)
    scaler.known[(NS, "ep")] = frozenset({"main"})
    scaler.on_request = quick
    scaler.round_interval_s = 0.3
    token = scaler_token(KEY, NS)
    started = loop.time()
    while loop.time() - started < 1.0:  # a flood for one second
        assert (await scaler._on_scale(post(token))).status == 202
        await asyncio.sleep(0.005)
    await asyncio.wait_for(settle(scaler), 5)
    assert calls[0] - started < 0.05  # the first at once: a cold start waits for nothing
    assert 3 <= len(calls) <= 5, calls  # then one per interval, one more for the last ones
    gaps = [b - a for a, b in itertools.pairwise(calls)]
    assert min(gaps) >= 0.29, gaps
    assert scaler._rounds == {}


async def test_a_round_that_raises_is_logged_and_requests_keep_their_round(
        caplog: pytest.LogCaptureFixture) -> None:
    calls = []

    async def failing(namespace: str, endpoint: str) -> None:
        calls.append(endpoint)
        if len(calls) == 1:
            await asyncio.sleep(0.05)
            raise RuntimeError("the API server is down")

    scaler = ClusterScaler(signing_key=KEY)
    scaler.known[(NS, "ep")] = frozenset({"main"})
    scaler.on_request = failing
    scaler.round_interval_s = 0.0
    token = scaler_token(KEY, NS)
    assert (await scaler._on_scale(post(token))).status == 202
    await asyncio.sleep(0.01)  # the first round runs
    assert (await scaler._on_scale(post(token))).status == 202  # asks for one more
    await asyncio.wait_for(settle(scaler), 5)
    assert calls == ["ep", "ep"] and scaler._rounds == {}
    assert "Scaling round of Endpoint ml/ep failed" in caplog.text


# -- a variant whose start failed -------------------------------------------------------------


@pytest.mark.parametrize(("error", "summary"), [
    ('model server main-0 is not ready: Model "m" failed to load from s3://b/secret/m.onnx: x',
     "its model failed to load"),
    ("model server main-0 was OOMKilled: over 1Gi", "its model server ran out of memory"),
    ("model server main-0 exited (1); see /home/u/.kubeinfer/main-0.log",
     "its model server exited"),
    ("not ready after 120s", "its model server did not become ready"),
])
def test_a_start_failure_is_summarised_without_the_servers_words(error: str,
                                                                 summary: str) -> None:
    assert start_failure_summary(error) == summary


async def test_the_local_scaler_answers_503_start_failed_until_its_next_try(
        tmp_path: Path) -> None:
    supervisor = SimpleNamespace(name="ep", running={"main": object()}, paths=SimpleNamespace(
        root=tmp_path, log_file=lambda name: tmp_path / f"{name}.log"))
    scaler = LocalScaler(cast(Any, supervisor))
    mem = scaler._memory("main")
    mem.start_failure = "its model failed to load"
    mem.retry_at = time.monotonic() + 7
    response = await scaler._on_scale(post(scaler.token))
    assert response.status == 503
    assert response.headers["Retry-After"] in {"7", "6"}
    assert isinstance(response, web.Response) and response.body is not None
    answer = StartFailed.model_validate_json(cast(bytes, response.body))
    assert answer.start_failed == "its model failed to load" and 6 < answer.retry_after_s <= 7
    assert mem.requested_at is not None  # still counted as waiting traffic
    mem.retry_at = time.monotonic() - 1  # time for the next try
    assert (await scaler._on_scale(post(scaler.token))).status == 202
