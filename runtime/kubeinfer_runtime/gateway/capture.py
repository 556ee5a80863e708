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
types, the body is valid UTF-8 and its JSON string is at most twice its size
(JSON writes a control character as ``\\u0001``: six bytes for one, so a body
of them would be a line six times its size); BASE64 otherwise (SageMaker's
default for types not listed). Either way ``data`` gives back the exact bytes,
and a line is at most about twice the bodies it holds. With
``captureOptions: [Input]`` only ``endpointInput`` is written, with
``[Output]`` only ``endpointOutput``. ``inferenceId`` and
``customAttributes`` appear when the client sent them. Objects are
``<destination>/<endpoint>/<variant>/yyyy/mm/dd/hh/<mm-ss-mmm>-<uuid4>.jsonl``,
the hour (UTC) of the records' inference time, as SageMaker names them.
"""

from __future__ import annotations

import base64
import bisect
import functools
import itertools
import operator
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import orjson

from kubeinfer_runtime.contract import H_CUSTOM_ATTRIBUTES, H_INFERENCE_ID
from kubeinfer_runtime.contract.capture import CaptureRoute, media_type
from kubeinfer_runtime.gateway.taps import Exchange

EVENT_VERSION = "0"
_CONTENT_TYPE = b"content-type"
_INFERENCE_ID = H_INFERENCE_ID.encode()
_CUSTOM_ATTRIBUTES = H_CUSTOM_ATTRIBUTES.encode()


def sampled(draw: float, percentage: float) -> bool:
    """Whether a request whose uniform draw in [0, 1) is ``draw`` is captured."""
    return draw * 100.0 < percentage


#: What JSON escapes in a string: in two bytes (``\\n``) and in six (``\\u0001``).
_ESCAPED_SHORT = b'"\\\b\t\n\f\r'
_ESCAPED_LONG = bytes(c for c in range(0x20) if c not in b"\b\t\n\f\r")


def json_text(body: bytes) -> bytes | None:
    """``body`` as a JSON string, when it is UTF-8 and that string is at most twice its
    size (quotes aside); None: it is to be written as BASE64.

    A body longer than ``INLINE_ENCODE_BYTES`` has its escapes counted first (in C), so
    one that would not fit is never escaped: a 6 MiB body of control characters costs a
    6 MiB count, not a 36 MiB string.
    """
    n = len(body)
    if n > INLINE_ENCODE_BYTES:
        extra = ((n - len(body.translate(None, _ESCAPED_SHORT)))
                 + 5 * (n - len(body.translate(None, _ESCAPED_LONG))))
        if extra > n:
            return None
    try:
        text = orjson.dumps(body.decode("utf-8"))
    except UnicodeDecodeError:
        return None  # declared as text but is not: keep every byte, as BASE64
    return text if len(text) <= 2 * n + 2 else None


def encode_payload(body: bytes, content_type: str | None, mode: str,
                   route: CaptureRoute) -> dict[str, str]:
    """One side of ``captureData`` (``mode``: INPUT or OUTPUT)."""
    observed = content_type or ""
    kind = media_type(observed)
    encoding = "BASE64"
    if (kind and (kind in route.csv_content_types or kind in route.json_content_types)
            and json_text(body) is not None):
        data = body.decode("utf-8")
        encoding = "CSV" if kind in route.csv_content_types else "JSON"
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


def capture_line(exchange: Exchange, route: CaptureRoute,
                 heads: dict[tuple[int, str | None, str], tuple[bytes, str | None]] | None = None,
                 ) -> bytes:
    """The record as one JSON Lines line (newline included).

    The same bytes as ``orjson.dumps(capture_record(...))`` plus a newline (a unit
    test holds them equal), written from pieces: every captured request is encoded
    on the gateway's event loop, and building the record's five dicts cost twice as
    much. ``heads`` caches each side's leading bytes across the lines of one batch
    (keyed by the route's id: the caller keeps the routes alive).
    """
    if heads is None:
        heads = {}
    dumps = orjson.dumps
    content_type = inference_id = custom = None
    for name, value in exchange.forwarded:
        if name == _CONTENT_TYPE:
            content_type = value.decode("latin-1")
        elif name == _INFERENCE_ID:
            inference_id = value.decode("latin-1")
        elif name == _CUSTOM_ATTRIBUTES:
            custom = value.decode("latin-1")
    parts = [b'{"captureData":{']
    if route.capture_input:
        parts.append(b'"endpointInput":')
        parts.append(_payload_bytes(exchange.request_body, content_type, "INPUT", route, heads))
    if route.capture_output:
        parts.append(b',"endpointOutput":' if route.capture_input else b'"endpointOutput":')
        parts.append(_payload_bytes(exchange.response_body, exchange.response_content_type,
                                    "OUTPUT", route, heads))
    parts.append(b'},"eventMetadata":{"eventId":')
    parts.append(dumps(exchange.event_id))
    if inference_id is not None:
        parts.append(b',"inferenceId":')
        parts.append(dumps(inference_id))
    if custom is not None:
        parts.append(b',"customAttributes":')
        parts.append(dumps(custom))
    parts.append(_time_tail(int(exchange.wall_time)))
    return b"".join(parts)


@functools.lru_cache(maxsize=64)
def _time_tail(second: int) -> bytes:
    return (b',"inferenceTime":' + orjson.dumps(inference_time(second))
            + b'},"eventVersion":' + orjson.dumps(EVENT_VERSION) + b"}\n")


def _payload_head(content_type: str | None, mode: str,
                  route: CaptureRoute) -> tuple[bytes, str | None]:
    """The bytes of one side before ``data``, and its text encoding (CSV, JSON; None:
    BASE64), as ``encode_payload`` decides them."""
    observed = content_type or ""
    kind = media_type(observed)
    text = None
    if kind and (kind in route.csv_content_types or kind in route.json_content_types):
        text = "CSV" if kind in route.csv_content_types else "JSON"
    return (b'{"observedContentType":' + orjson.dumps(observed) + b',"mode":'
            + orjson.dumps(mode) + b',"data":', text)


_BASE64_TAIL = b'","encoding":"BASE64"}'
#: Entries a ``heads`` cache keeps (one per route, content type and side).
HEADS_MAX = 64


def _payload_bytes(body: bytes, content_type: str | None, mode: str, route: CaptureRoute,
                   heads: dict[tuple[int, str | None, str], tuple[bytes, str | None]],
                   ) -> bytes:
    """``encode_payload``'s dict as JSON."""
    key = (id(route), content_type, mode)
    found = heads.get(key)
    if found is None:
        if len(heads) >= HEADS_MAX:
            heads.clear()  # content types are the client's: keep the cache bounded
        found = heads[key] = _payload_head(content_type, mode, route)
    head, text = found
    if text is not None:
        data = json_text(body)
        if data is not None:
            return head + data + b',"encoding":"' + text.encode() + b'"}'
    return head + b'"' + base64.b64encode(body) + _BASE64_TAIL


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


#: Exchanges whose captured bodies are at most this long are encoded as they are
#: buffered (a few µs); longer ones when their batch is written, off the request path.
INLINE_ENCODE_BYTES = 16 << 10
#: What a buffered record costs beyond its bodies (the record, the exchange, headers).
RECORD_OVERHEAD_BYTES = 512


class Record(NamedTuple):
    """One sampled exchange waiting to be written, with the settings it was sampled under.

    Small exchanges are encoded when they are buffered (``line``): on the request
    path their bytes are still in the CPU's caches, and encoding them there cost
    half of what the same work did thousands of records later, cold. Larger ones
    keep the exchange as is (its bodies are shared, not copied) and are encoded
    when their batch is written. A tuple: one is built on the request path of
    every captured invocation.
    """

    #: The encoded line (``capture_line``), or None: encode ``exchange`` later.
    line: bytes | None
    exchange: Exchange | None
    route: CaptureRoute
    variant: str
    #: The exchange's wall time (its object's hour).
    wall_time: float
    #: Monotonic time it was buffered (age-based flushes).
    at: float
    #: Memory it holds: the line, or the captured bodies and the request's forwarded
    #: headers, plus ``RECORD_OVERHEAD_BYTES``.
    size: int

    @classmethod
    def of(cls, exchange: Exchange, route: CaptureRoute, at: float,
           heads: Heads | None = None) -> Record:
        """``exchange``'s record: encoded now when its captured bodies are at most
        ``INLINE_ENCODE_BYTES`` (``heads``: ``capture_line``'s cache)."""
        size = 0
        if route.capture_input:
            size += len(exchange.request_body)
        if route.capture_output:
            size += len(exchange.response_body)
        if size <= INLINE_ENCODE_BYTES:
            line = capture_line(exchange, route, heads)
            return cls(line, None, route, exchange.variant, exchange.wall_time, at,
                       len(line) + RECORD_OVERHEAD_BYTES)
        for _, value in exchange.forwarded:
            size += len(value)
        return cls(None, exchange, route, exchange.variant, exchange.wall_time, at,
                   size + RECORD_OVERHEAD_BYTES)


_SIZE = operator.attrgetter("size")


@dataclass(frozen=True, slots=True)
class Batch:
    """Records taken from the buffer for one upload attempt."""

    records: tuple[Record, ...]
    #: Memory its records hold, summed once (``CaptureBuffer.take`` knows it):
    #: ``CaptureBuffer.bytes`` reads it on every append, and a batch holds thousands.
    size: int


#: An object's key: (destination, variant, the hour's number since the epoch).
ObjectKey = tuple[str, str, int]
#: Objects being encoded: key -> (their lines, their records).
Objects = dict[ObjectKey, tuple[list[bytes], list[Record]]]
#: ``capture_line``'s cache of each side's leading bytes.
Heads = dict[tuple[int, str | None, str], tuple[bytes, str | None]]


def encode_into(objects: Objects, records: Sequence[Record], heads: Heads) -> None:
    """Encode ``records`` into their objects: one per (destination, variant, hour).

    Called on consecutive slices of a batch (the caller lets requests run between
    them). Grouped by the hour's number (Unix time has no leap seconds, UTC no DST:
    one number per ``yyyy/mm/dd/hh``), formatted once per object by ``object_folder``.
    """
    for r in records:
        key = (r.route.destination, r.variant, int(r.wall_time) // 3600)
        found = objects.get(key)
        if found is None:
            found = objects[key] = ([], [])
        line = r.line
        if line is None:
            assert r.exchange is not None
            line = capture_line(r.exchange, r.route, heads)
        found[0].append(line)
        found[1].append(r)


def object_folder(hour: int) -> str:
    """``hour_folder`` of an ``ObjectKey``'s hour number."""
    return hour_folder(hour * 3600)


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
    #: ``in_flight.size`` (0 when none), kept for ``append``'s one comparison.
    in_flight_bytes: int = 0

    @property
    def bytes(self) -> int:
        """Memory held: waiting records plus the batch being uploaded."""
        return self.waiting_bytes + self.in_flight_bytes

    def append(self, record: Record) -> list[str]:
        """Buffer ``record``; returns the variants of the records dropped for it."""
        size = record.size
        if size > self.max_bytes:
            return [record.variant]
        self.waiting.append(record)
        self.waiting_bytes += size
        if self.waiting_bytes + self.in_flight_bytes <= self.max_bytes:
            return []
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
        # In C loops (a batch is thousands of records, taken on the event loop): the
        # longest prefix within ``batch_bytes``, at least one record.
        waiting = self.waiting
        if self.waiting_bytes <= batch_bytes:
            taken, size = tuple(waiting), self.waiting_bytes
            waiting.clear()
        else:
            sums = list(itertools.accumulate(map(_SIZE, waiting)))
            n = max(1, bisect.bisect_right(sums, batch_bytes))
            taken, size = tuple(itertools.islice(waiting, n)), sums[n - 1]
            self.waiting = deque(itertools.islice(waiting, n, None))
        self.waiting_bytes -= size
        self.in_flight = Batch(taken, size)
        self.in_flight_bytes = size
        return self.in_flight

    def done(self) -> None:
        """The batch in flight was written."""
        self.in_flight = None
        self.in_flight_bytes = 0

    def give_back(self, unwritten: tuple[Record, ...]) -> list[str]:
        """The batch in flight failed, in part: ``unwritten`` (its records not written)
        wait again, ahead of newer ones, and the oldest of all are dropped if the bound
        is now exceeded."""
        self.in_flight = None
        self.in_flight_bytes = 0
        self.waiting.extendleft(reversed(unwritten))
        self.waiting_bytes += sum(map(_SIZE, unwritten))
        return self._trim()
