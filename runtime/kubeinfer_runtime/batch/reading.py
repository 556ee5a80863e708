"""The batches of a shard's parts: bytes streamed, records cut and filtered, batched.

Bytes come from the object store a chunk at a time from the part's first byte
(gzip objects inflated on the way); small whole S3 objects are fetched a few dozen
ahead in threads, so many small objects do not wait on one GET at a time (local
files are read faster than a thread hands them over). Records are cut
(``records``), passed through the InputFilter (a record it cannot take is set
aside through ``on_bad``, and counted), and batched (``batching``): Line
MultiRecord without an InputFilter takes the fast path that never makes an object
per record.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from kubeinfer_runtime.batch.batching import Batch, line_batches, record_batches, whole_object
from kubeinfer_runtime.batch.errors import BadRecord
from kubeinfer_runtime.batch.filters import DataProcessor
from kubeinfer_runtime.batch.records import (
    Block,
    LineReader,
    Record,
    RecordIOReader,
    TFRecordReader,
    Where,
    gunzip,
    lines_of,
)
from kubeinfer_runtime.batch.store import Store
from kubeinfer_runtime.contract.batch import (
    BatchSettings,
    BatchStrategy,
    CompressionType,
    ObjectRef,
    ShardPart,
    ShardPlan,
    SplitType,
)

#: Whole objects up to this size are read ahead, in threads.
PREFETCH_MAX_BYTES = 1 << 20
PREFETCH_AHEAD = 32
#: The largest request when MaxPayloadInMB is 0 (no bound is not an option).
UNBOUNDED_CAP = 1 << 30

#: Told of a record the InputFilter refused: (part, where, record, error).
OnBad = Callable[[ShardPart, Where, Record, str], None]


def whole(part: ShardPart, obj: ObjectRef) -> bool:
    """Whether a part is its whole object (else a byte range of a split one)."""
    return part.start == 0 and part.end >= obj.size


class PartReader:
    """Batches of the parts of one shard, in order."""

    def __init__(self, settings: BatchSettings, plan: ShardPlan, store: Store,
                 processor: DataProcessor | None, io_pool: ThreadPoolExecutor,
                 parts: Sequence[ShardPart], on_bad: OnBad) -> None:
        self.settings = settings
        self.plan = plan
        self.store = store
        self.processor = processor
        self.io_pool = io_pool
        self.parts = parts
        self.on_bad = on_bad
        #: The largest request and record: MaxPayloadInMB, or the cap when it is 0 (a
        #: part read whole into one request has no other bound: a gzip bomb's would be
        #: all of it).
        self.bound = settings.effective_max_payload_bytes or UNBOUNDED_CAP
        self.single = settings.effective_batch_strategy is BatchStrategy.SINGLE_RECORD
        self.lines = settings.split_type is SplitType.LINE
        #: Records read from the part being cut (for ``ShardReport.part_records``).
        self.count = 0
        self._prefetched: dict[int, Future[bytes]] = {}
        #: Parts below this index were considered for prefetching already.
        self._ahead = 0

    def batches(self, n: int, where: Where) -> Iterator[Batch]:
        """The batches of part ``n``; :attr:`count` counts its records."""
        self.count = 0
        self._prefetch(n)
        for batch in self._batches(n, where):
            self.count += batch.count
            yield batch

    def _prefetch(self, n: int) -> None:
        for i in range(max(n, self._ahead), min(n + PREFETCH_AHEAD, len(self.parts))):
            self._ahead = i + 1
            part = self.parts[i]
            obj = self.plan.objects[part.object]
            if (whole(part, obj) and obj.size <= PREFETCH_MAX_BYTES
                    and not obj.uri.startswith("file:")):
                self._prefetched[i] = self.io_pool.submit(self._read_all, obj.uri)

    def _read_all(self, uri: str) -> bytes:
        gen = self.store.chunks(uri)
        try:
            return b"".join(gen)
        finally:
            gen.close()

    def _chunks(self, n: int, obj: ObjectRef, start: int) -> Iterator[bytes]:
        ahead = self._prefetched.pop(n, None)
        if ahead is not None:
            data = ahead.result()
            if data[start:]:
                yield data[start:]
            return
        gen = self.store.chunks(obj.uri, start)
        try:
            yield from gen
        finally:
            gen.close()

    def _batches(self, n: int, where: Where) -> Iterator[Batch]:
        s = self.settings
        part = self.parts[n]
        obj = self.plan.objects[part.object]
        gzip = s.compression is CompressionType.GZIP
        end = None if part.end >= obj.size or gzip else part.end

        def stream(start: int) -> Iterator[bytes]:
            raw = self._chunks(n, obj, 0 if gzip else start)
            return gunzip(raw, obj.key) if gzip else raw

        if s.split_type is SplitType.NONE:
            data = bytearray()
            chunks = stream(0)
            try:
                for chunk in chunks:
                    data += chunk
                    if len(data) > self.bound:
                        break  # over: whole_object says so, without reading the rest
            finally:
                _close(chunks)
            yield from whole_object(bytes(data), self.bound, obj.key)
            return
        if s.split_type is SplitType.LINE:
            reader = LineReader(where, part.start, end, self.bound)
            blocks = _line_blocks(reader, stream(reader.read_from))
            if not self.single and (self.processor is None or not self.processor.filters_input):
                yield from line_batches(blocks, self.bound, where)
                return
            records: Iterable[Record] = (r for b in blocks for r in lines_of(b))
        else:
            framed = (RecordIOReader if s.split_type is SplitType.RECORDIO
                      else TFRecordReader)(where, part.start, end, self.bound)
            records = _framed_records(framed, stream(framed.read_from))
        yield from record_batches(self._sent(records, part, where), self.bound,
                                  single=self.single, where=where)

    def _sent(self, records: Iterable[Record], part: ShardPart,
              where: Where) -> Iterator[tuple[Record, bytes]]:
        processor = self.processor
        for record in records:
            if processor is not None and processor.filters_input:
                try:
                    sent = processor.sent(record.data, line=self.lines)
                except BadRecord as e:
                    self.count += 1
                    self.on_bad(part, where, record, e.message)
                    continue
            else:
                sent = record.payload if self.single else record.data
            yield record, sent


def _close(chunks: Iterator[bytes]) -> None:
    close = getattr(chunks, "close", None)
    if close is not None:
        close()


def _line_blocks(reader: LineReader, chunks: Iterator[bytes]) -> Iterator[Block]:
    try:
        for chunk in chunks:
            block = reader.feed(chunk)
            if block is not None:
                yield block
            if reader.done:
                return
        block = reader.finish()
        if block is not None:
            yield block
    finally:
        _close(chunks)


def _framed_records(reader: RecordIOReader | TFRecordReader,
                    chunks: Iterator[bytes]) -> Iterator[Record]:
    try:
        for chunk in chunks:
            yield from reader.feed(chunk)
            if reader.done:
                return
        yield from reader.finish()
    finally:
        _close(chunks)
