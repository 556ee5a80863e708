"""The gateway's taps and headers against a hostile caller, the pure parts.

A caller with a valid key controls the InvokeEndpoint headers and the body, and
through an echo-like model (a pass-through, a preprocessing container, an
identity model) the answers too. Here: headers held to SageMaker's limits and
never sent twice, comparisons that cannot recurse, overflow or cost more than a
bounded number of values (nor run long on the event loop), capture records that
keep every byte within twice the bodies' size, and a peer whose answer is read
within a bound. ``tests/integration/test_gateway_hostile_taps.py`` drives the
same through real processes.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from kubeinfer_runtime.contract.capture import CaptureRoute
from kubeinfer_runtime.gateway import compare as compare_module
from kubeinfer_runtime.gateway.capture import (
    INLINE_ENCODE_BYTES,
    RECORD_OVERHEAD_BYTES,
    Record,
    capture_line,
    capture_record,
    json_text,
)
from kubeinfer_runtime.gateway.compare import (
    INLINE_COMPARE_VALUES,
    MAX_COMPARE_BYTES,
    MAX_COMPARE_VALUES,
    compare,
    compare_bounded,
    cost,
)
from kubeinfer_runtime.gateway.headers import header_problem, split_request_headers
from kubeinfer_runtime.gateway.shadow import (
    PEER_ANSWER_FLOOR_BYTES,
    Peer,
    PeerConfig,
    answer_limit,
)
from kubeinfer_runtime.gateway.taps import Exchange
from kubeinfer_runtime.gateway.upstream import UpstreamResponse

JSON = "application/json"
SECRET = "Sekr1t-Value"

# -- headers ------------------------------------------------------------------------------


def _problem(*headers: tuple[bytes, bytes]) -> str | None:
    return split_request_headers(list(headers)).problem


def test_what_boto3_sends_passes() -> None:
    inbound = split_request_headers([
        (b"content-type", b"text/csv"), (b"accept", b"application/json; q=0.9"),
        (b"x-amzn-sagemaker-custom-attributes", b"c" * 1024),
        (b"x-amzn-sagemaker-inference-id", b"req-" + b"7" * 60),
        (b"x-amzn-sagemaker-target-variant", b"primary-2"),
        (b"x-amzn-sagemaker-target-model", "modèle.tar.gz".encode()),
        (b"x-amzn-sagemaker-target-container-hostname", b"pre-1"),
        (b"user-agent", b"x" * 5000),  # not an InvokeEndpoint parameter: not ours to judge
    ])
    assert inbound.problem is None and inbound.target_variant == "primary-2"
    assert _problem((b"content-type", b""), (b"x-amzn-sagemaker-target-variant", b" ")) is None


@pytest.mark.parametrize(("headers", "names"), [
    ([(b"content-type", b"text/csv"), (b"content-type", b"application/json")],
     ("Content-Type", "more than once")),
    ([(b"x-amzn-sagemaker-custom-attributes", b"a=1"),
      (b"x-amzn-sagemaker-custom-attributes", b"b=2")],
     ("X-Amzn-SageMaker-Custom-Attributes", "more than once")),
    ([(b"x-amzn-sagemaker-inference-id", b"one"), (b"x-amzn-sagemaker-inference-id", b"two")],
     ("InferenceId", "more than once")),
    ([(b"x-amzn-sagemaker-target-variant", b"a"), (b"x-amzn-sagemaker-target-variant", b"b")],
     ("TargetVariant", "more than once")),
    ([(b"x-amzn-sagemaker-custom-attributes", SECRET.encode() * 100)],
     ("CustomAttributes", "1200 bytes long", "at most 1024")),
    ([(b"accept", SECRET.encode() + b"\xff")], ("Accept", "not printable ASCII")),
    ([(b"content-type", SECRET.encode() + "é".encode())],
     ("ContentType", "not printable ASCII")),
    ([(b"x-amzn-sagemaker-inference-id", SECRET.encode() * 6)], ("InferenceId", "at most 64")),
    ([(b"x-amzn-sagemaker-inference-id", b" " + SECRET.encode())], ("InferenceId", "1 to 64")),
    ([(b"x-amzn-sagemaker-inference-id", b"")], ("InferenceId", "1 to 64")),
    ([(b"x-amzn-sagemaker-target-variant", SECRET.encode() + b"/../x")],
     ("TargetVariant", "variant name")),
    ([(b"x-amzn-sagemaker-target-variant", b"v" * 64)], ("TargetVariant", "at most 63")),
    ([(b"x-amzn-sagemaker-target-container-hostname", SECRET.encode() + b"_")],
     ("TargetContainerHostname", "container name")),
    ([(b"x-amzn-sagemaker-target-model", b"m" * 1025)], ("TargetModel", "at most 1024")),
])
def test_invoke_endpoint_headers_over_sagemakers_limits_are_named_not_quoted(
        headers: list[tuple[bytes, bytes]], names: tuple[str, ...]) -> None:
    problem = _problem(*headers)
    assert problem is not None
    for part in names:
        assert part in problem, problem
    assert SECRET not in problem


def test_only_the_first_problem_is_reported_and_others_headers_are_ignored() -> None:
    problem = _problem((b"accept", b"\xff"), (b"accept", b"x"), (b"cookie", b"\xff" * 9000))
    assert problem is not None and "printable" in problem
    assert header_problem(b"cookie", b"\xff" * 9000) is None


# -- comparisons --------------------------------------------------------------------------


def test_nesting_as_deep_as_json_goes_never_recurses() -> None:
    """orjson reads 1,023 levels; {"predictions": ...} that deep was a RecursionError
    (on the event loop: the pair is small), logged with a traceback per copy."""
    for depth in (990, 1000, 1023):
        deep = b'{"predictions":' * depth + b"1" + b"}" * depth
        assert compare(deep, JSON, deep, JSON).agreed
        assert not compare(deep, JSON, deep.replace(b"1", b"2"), JSON).agreed


def test_numbers_past_a_floats_range_compare_as_infinities() -> None:
    """A CSV cell of 400 digits is an int that float() refuses (OverflowError)."""
    huge = b"1" + b"0" * 400
    verdict = compare(huge + b"\n0.5\n", "text/csv", b"2\n0.5\n", "text/csv")
    assert not verdict.agreed and verdict.max_abs == math.inf
    assert compare(huge + b",0.5\n", "text/csv", huge + b",0.5\n", "text/csv").agreed
    assert compare(b"inf\n0.5\n", "text/csv", b"inf\n0.5\n", "text/csv").agreed
    assert not compare(b"inf\n0.5\n", "text/csv", b"2\n0.5\n", "text/csv").agreed
    # JSON numbers out of range and 5,000-digit integers: orjson refuses them.
    assert not compare(b"[1e999999, 0.5]", JSON, b"[1, 0.5]", JSON).agreed
    assert not compare(b"[" + b"1" * 5000 + b"]", JSON, b"[1]", JSON).agreed


def _values(value: Any) -> int:
    if isinstance(value, list):
        return 1 + sum(_values(v) for v in value)
    if isinstance(value, dict):
        return 1 + sum(_values(v) for v in value.values())
    return 1


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.text(max_size=4), lambda inner: st.lists(inner, max_size=5)
    | st.dictionaries(st.text(max_size=3), inner, max_size=4), max_leaves=40)


@settings(max_examples=300, deadline=None)
@given(value=_json, pretty=st.booleans())
def test_cost_is_an_upper_bound_of_the_values_parsed(value: Any, pretty: bool) -> None:
    body = json.dumps(value, indent=1 if pretty else None).encode()
    assert cost(body, JSON, b"", None) >= _values(value)


@settings(max_examples=200, deadline=None)
@given(rows=st.lists(st.lists(st.text(alphabet="0123456789.ab-", max_size=4), min_size=1,
                              max_size=5), min_size=1, max_size=8), crlf=st.booleans())
def test_cost_bounds_csv_cells(rows: list[list[str]], crlf: bool) -> None:
    body = ("\r\n" if crlf else "\n").join(",".join(r) for r in rows).encode()
    parsed = compare_module.parse(body, "text/csv")
    flat = parsed if all(not isinstance(r, list) for r in parsed) else [
        c for r in parsed for c in r]
    assert cost(body, "text/csv", b"", None) >= len(flat)


def test_csv_rows_end_at_newlines_only() -> None:
    assert compare_module.parse(b"1,2\r\n3,4\r\n", "text/csv") == [[1, 2], [3, 4]]
    assert compare_module.parse(b"a\x0cb,c\n", "text/csv") == [["a\x0cb", "c"]]
    assert compare_module.parse(b"1_000\n.5\n-3\n", "text/csv") == [1000, 0.5, -3]


def test_what_a_hostile_answer_costs_is_counted_before_anything_is_parsed() -> None:
    commas = b"," * (3 << 20)  # 6 MiB of empty CSV cells: 50 s of CPU before
    assert cost(commas, "text/csv", commas, "text/csv") > MAX_COMPARE_VALUES
    started = time.process_time()
    assert compare_bounded(commas, "text/csv", commas + b"1", "text/csv") is None
    assert compare_bounded(commas, "text/csv", commas, "text/csv") is not None  # equal
    long_strings = b'["' + b"x" * MAX_COMPARE_BYTES + b'"]'  # few values, many bytes
    assert compare_bounded(long_strings, JSON, long_strings[:-2] + b'y"]', JSON) is None
    assert time.process_time() - started < 0.5
    floats = b"[" + b",".join([b"0.1"] * 20) + b"]"
    assert cost(floats, JSON, floats, JSON) < INLINE_COMPARE_VALUES
    assert cost(b"\x00" * 100, "application/x-npy", b"x", None) == 0  # compared as bytes
    started = time.process_time()
    assert cost(commas, "text/csv", commas, "text/csv") > 0
    assert time.process_time() - started < 0.5


# -- capture ------------------------------------------------------------------------------

ROUTE = CaptureRoute(destination="s3://bucket/capture", sampling_percentage=100)


def _exchange(body: bytes, ct: str = JSON, out: bytes = b"[1]",
              forwarded: tuple[tuple[bytes, bytes], ...] = ()) -> Exchange:
    return Exchange("iris", "primary", body, 200, out, JSON, 0.001, "e" * 36, 1e9,
                    ((b"content-type", ct.encode()), *forwarded))


@pytest.mark.parametrize("body", [
    b"\x01" * (INLINE_ENCODE_BYTES + 10),      # encoded when its batch is written
    b"\x00\x1f" * 100,                          # encoded as it is buffered
    b'"\\' * 5000 + b"\x02" * 5000,
])
def test_a_body_that_json_would_blow_up_is_kept_as_base64(body: bytes) -> None:
    """JSON writes a control character in six bytes: a 6 MiB body of them was a 36 MiB
    string per side (72 MiB line, twice that while the batch was joined)."""
    line = capture_line(_exchange(body), ROUTE)
    record = json.loads(line)
    data = record["captureData"]["endpointInput"]
    assert data["encoding"] == "BASE64" and base64.b64decode(data["data"]) == body
    assert len(line) < 2 * len(body) + 1024
    assert capture_record(_exchange(body), ROUTE)["captureData"][  # type: ignore[index]
        "endpointInput"] == data


@pytest.mark.parametrize(("body", "encoding"), [
    (b"0,1\n" * 5000, "JSON"),                  # a newline every 4 bytes: 1.25x, text
    ('{"name": "José\\u0000", "x": "a\\nb"}'.encode(), "JSON"),
    (b'"' * 100, "JSON"),                       # exactly twice: still text
    (b'"' * 100 + b"\x01", "BASE64"),
    (b"\xed\xa0\x80", "BASE64"),                # a lone surrogate is not UTF-8
    (b"ok\xff", "BASE64"),
])
def test_every_byte_comes_back_in_one_line(body: bytes, encoding: str) -> None:
    line = capture_line(_exchange(body), ROUTE)
    assert line.count(b"\n") == 1 and line.endswith(b"\n")
    data = json.loads(line)["captureData"]["endpointInput"]
    assert data["encoding"] == encoding
    back = (base64.b64decode(data["data"]) if encoding == "BASE64"
            else data["data"].encode("utf-8"))
    assert back == body
    assert (json_text(body) is None) == (encoding == "BASE64")


def test_a_buffered_record_counts_the_headers_it_holds() -> None:
    headers = ((b"x-amzn-sagemaker-custom-attributes", b"c" * 1024),
               (b"x-amzn-sagemaker-inference-id", b"i" * 64))
    body = b"x" * (INLINE_ENCODE_BYTES + 1)
    record = Record.of(_exchange(body, forwarded=headers), ROUTE, 0.0)
    assert record.line is None
    assert record.size == (len(body) + 3 + len(JSON) + 1024 + 64 + RECORD_OVERHEAD_BYTES)


# -- shadows ------------------------------------------------------------------------------

ENDPOINT = "hostile-taps-test"


def _config() -> PeerConfig:
    return PeerConfig(name="cand", upstreams=("http://a",), sampling_percentage=100,
                      timeout_s=5.0, queue_size=10, concurrency=1)


class Answers:
    """Answers each request with ``body``; records the ``max_body`` it was given."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.max_body: list[int | None] = []

    async def request(self, url: str, *args: Any, max_body: int | None = None,
                      **kw: Any) -> UpstreamResponse:
        self.max_body.append(max_body)
        return UpstreamResponse(200, [(b"content-type", JSON.encode())], self.body)


def _copy(production: bytes) -> Exchange:
    return Exchange(ENDPOINT, "primary", b"1", 200, production, JSON, 0.001, "e", 0.0)


def test_a_peers_answer_is_read_up_to_twice_productions() -> None:
    assert answer_limit(10, None) == PEER_ANSWER_FLOOR_BYTES
    assert answer_limit(5 << 20, None) == 10 << 20
    assert answer_limit(5 << 20, 8 << 20) == 8 << 20
    assert answer_limit(0, 1024) == 1024


async def test_each_copy_asks_for_its_answer_limit() -> None:
    client = Answers(b"[1]")
    peer = Peer(ENDPOINT, _config(), client, max_response_bytes=24 << 20)  # type: ignore[arg-type]
    large = b"[" + b"1," * (3 << 20) + b"1]"
    await peer.send(_copy(b"[1]"), None)
    await peer.send(_copy(large), None)
    assert client.max_body == [PEER_ANSWER_FLOOR_BYTES, 2 * len(large)]


async def test_answers_too_large_to_compare_are_counted_not_parsed() -> None:
    big = b"[" + b"0.5," * MAX_COMPARE_VALUES + b"0.5]"
    other = big[:-4] + b"1.5]"
    client = Answers(other)
    peer = Peer(ENDPOINT, _config(), client)  # type: ignore[arg-type]
    started = time.process_time()
    outcome = await peer.send(_copy(big), None)
    assert outcome.uncompared and outcome.verdict is None
    assert time.process_time() - started < 0.5  # counted, never parsed
    peer.record(_copy(big), outcome)
    assert REGISTRY.get_sample_value("kubeinfer_shadow_uncompared_total", {
        "endpoint": ENDPOINT, "variant": "primary", "peer": "cand"}) == 1.0
    client.body = big  # byte for byte the same: agrees without a parse
    outcome = await peer.send(_copy(big), None)
    assert not outcome.uncompared and outcome.verdict is not None and outcome.verdict.agreed


async def test_large_comparisons_run_in_a_thread_one_at_a_time() -> None:
    gate = asyncio.Semaphore(1)
    answer = b"[" + b"0.5," * (2 * INLINE_COMPARE_VALUES) + b"0.5]"
    peer = Peer(ENDPOINT, _config(), Answers(answer), compare_gate=gate)  # type: ignore[arg-type]
    small = Peer(ENDPOINT, _config(), Answers(b"[0.5]"), compare_gate=gate)  # type: ignore[arg-type]
    async with gate:  # another comparison holds the gateway's thread
        waiting = asyncio.create_task(peer.send(_copy(answer), None))
        inline = await small.send(_copy(b"[0.5]"), None)  # small: on the loop, no wait
        assert inline.verdict is not None and inline.verdict.agreed
        await asyncio.sleep(0.05)
        assert not waiting.done()
    outcome = await waiting
    assert outcome.verdict is not None and outcome.verdict.agreed


# -- metrics the operator reads -----------------------------------------------------------


def test_a_label_value_cannot_inject_samples_into_what_the_operator_reads() -> None:
    """No label of the gateway's comes from a caller, and the exposition escapes what a
    model server's error type could hold: the operator's parser (prometheus_client's)
    reads one sample per series, never a forged one."""
    from prometheus_client import CollectorRegistry, Counter, generate_latest

    from kubeinfer_operator.reconcile.rollout_alarms import parse_fleet_metrics

    registry = CollectorRegistry()
    invocations = Counter("kubeinfer_gateway_invocations", "x", ("endpoint", "variant"),
                          registry=registry)
    errors = Counter("kubeinfer_gateway_errors", "x", ("endpoint", "variant", "code"),
                     registry=registry)
    invocations.labels("e", "primary-green").inc(10)
    forged = ('X"} 1\nkubeinfer_gateway_errors_total{endpoint="e",variant="primary-green",'
              'code="ModelError"} 1e9\n#\\')
    errors.labels("e", "primary-green", forged).inc()
    errors.labels("e", "primary-green", "a\rb\x00c\u2028").inc()
    counters = parse_fleet_metrics(generate_latest(registry).decode(), "e")
    assert counters["primary-green"].invocations == 10
    assert counters["primary-green"].errors == 2  # not 1e9
