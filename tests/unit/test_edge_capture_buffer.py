"""The device's capture buffer: bounded, exact drop counts, durable, at-least-once uploads."""

from __future__ import annotations

import base64
import json
import random
from pathlib import Path

import pytest

from kubeinfer_runtime.contract.edge import MAX_CAPTURE_UPLOAD_BYTES, OnFull
from kubeinfer_runtime.edge.capture_buffer import CaptureBuffer, capture_record


def rec(i: int) -> dict[str, object]:
    return {"i": i, "pad": "x" * 80}


LINE = len(json.dumps(rec(10), separators=(",", ":"))) + 1


def ids(buf: CaptureBuffer) -> list[int]:
    batch = buf.take_batch(1 << 30)
    return [] if batch is None else [json.loads(r)["i"] for r in batch.records]


def test_drop_oldest_counts_exactly(tmp_path: Path) -> None:
    buf = CaptureBuffer(tmp_path, max_bytes=LINE * 10, segment_bytes=LINE * 3)
    for i in range(10, 35):
        assert buf.append(rec(i))
    assert buf.dropped == 15
    assert buf.buffered == 10
    assert ids(buf) == list(range(25, 35))
    assert buf.size_bytes <= buf.max_bytes
    # Freed segments are deleted: disk use stays within the bound plus one segment.
    on_disk = sum(p.stat().st_size for p in tmp_path.glob("seg-*.jsonl"))
    assert on_disk <= buf.max_bytes + buf.segment_bytes


def test_reject_new_counts_exactly(tmp_path: Path) -> None:
    buf = CaptureBuffer(tmp_path, max_bytes=LINE * 10, on_full=OnFull.REJECT_NEW,
                        segment_bytes=LINE * 4)
    results = [buf.append(rec(i)) for i in range(10, 27)]
    assert results.count(True) == 10 and results.count(False) == 7
    assert buf.dropped == 7
    assert ids(buf) == list(range(10, 20))


def test_record_over_the_bound_is_dropped(tmp_path: Path) -> None:
    buf = CaptureBuffer(tmp_path, max_bytes=4096)
    assert not buf.append({"big": "y" * 5000})
    assert buf.dropped == 1 and buf.buffered == 0


def test_a_record_larger_than_one_upload_is_dropped(tmp_path: Path) -> None:
    """The fleet refuses an upload over MAX_CAPTURE_UPLOAD_BYTES (413), so such a record
    would be refused at every try and hold back every record after it: it is dropped (and
    counted) on append, even when the buffer has room for it."""
    buf = CaptureBuffer(tmp_path, max_bytes=64 << 20, on_full=OnFull.REJECT_NEW)
    assert buf.append(rec(10))
    assert not buf.append({"big": "y" * MAX_CAPTURE_UPLOAD_BYTES})
    assert buf.append(rec(11))
    assert buf.dropped == 1 and buf.buffered == 2
    batch = buf.take_batch(MAX_CAPTURE_UPLOAD_BYTES)
    assert batch is not None and batch.size <= MAX_CAPTURE_UPLOAD_BYTES
    assert ids(buf) == [10, 11]
    assert CaptureBuffer(tmp_path, max_bytes=64 << 20).dropped == 1  # survives a restart


def test_a_discarded_batch_counts_as_dropped(tmp_path: Path) -> None:
    buf = CaptureBuffer(tmp_path, max_bytes=1 << 20)
    for i in range(10, 13):
        buf.append(rec(i))
    batch = buf.take_batch(LINE)  # record 10 alone
    assert batch is not None and len(batch.records) == 1
    buf.discard(batch)
    buf.discard(batch)  # a repeated discard drops nothing more
    assert buf.dropped == 1 and buf.buffered == 2
    assert ids(buf) == [11, 12]
    assert CaptureBuffer(tmp_path, max_bytes=1 << 20).dropped == 1


def test_restart_keeps_records_cursor_and_count(tmp_path: Path) -> None:
    buf = CaptureBuffer(tmp_path, max_bytes=LINE * 10, segment_bytes=LINE * 3)
    for i in range(10, 25):
        buf.append(rec(i))
    batch = buf.take_batch(LINE * 2)
    assert batch is not None
    buf.ack(batch)
    # A crash in the middle of an append leaves half a line: it is cut off on open.
    newest = max(tmp_path.glob("seg-*.jsonl"))
    with open(newest, "ab") as f:
        f.write(b'{"i": 99, "pad"')
    again = CaptureBuffer(tmp_path, max_bytes=LINE * 10, segment_bytes=LINE * 3)
    assert again.dropped == 5
    assert ids(again) == list(range(17, 25))
    assert again.buffered == 8
    assert again.append(rec(25))
    assert ids(again) == list(range(17, 26))


def test_failed_upload_loses_nothing(tmp_path: Path) -> None:
    buf = CaptureBuffer(tmp_path, max_bytes=1 << 20)
    for i in range(10, 20):
        buf.append(rec(i))
    first = buf.take_batch(LINE * 4)
    assert first is not None and len(first.records) == 4
    # The upload failed: no ack. The next batch holds the same records.
    second = buf.take_batch(LINE * 4)
    assert second is not None and second.records == first.records
    buf.ack(second)
    assert ids(buf) == list(range(14, 20))
    assert buf.buffered == 6
    buf.ack(second)  # a repeated ack removes nothing more
    assert buf.buffered == 6
    reopened = CaptureBuffer(tmp_path, max_bytes=1 << 20)
    assert ids(reopened) == list(range(14, 20))


def test_drop_oldest_while_a_batch_is_in_flight(tmp_path: Path) -> None:
    buf = CaptureBuffer(tmp_path, max_bytes=LINE * 4, segment_bytes=LINE * 2)
    for i in range(10, 14):
        buf.append(rec(i))
    batch = buf.take_batch(LINE * 2)  # records 10, 11
    assert batch is not None
    buf.append(rec(14))  # drops 10
    buf.ack(batch)  # removes only 11: 10 is already gone
    assert buf.dropped == 1
    assert ids(buf) == [12, 13, 14]
    assert buf.buffered == 3


def test_capture_record_format() -> None:
    r = capture_record(device_id="d1", request=b'{"x": 1}', request_type="application/json",
                       response=b"\x00\x01", response_type="application/octet-stream",
                       at=0.0, event_id="e1")
    assert r["eventVersion"] == "0"
    assert r["eventMetadata"] == {"eventId": "e1", "inferenceTime": "1970-01-01T00:00:00.000Z",
                                  "deviceId": "d1"}
    inp = r["captureData"]["endpointInput"]
    out = r["captureData"]["endpointOutput"]
    assert inp == {"observedContentType": "application/json", "mode": "INPUT",
                   "data": '{"x": 1}', "encoding": "JSON"}
    assert out["encoding"] == "BASE64" and base64.b64decode(out["data"]) == b"\x00\x01"
    csv = capture_record(device_id="d", request=b"1,2", request_type="text/csv",
                         response=b"3", response_type="text/csv")
    assert csv["captureData"]["endpointInput"]["encoding"] == "CSV"


@pytest.mark.parametrize("seed", range(30))
def test_counts_stay_true_through_acks_drops_restarts_and_a_smaller_bound(
        tmp_path: Path, seed: int) -> None:
    """Acks of batches taken before drops, small segments after a smaller bound, restarts:
    the count always equals the live records (an ack used to jump the cursor over whole
    segments, and freeing the cursor's segment then sent it back to an older one, bringing
    acknowledged records back and the count below zero)."""
    rng = random.Random(seed)
    buf = CaptureBuffer(tmp_path, 64 << 20)
    inflight = None
    for step in range(200):
        roll = rng.random()
        if step == 60:
            buf.configure(4096, rng.choice([OnFull.DROP_OLDEST, OnFull.REJECT_NEW]))
        if roll < 0.6:
            buf.append({"x": "y" * 380, "i": step})
        elif roll < 0.8:
            inflight = buf.take_batch(rng.choice([500, 2000, 1 << 20]))
        elif inflight is not None:
            buf.ack(inflight)
            inflight = None
        if roll > 0.97:
            buf = CaptureBuffer(tmp_path, buf.max_bytes, buf.on_full, buf.segment_bytes)
            inflight = None
        everything = buf.take_batch(1 << 30)
        live = len(everything.records) if everything is not None else 0
        assert buf.buffered == live >= 0, (seed, step)
