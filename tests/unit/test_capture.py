"""Data capture's pure parts: SageMaker's record format, sampling, the bounded buffer."""

from __future__ import annotations

import base64
import calendar
import json
import random

import orjson
import pytest
from pydantic import ValidationError

from kubeinfer_runtime.contract import EndpointRoute, GatewaySettings, RouteTable, VariantRoute
from kubeinfer_runtime.contract.capture import CaptureRoute, destination_problem
from kubeinfer_runtime.gateway.capture import (
    INLINE_ENCODE_BYTES,
    RECORD_OVERHEAD_BYTES,
    CaptureBuffer,
    Heads,
    Objects,
    Record,
    capture_line,
    capture_record,
    encode_into,
    object_uri,
    sampled,
)
from kubeinfer_runtime.gateway.capture_writer import CaptureTaps
from kubeinfer_runtime.gateway.taps import Exchange, make_exchange, observe_all

# 2026-01-02T03:04:05.678Z
WALL = calendar.timegm((2026, 1, 2, 3, 4, 5)) + 0.678
EVENT = "0b4c2f5e-8d7a-4f57-9f1e-3c2b1a0d9e8f"
ROUTE = CaptureRoute(destination="s3://bucket/capture", sampling_percentage=100)


def _exchange(body: bytes = b"1,2,3\n", ct: str | None = "text/csv",
              out: bytes = b'{"predictions": [1]}',
              out_ct: str | None = "application/json", **kw: object) -> Exchange:
    headers = {"content-type": ct, "accept": "application/json",
               "x-amzn-sagemaker-inference-id": "inf-1",
               "x-amzn-sagemaker-custom-attributes": "c=1"}
    for name in ("request_content_type", "accept", "inference_id", "custom_attributes"):
        if name in kw:
            key = {"request_content_type": "content-type",
                   "inference_id": "x-amzn-sagemaker-inference-id",
                   "custom_attributes": "x-amzn-sagemaker-custom-attributes"}.get(name, name)
            headers[key] = kw.pop(name)  # type: ignore[assignment]
    values: dict[str, object] = dict(
        endpoint="iris", variant="primary", request_body=body, status=200,
        response_body=out, response_content_type=out_ct, upstream_latency_s=0.001,
        event_id=EVENT, wall_time=WALL,
        forwarded=tuple((k.encode(), v.encode("latin-1")) for k, v in headers.items()
                        if v is not None))
    values.update(kw)
    return Exchange(**values)  # type: ignore[arg-type]


def test_golden_csv_in_json_out() -> None:
    line = capture_line(_exchange(), ROUTE)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line) == {
        "captureData": {
            "endpointInput": {"observedContentType": "text/csv", "mode": "INPUT",
                              "data": "1,2,3\n", "encoding": "CSV"},
            "endpointOutput": {"observedContentType": "application/json", "mode": "OUTPUT",
                               "data": '{"predictions": [1]}', "encoding": "JSON"},
        },
        "eventMetadata": {"eventId": EVENT, "inferenceId": "inf-1", "customAttributes": "c=1",
                          "inferenceTime": "2026-01-02T03:04:05Z"},
        "eventVersion": "0",
    }


def test_golden_binary_is_base64_and_parameters_are_ignored() -> None:
    raw = bytes(range(256))
    record = capture_record(_exchange(raw, "application/x-npy", b"\xff\x00",
                                      "text/csv; charset=utf-8", inference_id=None,
                                      custom_attributes=None), ROUTE)
    assert record == {
        "captureData": {
            "endpointInput": {"observedContentType": "application/x-npy", "mode": "INPUT",
                              "data": base64.b64encode(raw).decode(), "encoding": "BASE64"},
            # text/csv by its type, but not UTF-8: every byte kept, as BASE64.
            "endpointOutput": {"observedContentType": "text/csv; charset=utf-8",
                               "mode": "OUTPUT", "data": "/wA=", "encoding": "BASE64"},
        },
        "eventMetadata": {"eventId": EVENT, "inferenceTime": "2026-01-02T03:04:05Z"},
        "eventVersion": "0",
    }


def test_golden_input_only_and_output_only() -> None:
    only_in = capture_record(_exchange(), replace_route(capture_output=False))
    assert list(only_in["captureData"]) == ["endpointInput"]  # type: ignore[call-overload]
    only_out = capture_record(_exchange(), replace_route(capture_input=False))
    assert list(only_out["captureData"]) == ["endpointOutput"]  # type: ignore[call-overload]


def test_content_type_lists_decide_the_encoding() -> None:
    route = replace_route(csv_content_types=("Text/Plain ; x=y",), json_content_types=())
    assert route.csv_content_types == ("text/plain",)
    record = capture_record(_exchange(b"a", "text/plain; charset=utf-8", b"{}",
                                      "application/json"), route)
    data = record["captureData"]
    assert data["endpointInput"]["encoding"] == "CSV"  # type: ignore[index]
    assert data["endpointOutput"] == {  # type: ignore[index]
        "observedContentType": "application/json", "mode": "OUTPUT", "data": "e30=",
        "encoding": "BASE64"}
    missing = capture_record(_exchange(b"x", None), ROUTE)["captureData"]
    assert missing["endpointInput"] == {  # type: ignore[index]
        "observedContentType": "", "mode": "INPUT", "data": "eA==", "encoding": "BASE64"}


def replace_route(**kw: object) -> CaptureRoute:
    return CaptureRoute(**{**ROUTE.model_dump(), **kw})


def test_object_uri_is_sagemakers_layout() -> None:
    uri = object_uri("s3://bucket/capture/", "iris", "primary", "2026/01/02/03", WALL, "u")
    assert uri == "s3://bucket/capture/iris/primary/2026/01/02/03/04-05-678-u.jsonl"
    assert object_uri("file:///tmp/c", "e", "v", "f", WALL).startswith("file:///tmp/c/e/v/f/")


def test_destinations() -> None:
    assert destination_problem("s3://b") is None
    assert destination_problem("file:///var/capture") is None
    for bad in ("s3:///x", "file:///", "http://x/y", "file://rel/dir", "s3://b/../x"):
        assert destination_problem(bad), bad
        with pytest.raises(ValidationError):
            CaptureRoute(destination=bad)
    with pytest.raises(ValidationError):
        CaptureRoute(destination="s3://b", sampling_percentage=101)


def test_sampling_decision() -> None:
    assert not sampled(0.0, 0)
    assert sampled(0.999999, 100)
    assert sampled(0.299, 30) and not sampled(0.3, 30)
    rng = random.Random(7)
    hits = sum(sampled(rng.random(), 30) for _ in range(100_000))
    assert abs(hits - 30_000) < 600


def _record(size: int, variant: str = "v", at: float = 0.0) -> Record:
    line = b"x" * (size - RECORD_OVERHEAD_BYTES)
    return Record(line, None, ROUTE, variant, WALL, at, size)


def encode_object(records: list[Record]) -> bytes:
    """One object's body, as the writer builds it."""
    objects: Objects = {}
    encode_into(objects, records, {})
    return b"".join(line for lines, _ in objects.values() for line in lines)


def test_small_records_are_encoded_as_they_are_buffered() -> None:
    small = Record.of(_exchange(variant="v"), ROUTE, 5.0)
    assert small.line == capture_line(_exchange(variant="v"), ROUTE)
    assert small.exchange is None and small.size == len(small.line) + RECORD_OVERHEAD_BYTES
    big_body = b"x" * (INLINE_ENCODE_BYTES + 1)
    big = Record.of(_exchange(big_body), ROUTE, 5.0)
    assert big.line is None and big.exchange is not None
    headers = sum(len(v) for _, v in big.exchange.forwarded)  # held with the bodies
    assert big.size == (len(big_body) + len(big.exchange.response_body) + headers
                        + RECORD_OVERHEAD_BYTES)
    # Only what is captured counts: the input alone here.
    only_in = replace_route(capture_output=False)
    assert Record.of(_exchange(b"x" * INLINE_ENCODE_BYTES, out=b"y" * 99), only_in, 0).line
    # Encoded now or later, the object's bytes are the same.
    assert encode_object([big]) == capture_line(_exchange(big_body), ROUTE)


def test_buffer_drops_oldest_within_its_bound() -> None:
    buf = CaptureBuffer(max_bytes=3000)
    assert buf.append(_record(1000, "a")) == []
    assert buf.append(_record(1000, "b")) == []
    assert buf.append(_record(1000, "c")) == []
    assert buf.append(_record(1000, "d")) == ["a"]
    assert [r.variant for r in buf.waiting] == ["b", "c", "d"] and buf.bytes == 3000
    # Bigger than the whole bound: dropped itself, the others stay.
    assert buf.append(_record(3001, "huge")) == ["huge"]
    assert buf.bytes == 3000


def test_buffer_batches_and_failed_uploads() -> None:
    buf = CaptureBuffer(max_bytes=4000)
    for v in "abc":
        buf.append(_record(1000, v, at=1.0))
    assert not buf.due(now=1.5, batch_bytes=10_000, max_age_s=1.0)
    assert buf.due(now=2.0, batch_bytes=10_000, max_age_s=1.0)  # by age
    assert buf.due(now=1.0, batch_bytes=3000, max_age_s=60)  # by size
    batch = buf.take(batch_bytes=2000)
    assert batch is not None and [r.variant for r in batch.records] == ["a", "b"]
    assert buf.take(2000) is None  # one batch in flight at a time
    assert not buf.due(now=99, batch_bytes=1, max_age_s=0)
    # In flight counts against the bound: 2000 in flight + 1000 waiting + 1000 new.
    assert buf.append(_record(1000, "d")) == []
    assert buf.append(_record(1000, "e")) == ["c"]
    assert buf.bytes == 4000
    # "a" was written, "b" failed: "b" waits again ahead of newer records, the oldest
    # waiting beyond the bound goes.
    assert buf.give_back((batch.records[1],)) == []
    assert [r.variant for r in buf.waiting] == ["b", "d", "e"] and buf.in_flight is None
    batch = buf.take(batch_bytes=1)  # at least one record
    assert batch is not None and len(batch.records) == 1
    buf.done()
    assert buf.bytes == 2000


def test_batch_objects_by_destination_variant_and_hour() -> None:
    other_hour = WALL + 3600
    records = [Record.of(_exchange(variant=v, wall_time=t), ROUTE, 0)
               for v, t in (("a", WALL), ("b", WALL), ("a", other_hour), ("a", WALL))]
    from kubeinfer_runtime.gateway.capture import object_folder

    objects: Objects = {}
    encode_into(objects, records[:1], {})  # in slices, as the writer does
    encode_into(objects, records[1:], {})
    assert [(d, v, object_folder(h)) for d, v, h in objects] == [
        ("s3://bucket/capture", "a", "2026/01/02/03"),
        ("s3://bucket/capture", "b", "2026/01/02/03"),
        ("s3://bucket/capture", "a", "2026/01/02/04")]
    lines, members = objects[("s3://bucket/capture", "a", int(WALL) // 3600)]
    assert members == [records[0], records[3]]
    assert b"".join(lines) == encode_object([records[0], records[3]])
    assert len(b"".join(lines).splitlines()) == 2


def test_the_encoding_cache_stays_bounded_whatever_content_types_clients_send() -> None:
    from kubeinfer_runtime.gateway.capture import HEADS_MAX

    heads: Heads = {}
    for i in range(HEADS_MAX * 5):
        ex = _exchange(b"1", f"text/x-{i}")
        assert capture_line(ex, ROUTE, heads) == capture_line(ex, ROUTE)
        assert len(heads) <= HEADS_MAX


def test_line_is_the_record_as_json() -> None:
    """``capture_line`` writes pieces; the record's dict is the reference."""
    rng = random.Random(7)
    routes = [ROUTE, replace_route(capture_input=False), replace_route(capture_output=False),
              replace_route(csv_content_types=("text/plain",), json_content_types=())]
    types = [None, "text/csv", "application/json", "application/json; charset=utf-8",
             "Text/CSV", "application/x-npy", 'text/plain; q="1"', "é/x"]
    bodies = [b"", b"1,2\n", b'{"a": "\\u00e9\\""}', "é\u2028x".encode(), b"\xff\x00",
              bytes(range(256))]
    heads: Heads = {}
    for _ in range(300):
        route = rng.choice(routes)
        kw: dict[str, object] = {}
        if rng.random() < 0.5:
            kw["inference_id"] = rng.choice(["id-1", 'q"uote', "\u00e9"])
        if rng.random() < 0.5:
            kw["custom_attributes"] = rng.choice(["c=1", "a\\b"])
        ex = _exchange(rng.choice(bodies), rng.choice(types), rng.choice(bodies),
                       rng.choice(types), wall_time=WALL + rng.random() * 7200, **kw)
        expected = orjson.dumps(capture_record(ex, route), option=orjson.OPT_APPEND_NEWLINE)
        assert capture_line(ex, route, heads) == expected
        assert capture_line(ex, route) == expected


def test_exchange_from_forwarded_headers() -> None:
    ex = make_exchange("e", "v", [(b"content-type", b"text/csv"), (b"accept", b"*/*"),
                                  (b"x-amzn-sagemaker-inference-id", b"id-7"),
                                  (b"x-amzn-sagemaker-custom-attributes", b"k=v")],
                       b"1", 200, b"2", None, 0.5)
    assert (ex.request_content_type, ex.accept, ex.inference_id, ex.custom_attributes,
            ex.response_content_type) == ("text/csv", "*/*", "id-7", "k=v", None)
    assert len(ex.event_id) == 36 and ex.wall_time > 0
    with pytest.raises(AttributeError):
        ex.status = 500  # type: ignore[misc]


def test_a_failing_tap_never_reaches_the_client(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[Exchange] = []

    class Broken:
        def observe(self, exchange: Exchange) -> None:
            raise RuntimeError("bug")

    class Good:
        def observe(self, exchange: Exchange) -> None:
            seen.append(exchange)

    observe_all((Broken(), Good()), _exchange())
    observe_all((Broken(), Good()), _exchange())
    assert len(seen) == 2
    assert sum("Broken failed" in r.getMessage() for r in caplog.records) == 1


def _table(capture: CaptureRoute | None) -> RouteTable:
    return RouteTable(endpoints={"iris": EndpointRoute(
        name="iris", variants=[VariantRoute(name="primary", weight=1)], capture=capture)})


def test_taps_survive_reloads_and_sample_at_the_rate() -> None:
    settings = GatewaySettings.given({"capture_buffer_bytes": 1 << 20})
    taps = CaptureTaps(settings, rng=random.Random(3))
    first = taps.apply(_table(replace_route(sampling_percentage=30)))
    (tap,) = first["iris"]
    for _ in range(2000):
        tap.observe(_exchange())
    assert abs(len(tap.buffer.waiting) - 600) <= 60
    # A new rate keeps the tap and what it buffered.
    again = taps.apply(_table(replace_route(sampling_percentage=0)))
    assert again["iris"] == (tap,)
    kept = len(tap.buffer.waiting)
    tap.observe(_exchange())
    assert len(tap.buffer.waiting) == kept
    # Capture removed: no taps; the old one is kept until drained.
    assert taps.apply(_table(None)) == {}
    assert taps.retired == [tap] and tap.retired


def test_route_table_carries_capture() -> None:
    table = _table(replace_route(capture_input=False))
    again = RouteTable.from_json(table.to_json())
    assert again.endpoints["iris"].capture == table.endpoints["iris"].capture
    assert _exchange()._replace(status=500).status == 500
