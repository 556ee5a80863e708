"""Records into request bodies (BatchStrategy, MaxPayloadInMB): PURE.

SageMaker's rules, as pinned by the golden tests:

* MultiRecord: as many whole records per request as fit in MaxPayloadInMB, in
  input order, records of one object per batch (small objects' batches may then
  share a request: ``coalesce``). Line records
  are sent as lines (``\\n``-terminated); RecordIO and TFRecord records with their
  framing (SageMaker: "padding is not removed" for MultiRecord).
* SingleRecord: one record per request, without framing or padding.
* MaxPayloadInMB 0: the whole part in one MultiRecord request, up to a cap
  (``reading.UNBOUNDED_CAP``): no request is unbounded.
* A single record over the bound is a failure naming it (object, record, offset).

The fast path (:func:`line_batches`: Line split, MultiRecord, no InputFilter) never
makes a Python object per record: bodies are slices of the bytes as read, cut at
the last ``\\n`` before the bound, and records are counted with ``bytes.count``.
Records are recovered one by one (:func:`records_of`) only when a request fails
and its records must be tried apart.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from kubeinfer_runtime.batch.errors import RecordTooLarge, cap
from kubeinfer_runtime.batch.records import Block, Record, Where, count_records, lines_of


@dataclass(slots=True)
class Batch:
    """One request's worth of records of one part."""

    body: bytes
    #: Records in it.
    count: int
    #: Number (within the part) and byte offset of its first record.
    first: int
    offset: int
    #: The records, when they were cut one by one (None: ``body`` is a run of whole
    #: lines as read, and :func:`records_of` recovers them).
    records: list[Record] | None = None
    #: What was sent for each record (after InputFilter, without framing for
    #: SingleRecord), parallel to ``records``.
    sent: list[bytes] | None = None


def line_batches(blocks: Iterable[Block], limit: int, where: Where) -> Iterator[Batch]:
    """MultiRecord bodies straight from blocks of lines: cut at the last ``\\n`` that
    keeps a body within ``limit`` bytes (0: one body for everything)."""
    buf = bytearray()
    offset = first = -1
    #: Records in ``buf`` (blocks come counted: only bodies cut out of them are recounted).
    pending = 0
    for block in blocks:
        if not buf:
            offset, first = block.offset, block.first
        buf += block.data
        pending += block.records
        while limit and len(buf) > limit:
            cut = buf.rfind(b"\n", 0, limit) + 1
            if cut == 0:
                raise RecordTooLarge(
                    f"{cap(where.record(first, offset))} is over {limit} bytes, the "
                    "largest request maxPayloadInMB allows: raise maxPayloadInMB, or split "
                    "the record")
            body = bytes(buf[:cut])
            del buf[:cut]
            n = count_records(body)
            pending -= n
            if n:
                yield Batch(body, n, first, offset)
            offset += cut
            first += n
    if buf and pending:
        yield Batch(bytes(buf), pending, first, offset)


def record_batches(pairs: Iterable[tuple[Record, bytes]], limit: int, *,
                   single: bool, where: Where) -> Iterator[Batch]:
    """Bodies of records cut one by one: ``(record, what a request carries for it)``."""
    group: list[Record] = []
    parts: list[bytes] = []
    size = 0
    for record, piece in pairs:
        if limit and len(piece) > limit:
            raise RecordTooLarge(
                f"{cap(where.record(record.number, record.offset))} is {len(piece)} "
                f"bytes, over the {limit} bytes maxPayloadInMB allows a request: raise "
                "maxPayloadInMB, or split the record")
        if single:
            yield Batch(piece, 1, record.number, record.offset, [record], [piece])
            continue
        if group and limit and size + len(piece) > limit:
            yield make_batch(group, parts)
            group, parts, size = [], [], 0
        group.append(record)
        parts.append(piece)
        size += len(piece)
    if group:
        yield make_batch(group, parts)


def make_batch(records: Sequence[Record], sent: Sequence[bytes]) -> Batch:
    """A batch of these records (a part of a failed batch, when trying records apart)."""
    return Batch(b"".join(sent), len(records), records[0].number, records[0].offset,
                 list(records), list(sent))


def records_of(batch: Batch) -> tuple[list[Record], list[bytes]]:
    """(records, what was sent for each) of a batch."""
    if batch.records is not None and batch.sent is not None:
        return batch.records, batch.sent
    records = list(lines_of(Block(batch.body, batch.offset, batch.first, batch.count)))
    return records, [r.data for r in records]


def whole_object(data: bytes, limit: int, key: str) -> Iterator[Batch]:
    """SplitType None: the object is one request (an empty object, none)."""
    if limit and len(data) > limit:
        raise RecordTooLarge(
            f'Object "{key}" is {len(data)} bytes, over the {limit} bytes maxPayloadInMB '
            "allows a request, and splitType None sends whole objects: set splitType Line "
            "(or RecordIO, TFRecord), or raise maxPayloadInMB")
    if data:
        record = Record(1, 0, data, data)
        yield Batch(data, 1, 1, 0, [record], [data])
