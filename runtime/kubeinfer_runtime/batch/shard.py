"""One shard: its parts' records through the model into their outputs.

For each part, in order: its batches (``reading``), with
``max_concurrent_transforms`` requests in flight across parts and objects (small
requests to a fast in-process model are made on this thread: handing them to a
thread costs more than the model). Small whole objects' batches share requests
when ``coalesce`` allows, and each gets back its own lines of the answer. Answers
are taken in input order and written (``assemble``, ``filters``) to one spooled
temporary file per part, uploaded atomically when the part's last answer is in:
``<output>/<key>.out`` for a whole object, ``_kubeinfer/parts/<key>.out/<start>``
for a byte range of a split object (the finalizer joins those). Memory stays
bounded: the requests in flight, the prefetched small objects, two batches of
a small object (whether it shares a request: a small gzip object may inflate to
any size), and 16 MiB of each output before it spills to disk.

Bad records: a request answered with a 4xx (the model refused the input, or
failed on it) is tried again in halves until the bad records stand alone; each is
set aside with its object key, record number, byte offset and the error — never
its bytes — and counted against ``errorPolicy.maxFailedRecords``. Good records
still get their outputs; a bad record gets none (SageMaker would fail the job:
with a tolerance, its output line is missing, and ``_errors.jsonl`` says which).
Once more records failed in this worker than are tolerated, the shard stops
with :class:`~kubeinfer_runtime.batch.errors.TooManyFailures` naming the record.
The set-aside records are written out as they fail (:class:`FailureLog`): a
tolerance of millions must not hold millions of objects.
"""

from __future__ import annotations

import itertools
import logging
import math
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import orjson

from kubeinfer_runtime.batch.assemble import line_terminated, split_outputs
from kubeinfer_runtime.batch.batching import (
    Batch,
    make_batch,
    records_of,
)
from kubeinfer_runtime.batch.coalesce import (
    MAX_MEMBERS,
    SMALL_OBJECT_BYTES,
    can_coalesce,
    cut_answer,
    group_bytes,
    joined,
)
from kubeinfer_runtime.batch.errors import BadRecord, Stopped, TooManyFailures, cap, short
from kubeinfer_runtime.batch.filters import DataProcessor
from kubeinfer_runtime.batch.invoke import Answer, Model, is_bad_request
from kubeinfer_runtime.batch.plan import output_uri, part_uri
from kubeinfer_runtime.batch.reading import PartReader, whole
from kubeinfer_runtime.batch.records import (
    Record,
    Where,
)
from kubeinfer_runtime.batch.store import Store
from kubeinfer_runtime.contract.batch import (
    AssembleWith,
    BatchSettings,
    ObjectRef,
    Shard,
    ShardPart,
    ShardPlan,
    ShardReport,
    SplitType,
)
from kubeinfer_runtime.errors import RuntimeServiceError

log = logging.getLogger("kubeinfer.batch")

#: An output is held in memory up to this size, then in a temporary file.
SPOOL_BYTES = 16 << 20
#: Requests up to this size to a fast in-process model are made on the worker's
#: thread (``Model.inline``); larger ones go to the pool, overlapping with reading.
INLINE_BODY_BYTES = 64 << 10
#: file:// outputs up to this size are written on the worker's thread.
INLINE_WRITE_BYTES = 1 << 20
#: A shard's failure lines are held in memory up to this size, then in a temporary file.
FAILURES_SPOOL_BYTES = 1 << 20


def _done(fn: Callable[..., Any], *args: Any) -> Future[Any]:
    """A future already holding what ``fn(*args)`` returned or raised."""
    future: Future[Any] = Future()
    try:
        future.set_result(fn(*args))
    except Exception as e:
        future.set_exception(e)
    return future


@dataclass(frozen=True)
class Failure:
    """One bad record: where it is and why, never its bytes."""

    shard: int
    object: int
    key: str
    part_start: int
    record: int
    offset: int
    error: str

    def line(self) -> dict[str, Any]:
        return {"shard": self.shard, "object": self.object, "key": self.key,
                "part_start": self.part_start, "record": self.record, "offset": self.offset,
                "error": self.error}


class FailureLog:
    """A shard's failures as the lines of its errors file, spooled to a temporary file
    as they come (a million held as objects took 418 MiB); uploaded by the worker."""

    def __init__(self) -> None:
        # Closed by close(), once the worker uploaded it.
        self.file = tempfile.SpooledTemporaryFile(max_size=FAILURES_SPOOL_BYTES)  # noqa: SIM115
        self.count = 0
        self.size = 0

    def __len__(self) -> int:
        return self.count

    def add(self, failure: Failure) -> None:
        line = orjson.dumps(failure.line()) + b"\n"
        self.file.write(line)
        self.count += 1
        self.size += len(line)

    def upload(self, store: Store, uri: str) -> None:
        self.file.seek(0)
        store.write(uri, self.file, self.size, "application/x-ndjson")  # type: ignore[arg-type]

    def close(self) -> None:
        self.file.close()


@dataclass
class Tally:
    """Counters of this worker's run, read by the progress writer."""

    records: int = 0
    failed: int = 0
    bytes_in: int = 0
    bytes_out: int = 0


@dataclass
class Job:
    """What every shard of a worker needs."""

    settings: BatchSettings
    plan: ShardPlan
    store: Store
    model: Model
    processor: DataProcessor | None
    output_folder: str
    pool: ThreadPoolExecutor
    io_pool: ThreadPoolExecutor
    stop: threading.Event
    tally: Tally = field(default_factory=Tally)
    on_progress: Callable[[], None] = lambda: None


class _Sink:
    """One output being written: pieces in memory, then (past ``SPOOL_BYTES``) a
    temporary file; uploaded whole. Most outputs of small objects are one piece, written
    as it is (no file object at all)."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.pieces: list[bytes] = []
        self.file: tempfile.SpooledTemporaryFile[bytes] | None = None
        self.size = 0

    def write(self, data: bytes) -> None:
        if not data:
            return
        self.size += len(data)
        if self.file is None:
            self.pieces.append(data)
            if self.size <= SPOOL_BYTES:
                return
            self.file = tempfile.SpooledTemporaryFile(max_size=0)  # noqa: SIM115 - closed on commit
            for piece in self.pieces:
                self.file.write(piece)
            self.pieces = []
        else:
            self.file.write(data)

    def commit(self, store: Store, content_type: str) -> int:
        if self.file is None:
            store.write_bytes(self.uri, b"".join(self.pieces), content_type)
            self.pieces = []
            return self.size
        try:
            self.file.seek(0)
            store.write(self.uri, self.file, self.size, content_type)  # type: ignore[arg-type]
        finally:
            self.file.close()
        return self.size


#: What one request gave a batch: its answer, or its records the model refused.
Piece = tuple[Batch, Answer] | tuple[Record, str]


@dataclass
class _Member:
    """One object's (or part's) batch in a request."""

    batch: Batch
    sink: _Sink
    where: Where
    part: ShardPart


@dataclass
class _Call:
    """One request in flight: one batch, or the batches of several small objects
    (``coalesce``); the future holds the pieces of each member."""

    future: Future[list[list[Piece]]]
    members: list[_Member]


@dataclass
class _PartEnd:
    sink: _Sink
    part: ShardPart


class ShardRun:
    """Processes one shard; :meth:`run` returns its done marker's content."""

    def __init__(self, job: Job, shard: Shard) -> None:
        self.job = job
        self.shard = shard
        s = job.settings
        self.lines = s.split_type is SplitType.LINE
        self.failures = FailureLog()
        self.report = {"records": 0, "failed": 0, "bytes_in": 0, "bytes_out": 0}
        self.part_records: dict[str, int] = {}
        self.content_type = s.accept or "application/octet-stream"
        self.reader = PartReader(job.settings, job.plan, job.store, job.processor, job.io_pool,
                                 shard.parts, self._fail)
        #: Whether small objects share requests (``coalesce``); turned off for the rest of
        #: the shard when the model's answer turns out not to be a line per record.
        self.coalesce = can_coalesce(s)
        self.group_limit = group_bytes(s)
        self._inflight: deque[_Call | _PartEnd] = deque()
        self._commits: list[Future[int]] = []
        self._t0 = time.monotonic()

    # -- the pipeline ----------------------------------------------------------------

    def run(self) -> ShardReport:
        self.start()
        return self.finish()

    def start(self) -> None:
        """Read the shard and send its requests, leaving up to ``maxConcurrentTransforms``
        of them in flight: the worker reads the next shard while they finish."""
        self._t0 = time.monotonic()
        job = self.job
        self._inflight.clear()
        self._commits.clear()
        group: list[_Member] = []
        ends: list[_PartEnd] = []
        size = 0
        for n, part in enumerate(self.shard.parts):
            obj = job.plan.objects[part.object]
            sink = _Sink(self._output_uri(obj, part))
            where = Where(obj.key, part.start)
            batches: Iterator[Batch] = self.reader.batches(n, where)
            if self.coalesce and whole(part, obj) and obj.size <= SMALL_OBJECT_BYTES:
                # At most two batches are read to tell: a small gzip object may inflate
                # to any size, and the rest is read as it is sent.
                head = list(itertools.islice(batches, 2))
                if len(head) <= 1:
                    body = len(head[0].body) if head else 0
                    if group and (size + body > self.group_limit or len(group) >= MAX_MEMBERS):
                        self._flush(group, ends)
                        group, ends, size = [], [], 0
                    group += [_Member(b, sink, where, part) for b in head]
                    ends.append(_PartEnd(sink, part))
                    size += body
                    continue
                batches = itertools.chain(head, batches)
            if group:
                self._flush(group, ends)
                group, ends, size = [], [], 0
            for batch in batches:
                self._submit([_Member(batch, sink, where, part)])
            if not whole(part, obj):
                self.part_records[f"{part.object}:{part.start}"] = self.reader.count
            self._inflight.append(_PartEnd(sink, part))
            self._settle_ready()
        if group:
            self._flush(group, ends)

    def finish(self) -> ShardReport:
        """Wait for the shard's requests, write its outputs; its done marker's content."""
        job = self.job
        while self._inflight:
            self._settle(self._inflight.popleft(), self._commits)
        for commit in self._commits:
            size = commit.result()
            self.report["bytes_out"] += size
            job.tally.bytes_out += size
        return ShardReport(shard=self.shard.index, records=self.report["records"],
                           failed_records=self.report["failed"],
                           bytes_in=self.report["bytes_in"], bytes_out=self.report["bytes_out"],
                           seconds=round(time.monotonic() - self._t0, 3),
                           part_records=self.part_records)

    def _flush(self, group: list[_Member], ends: list[_PartEnd]) -> None:
        """Send a group of small objects' batches (one request), then their ends."""
        if group:
            self._submit(group)
        self._inflight.extend(ends)
        self._settle_ready()

    def _submit(self, members: list[_Member]) -> None:
        job = self.job
        if job.stop.is_set():
            raise Stopped("Stopped by SIGTERM: the shard in progress is left without "
                          "a done marker and is processed again by the next run")
        width = job.settings.effective_max_concurrent_transforms
        while sum(isinstance(c, _Call) for c in self._inflight) >= width:
            self._settle(self._inflight.popleft(), self._commits)
        budget = job.settings.max_failed_records - job.tally.failed
        body = sum(len(m.batch.body) for m in members)
        if job.model.inline and body <= INLINE_BODY_BYTES:
            future = _done(self._call_members, members, budget)
        else:
            future = job.pool.submit(self._call_members, members, budget)
        self._inflight.append(_Call(future, members))

    def _settle_ready(self) -> None:
        while self._inflight and isinstance(self._inflight[0], _PartEnd):
            self._settle(self._inflight.popleft(), self._commits)

    def _settle(self, item: _Call | _PartEnd, commits: list[Future[int]]) -> None:
        """Write what one request answered (in order), or upload a finished part."""
        job = self.job
        if isinstance(item, _PartEnd):
            sink = item.sink
            if sink.uri.startswith("file:") and sink.size <= INLINE_WRITE_BYTES:
                commits.append(_done(sink.commit, job.store, self.content_type))
            else:
                commits.append(job.io_pool.submit(sink.commit, job.store, self.content_type))
            size = item.part.end - item.part.start
            self.report["bytes_in"] += size
            job.tally.bytes_in += size
            job.on_progress()
            return
        results = item.future.result(timeout=self._timeout(item.members))
        for member, pieces in zip(item.members, results, strict=False):
            for first, second in pieces:
                if isinstance(first, Record):
                    assert isinstance(second, str)
                    self._fail(member.part, member.where, first, second)
                    continue
                assert isinstance(second, Answer)
                self._write(member.sink, first, second, member.where, member.part)
        job.on_progress()

    def _timeout(self, members: list[_Member]) -> float:
        # A batch tried apart makes up to 2 log2(n) more calls, each within the timeout;
        # a shared request that fails is made again object by object.
        count = sum(m.batch.count for m in members)
        calls = len(members) + 1 + 2 * math.ceil(math.log2(count + 1))
        return self.job.settings.invocation_timeout_s * (self.job.settings.invocation_retries
                                                          + 1) * calls

    def _write(self, sink: _Sink, batch: Batch, answer: Answer, where: Where,
               part: ShardPart) -> None:
        processor = self.job.processor
        if processor is not None and processor.per_record:
            what = (f"{where.record(batch.first, batch.offset)} and the "
                    f"{batch.count - 1} records after it")
            outputs = split_outputs(answer.body, answer.content_type, batch.count, what)
            records, _ = records_of(batch)
            for record, output in zip(records, outputs, strict=True):
                try:
                    sink.write(processor.output(record.data, output))
                except BadRecord as e:
                    self._fail(part, where, record, e.message)
        elif self.job.settings.assemble_with is AssembleWith.LINE:
            sink.write(line_terminated(answer.body))
        else:
            sink.write(answer.body)
        self._count(batch.count)
        self.content_type = answer.content_type or self.content_type

    def _count(self, records: int) -> None:
        self.report["records"] += records
        self.job.tally.records += records

    def _fail(self, part: ShardPart, where: Where, record: Record, error: str) -> None:
        obj = self.job.plan.objects[part.object]
        self.failures.add(Failure(self.shard.index, part.object, obj.key, part.start,
                                  record.number, record.offset, short(error, 300)))
        self.report["failed"] += 1
        self._count(1)
        tally = self.job.tally
        tally.failed += 1
        allowed = self.job.settings.max_failed_records
        if tally.failed > allowed:
            raise TooManyFailures(short(
                f"{cap(where.record(record.number, record.offset))} failed: "
                f"{error}; that is {tally.failed} bad record(s), more than "
                f"errorPolicy.maxFailedRecords ({allowed}) allows: fix the input, or raise "
                "errorPolicy.maxFailedRecords", 1500))

    # -- the model call (in the pool's threads) ---------------------------------------

    def _call_members(self, members: list[_Member], budget: int) -> list[list[Piece]]:
        """Each member's pieces: one request for all when they share it and the answer
        is a line per record, else a request per member."""
        if len(members) > 1 and self.coalesce:
            counts = [m.batch.count for m in members]
            try:
                answer = self.job.model.invoke(joined([m.batch.body for m in members]),
                                               lines=self.lines)
            except RuntimeServiceError as e:
                if not is_bad_request(e):
                    raise
                answer = None  # some record is bad: each object alone finds which
            if answer is not None:
                cut = cut_answer(answer.body, answer.content_type, counts)
                if cut is not None:
                    return [[(m.batch, Answer(piece, answer.content_type))]
                            for m, piece in zip(members, cut, strict=True)]
                self.coalesce = False
                log.warning("The model's answers are not one line per record (content type "
                            "%s): small objects are sent one request each from now on",
                            short(answer.content_type or "none", 60))
        results: list[list[Piece]] = []
        for m in members:
            pieces = self._call(m.batch, budget, m.where)
            results.append(pieces)
            budget -= sum(isinstance(p[0], Record) for p in pieces)
            if budget < 0:
                break  # over the tolerance: the worker stops on these
        return results

    def _call(self, batch: Batch, budget: int, where: Where) -> list[Piece]:
        """Answers of ``batch``; records the model refused are tried apart (at most
        ``budget + 1`` of them are isolated before giving up)."""
        try:
            return [(batch, self.job.model.invoke(batch.body, lines=self.lines))]
        except RuntimeServiceError as e:
            if not is_bad_request(e):
                raise
            error = e
        records, sent = records_of(batch)
        if len(records) == 1:
            return [(records[0], error.message)]
        mid = len(records) // 2
        left = self._call(make_batch(records[:mid], sent[:mid]), budget, where)
        spent = sum(isinstance(p[0], Record) for p in left)
        if spent > budget:
            return left  # over the tolerance already: the worker stops on these
        return left + self._call(make_batch(records[mid:], sent[mid:]), budget - spent, where)

    def _output_uri(self, obj: ObjectRef, part: ShardPart) -> str:
        if whole(part, obj):
            return output_uri(self.job.output_folder, obj.key)
        return part_uri(self.job.output_folder, obj.key, part.start)
