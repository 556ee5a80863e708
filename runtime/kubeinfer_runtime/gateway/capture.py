"""Data capture, the pure parts: sampling, SageMaker's record format, the bounded buffer.

The I/O (the tap on the request path, uploads, metrics) is ``capture_writer``.

Record format (SageMaker Model Monitor's, so tools that read SageMaker
captures read ours): one JSON object per line::

    {"captureData": {"endpointInput": {"observedContentType": "text/csv",
                                       "mode": "INPUT", "data": "1,2,3",
                                       "encoding": "CSV"},
                     "endpointOutput": {"observedContentType": "application/json",
                                        "mode": "OUTPUT", "data": "{\\"p\\": 1}",
                                        "encoding": "JSON"}},
     "eventMetadata": {"eventId": "<uuid4>", "inferenceId": "...",
                       "customAttributes": "...", "inferenceTime": "2026-01-02T03:04:05Z"},
     "eventVersion": "0"}

``encoding`` is CSV or JSON (``data`` is then the body as text) when the
content type, without parameters, is in the endpoint's csv / json content
types and the body is valid UTF-8; BASE64 otherwise (SageMaker's default for
types not listed). With ``captureOptions: [Input]`` only ``endpointInput`` is
written, with ``[Output]`` only ``endpointOutput``. ``inferenceId`` and
``customAttributes`` appear when the client sent them. Objects are
``<destination>/<endpoint>/<variant>/yyyy/mm/dd/hh/<mm-ss-mmm>-<uuid4>.jsonl``,
the hour (UTC) of the records' inference time, as SageMaker names them.
"""

from __future__ import annotations

import base64
import functools
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

import orjson

from kubeinfer_runtime.contract.capture import CaptureRoute, media_type
from kubeinfer_runtime.gateway.taps import Exchange

EVENT_VERSION = "0"


def sampled(draw: float, percentage: float) -> bool:
    """Whether a request whose uniform draw in [0, 1) is ``draw`` is captured."""
    return draw * 100.0 < percentage


def encode_payload(body: bytes, content_type: str | None, mode: str,
                   route: CaptureRoute) -> dict[str, str]:
    """One side of ``captureData`` (``mode``: INPUT or OUTPUT)."""
    observed = content_type or ""
    kind = media_type(observed)
    encoding = "BASE64"
    if kind and (kind in route.csv_content_types or kind in route.json_content_types):
        try:
            data = body.decode("utf-8")
            encoding = "CSV" if kind in route.csv_content_types else "JSON"
        except UnicodeDecodeError:
            pass  # declared as text but is not: keep every byte, as BASE64
    if encoding == "BASE64":
        data = base64.b64encode(body).decode("ascii")
    return {"observedContentType": observed, "mode": mode, "data": data, "encoding": encoding}


@functools.lru_cache(maxsize=64)
def _utc(second: int, fmt: str) -> str:
    return time.strftime(fmt, time.gmtime(second))


def inference_time(wall_time: float) -> str:
    """ISO 8601 UTC to the second, as SageMaker writes ``inferenceTime`` (formatted once
    per second: a batch holds thousands of records of the same few seconds)."""
    return _utc(int(wall_time), "%Y-%m-%dT%H:%M:%SZ")


def capture_record(exchange: Exchange, route: CaptureRoute) -> dict[str, object]:
    """The SageMaker capture record of ``exchange``."""
    data: dict[str, object] = {}
    if route.capture_input:
        data["endpointInput"] = encode_payload(exchange.request_body,
                                               exchange.request_content_type, "INPUT", route)
    if route.capture_output:
        data["endpointOutput"] = encode_payload(exchange.response_body,
                                                exchange.response_content_type, "OUTPUT",
                                                route)
    metadata: dict[str, str] = {"eventId": exchange.event_id}
    if exchange.inference_id is not None:
        metadata["inferenceId"] = exchange.inference_id
    if exchange.custom_attributes is not None:
        metadata["customAttributes"] = exchange.custom_attributes
    metadata["inferenceTime"] = inference_time(exchange.wall_time)
    return {"captureData": data, "eventMetadata": metadata, "eventVersion": EVENT_VERSION}


def capture_line(exchange: Exchange, route: CaptureRoute) -> bytes:
    """The record as one JSON Lines line (newline included)."""
    return orjson.dumps(capture_record(exchange, route), option=orjson.OPT_APPEND_NEWLINE)


def hour_folder(wall_time: float) -> str:
    """``yyyy/mm/dd/hh`` (UTC) of a record written at ``wall_time``."""
    return _utc(int(wall_time), "%Y/%m/%d/%H")


def object_uri(destination: str, endpoint: str, variant: str, folder: str,
               wall_time: float, unique: str | None = None) -> str:
    """Where one batch goes: ``<destination>/<endpoint>/<variant>/<folder>/<name>.jsonl``.

    ``folder`` is the records' ``hour_folder``; the name is the minute, second and
    millisecond of ``wall_time`` and a uuid4, so batches never overwrite each other.
    """
    millis_total = round(wall_time * 1000)
    stamp = time.strftime("%M-%S", time.gmtime(millis_total // 1000))
    millis = millis_total % 1000
    name = f"{stamp}-{millis:03d}-{unique or uuid.uuid4()}.jsonl"
    return f"{destination.rstrip('/')}/{endpoint}/{variant}/{folder}/{name}"


#: What a buffered record costs beyond its bodies (the record, the exchange, headers).
RECORD_OVERHEAD_BYTES = 512


@dataclass(frozen=True, slots=True)
class Record:
    """One sampled exchange waiting to be written, with the settings it was sampled under.

    The exchange is kept as is (its bodies are shared, not copied) and encoded
    when its batch is written, off the request path.
    """

    exchange: Exchange
    route: CaptureRoute
    #: Monotonic time it was buffered (age-based flushes).
    at: float
    #: Memory it holds: the captured bodies plus ``RECORD_OVERHEAD_BYTES``.
    size: int

    @classmethod
    def of(cls, exchange: Exchange, route: CaptureRoute, at: float) -> Record:
        size = RECORD_OVERHEAD_BYTES
        if route.capture_input:
            size += len(exchange.request_body)
        if route.capture_output:
            size += len(exchange.response_body)
        return cls(exchange, route, at, size)

    @property
    def variant(self) -> str:
        return self.exchange.variant

    @property
    def key(self) -> tuple[str, str, str]:
        """Which object it goes to: (destination, variant, hour folder)."""
        return (self.route.destination, self.exchange.variant,
                hour_folder(self.exchange.wall_time))


@dataclass(frozen=True, slots=True)
class Batch:
    """Records taken from the buffer for one upload attempt, grouped into objects."""

    records: tuple[Record, ...]
    #: Memory its records hold, summed once: ``CaptureBuffer.bytes`` reads it on every
    #: append, and a batch holds thousands of records.
    size: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", sum(r.size for r in self.records))

    def objects(self) -> dict[tuple[str, str, str], list[Record]]:
        """(destination, variant, hour folder) -> its records, in order: one object each."""
        out: dict[tuple[str, str, str], list[Record]] = {}
        for r in self.records:
            out.setdefault(r.key, []).append(r)
        return out


def encode_object(records: list[Record]) -> bytes:
    """The JSON Lines body of one object."""
    return b"".join(capture_line(r.exchange, r.route) for r in records)


@dataclass(slots=True)
class CaptureBuffer:
    """Records waiting for upload, within ``max_bytes`` (in-flight batch included).

    Not thread-safe: used from the event loop only. When adding a record would
    go over the bound, the oldest waiting records are dropped to make room (a
    record bigger than the whole bound is dropped itself); ``append`` and
    ``give_back`` return how many were dropped, per variant, for the counters.
    At most one batch is in flight at a time.
    """

    max_bytes: int
    waiting: deque[Record] = field(default_factory=deque)
    waiting_bytes: int = 0
    in_flight: Batch | None = None

    @property
    def bytes(self) -> int:
        """Memory held: waiting records plus the batch being uploaded."""
        return self.waiting_bytes + (self.in_flight.size if self.in_flight else 0)

    def append(self, record: Record) -> list[str]:
        """Buffer ``record``; returns the variants of the records dropped for it."""
        if record.size > self.max_bytes:
            return [record.variant]
        self.waiting.append(record)
        self.waiting_bytes += record.size
        return self._trim()

    def _trim(self) -> list[str]:
        dropped: list[str] = []
        while self.bytes > self.max_bytes and self.waiting:
            old = self.waiting.popleft()
            self.waiting_bytes -= old.size
            dropped.append(old.variant)
        return dropped

    def oldest_age(self, now: float) -> float:
        return now - self.waiting[0].at if self.waiting else 0.0

    def due(self, now: float, batch_bytes: int, max_age_s: float) -> bool:
        """Whether a batch should be uploaded now (by size or by age)."""
        return self.in_flight is None and bool(self.waiting) and (
            self.waiting_bytes >= batch_bytes or self.oldest_age(now) >= max_age_s)

    def take(self, batch_bytes: int) -> Batch | None:
        """The oldest records, up to ``batch_bytes`` (at least one), now in flight."""
        if self.in_flight is not None or not self.waiting:
            return None
        taken: list[Record] = []
        size = 0
        while self.waiting and (not taken or size + self.waiting[0].size <= batch_bytes):
            r = self.waiting.popleft()
            taken.append(r)
            size += r.size
        self.waiting_bytes -= size
        self.in_flight = Batch(tuple(taken))
        return self.in_flight

    def done(self) -> None:
        """The batch in flight was written."""
        self.in_flight = None

    def give_back(self, unwritten: tuple[Record, ...]) -> list[str]:
        """The batch in flight failed, in part: ``unwritten`` (its records not written)
        wait again, ahead of newer ones, and the oldest of all are dropped if the bound
        is now exceeded."""
        self.in_flight = None
        self.waiting.extendleft(reversed(unwritten))
        self.waiting_bytes += sum(r.size for r in unwritten)
        return self._trim()
