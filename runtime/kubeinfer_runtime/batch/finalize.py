"""The ``finalize`` step: once every shard is done, finish the job's output.

1. Every shard must have its done marker; otherwise the step fails (exit 1) naming
   the shards still missing, and changes nothing.
2. Objects split over several shards get their ``<key>.out``: the part outputs
   concatenated in byte order (``store.concat``), then the parts deleted.
3. The shards' bad records are merged into ``<output>/_errors.jsonl``, one JSON
   line each (input URI, key, record number within the object, byte offset,
   error), sorted by key and byte offset (in runs on disk, merged: however many
   there are). Records of later parts of a split object are numbered within the
   whole object, from the parts' record counts in the done markers.
4. ``_kubeinfer/summary.json`` (a ``JobSummary``) is written last; a second run
   finds it and reports it again, so finalize is safe to retry.

The job fails (``EXIT_BAD_INPUT``) when more records failed than
``errorPolicy.maxFailedRecords`` tolerates.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Any

import orjson

from kubeinfer_runtime.batch.errors import BadInput, StoreFailed, short
from kubeinfer_runtime.batch.plan import (
    done_uri,
    errors_uri,
    output_folder,
    output_uri,
    part_uri,
    read_plan,
    state_uri,
)
from kubeinfer_runtime.batch.store import Store
from kubeinfer_runtime.contract.batch import (
    ERRORS_NAME,
    OUTPUT_SUFFIX,
    PARTS_FOLDER,
    STATE_FOLDER,
    SUMMARY_NAME,
    BatchSettings,
    JobSummary,
    ShardPart,
    ShardPlan,
    ShardReport,
)

log = logging.getLogger("kubeinfer.batch")

MAX_MARKER_BYTES = 64 << 20
#: The longest line of a shard's errors file (a worker's are under 2 KiB).
MAX_ERROR_LINE_BYTES = 64 << 10
#: Error lines sorted in memory at a time; more are sorted in runs on disk, then merged.
MERGE_RUN_LINES = 50_000
#: The merged ``_errors.jsonl`` is held in memory up to this size, then in a file.
MERGE_SPOOL_BYTES = 16 << 20


class Incomplete(StoreFailed):
    """Some shards have no done marker yet (their workers have not finished)."""


def run_finalize(settings: BatchSettings, store: Store) -> JobSummary:
    plan = read_plan(settings, store)
    if plan is None:
        raise BadInput(f"No plan at {state_uri(settings, 'plan.json')}: run the job's plan "
                       "and work steps before finalize")
    summary_uri = state_uri(settings, SUMMARY_NAME)
    previous = store.read(summary_uri, MAX_MARKER_BYTES)
    if previous is not None:
        return JobSummary.model_validate_json(previous)
    with ThreadPoolExecutor(16) as pool:
        raw = list(pool.map(lambda s: store.read(done_uri(settings, s.index), MAX_MARKER_BYTES),
                            plan.shards))
    missing = [s.index for s, data in zip(plan.shards, raw, strict=True) if data is None]
    if missing:
        listed = ", ".join(str(i) for i in missing[:20]) + (" ..." if len(missing) > 20 else "")
        raise Incomplete(f"{len(missing)} of {len(plan.shards)} shards have no done marker "
                         f"(shards {listed}): run their workers to completion, then finalize")
    reports = [ShardReport.model_validate_json(data) for data in raw if data is not None]
    _assemble_split_objects(settings, store, plan)
    first_failure = _merge_errors(settings, store, plan, reports)
    summary = _summary(settings, plan, reports, first_failure)
    store.write_bytes(summary_uri, summary.model_dump_json().encode(), "application/json")
    return summary


def split_objects(plan: ShardPlan) -> dict[int, list[ShardPart]]:
    """Objects cut into several parts: object index -> its parts in byte order."""
    parts: dict[int, list[ShardPart]] = defaultdict(list)
    for shard in plan.shards:
        for part in shard.parts:
            size = plan.objects[part.object].size
            if not (part.start == 0 and part.end >= size):
                parts[part.object].append(part)
    return {o: sorted(p, key=lambda x: x.start) for o, p in parts.items()}


def _assemble_split_objects(settings: BatchSettings, store: Store, plan: ShardPlan) -> None:
    folder = output_folder(settings)
    for index, parts in split_objects(plan).items():
        key = plan.objects[index].key
        dest = output_uri(folder, key)
        sources = [part_uri(folder, key, p.start) for p in parts]
        present = [store.size(s) is not None for s in sources]
        if not any(present) and store.size(dest) is not None:
            continue  # assembled by an earlier finalize that stopped before its summary
        if not all(present):
            raise StoreFailed(f"Output parts of {key + OUTPUT_SUFFIX} are missing although "
                              f"their shards are done: delete {state_uri(settings)}/done/ and "
                              "re-run the job")
        store.concat(dest, sources)
        for source in sources:
            store.delete(source)
    store.prune(f"{folder}{STATE_FOLDER}/{PARTS_FOLDER}/")
    swept = store.sweep_temporary(folder)
    if swept:
        log.info("Removed %d temporary file(s) left by stopped workers", swept)


#: A merged error line: its key and byte offset (what it is sorted by), and the line.
_Line = tuple[str, int, bytes]


def _merge_errors(settings: BatchSettings, store: Store, plan: ShardPlan,
                  reports: list[ShardReport]) -> dict[str, Any] | None:
    """Write ``_errors.jsonl``, sorted by key and offset; its first line.

    A tolerance of millions of bad records makes errors files of hundreds of MiB:
    they are streamed, sorted ``MERGE_RUN_LINES`` at a time into temporary files,
    and those merged, so memory holds one run whatever the count.
    """
    # Records before each part of a split object (parts are numbered from 1 each).
    counts: dict[str, int] = {}
    for report in reports:
        counts.update(report.part_records)
    before: dict[tuple[int, int], int] = {}
    for index, parts in split_objects(plan).items():
        total = 0
        for part in parts:
            before[(index, part.start)] = total
            total += counts.get(f"{index}:{part.start}", 0)
    fix = f"delete {state_uri(settings)}/done/ and re-run the job"
    runs: list[IO[bytes]] = []
    run: list[_Line] = []
    with contextlib.ExitStack() as stack:
        for report in sorted(reports, key=lambda r: r.shard):
            shard_uri = errors_uri(settings, report.shard)
            if not report.failed_records or store.size(shard_uri) is None:
                continue
            for raw in _lines(store, shard_uri, fix):
                e = orjson.loads(raw)
                obj = plan.objects[e["object"]]
                record = e["record"] + before.get((e["object"], e["part_start"]), 0)
                run.append((obj.key, e["offset"], orjson.dumps(
                    {"uri": obj.uri, "key": obj.key, "record": record, "offset": e["offset"],
                     "error": e["error"]}) + b"\n"))
                if len(run) >= MERGE_RUN_LINES:
                    runs.append(stack.enter_context(_spill(run)))
                    run = []
        run.sort()
        merged = heapq.merge(*(_read_run(f) for f in runs), run) if runs else iter(run)
        out = stack.enter_context(tempfile.SpooledTemporaryFile(max_size=MERGE_SPOOL_BYTES))
        first: dict[str, Any] | None = None
        size = 0
        for _, _, line in merged:
            if first is None:
                first = orjson.loads(line)
            out.write(line)
            size += len(line)
        uri = output_folder(settings) + ERRORS_NAME
        if first is not None:
            out.seek(0)
            store.write(uri, out, size, "application/x-ndjson")  # type: ignore[arg-type]
        else:
            store.delete(uri)
    return first


def _lines(store: Store, uri: str, fix: str) -> Iterator[bytes]:
    """The lines of a shard's errors file, streamed."""
    pending = b""
    chunks = store.chunks(uri)
    try:
        for chunk in chunks:
            *lines, pending = (pending + chunk).split(b"\n")
            if len(pending) > MAX_ERROR_LINE_BYTES:
                raise BadInput(f"Errors file {uri} has a line over {MAX_ERROR_LINE_BYTES} "
                               f"bytes, which no worker writes: {fix}")
            yield from (line for line in lines if line)
    finally:
        chunks.close()
    if pending:
        yield pending


def _spill(run: list[_Line]) -> IO[bytes]:
    """A sorted run, in a temporary file (lines only: they hold their sort key)."""
    run.sort()
    f = tempfile.TemporaryFile()  # noqa: SIM115 - the caller's ExitStack closes it
    for _, _, line in run:
        f.write(line)
    f.seek(0)
    return f


def _read_run(f: IO[bytes]) -> Iterator[_Line]:
    for line in f:
        e = orjson.loads(line)
        yield e["key"], e["offset"], line


def _summary(settings: BatchSettings, plan: ShardPlan, reports: list[ShardReport],
             first: dict[str, Any] | None) -> JobSummary:
    n_failed = sum(r.failed_records for r in reports)
    summary: dict[str, Any] = {
        "objects": len(plan.objects), "shards": len(plan.shards),
        "records": sum(r.records for r in reports), "failed_records": n_failed,
        "bytes_in": sum(r.bytes_in for r in reports),
        "bytes_out": sum(r.bytes_out for r in reports)}
    allowed = settings.max_failed_records
    if n_failed > allowed:
        where = (f' (the first: object "{first["key"]}" record {first["record"]}, byte offset '
                 f'{first["offset"]}: {first["error"]})') if first else ""
        summary.update(failed=True, reason="TooManyFailedRecords", message=short(
            f"{n_failed} records failed, more than errorPolicy.maxFailedRecords ({allowed}) "
            f"allows{where}: see {output_folder(settings)}{ERRORS_NAME}, fix the input or raise "
            "errorPolicy.maxFailedRecords", 1500))
    return JobSummary(**summary)
