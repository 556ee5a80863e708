"""The ``finalize`` step: once every shard is done, finish the job's output.

1. Every shard must have its done marker; otherwise the step fails (exit 1) naming
   the shards still missing, and changes nothing.
2. Objects split over several shards get their ``<key>.out``: the part outputs
   concatenated in byte order (``store.concat``), then the parts deleted.
3. The shards' bad records are merged into ``<output>/_errors.jsonl``, one JSON
   line each (input URI, key, record number within the object, byte offset,
   error), in plan order. Records of later parts of a split object are numbered
   within the whole object, from the parts' record counts in the done markers.
4. ``_kubeinfer/summary.json`` (a ``JobSummary``) is written last; a second run
   finds it and reports it again, so finalize is safe to retry.

The job fails (``EXIT_BAD_INPUT``) when more records failed than
``errorPolicy.maxFailedRecords`` tolerates.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson

from kubeinfer_runtime.batch.errors import BadInput, StoreFailed, short
from kubeinfer_runtime.batch.plan import done_uri, errors_uri, output_folder, read_plan, state_uri
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
MAX_ERRORS_BYTES = 256 << 20


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
    failed = _merge_errors(settings, store, plan, reports)
    summary = _summary(settings, plan, reports, failed)
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
        key = plan.objects[index].key + OUTPUT_SUFFIX
        sources = [f"{folder}{STATE_FOLDER}/{PARTS_FOLDER}/{key}/{p.start:020d}" for p in parts]
        present = [store.size(s) is not None for s in sources]
        if not any(present) and store.size(folder + key) is not None:
            continue  # assembled by an earlier finalize that stopped before its summary
        if not all(present):
            raise StoreFailed(f"Output parts of {key} are missing although their shards are "
                              f"done: delete {state_uri(settings)}/done/ and re-run the job")
        store.concat(folder + key, sources)
        for source in sources:
            store.delete(source)
    store.prune(f"{folder}{STATE_FOLDER}/{PARTS_FOLDER}/")
    swept = store.sweep_temporary(folder)
    if swept:
        log.info("Removed %d temporary file(s) left by stopped workers", swept)


def _merge_errors(settings: BatchSettings, store: Store, plan: ShardPlan,
                  reports: list[ShardReport]) -> list[dict[str, Any]]:
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
    lines: list[dict[str, Any]] = []
    for report in sorted(reports, key=lambda r: r.shard):
        if not report.failed_records:
            continue
        data = store.read(errors_uri(settings, report.shard), MAX_ERRORS_BYTES) or b""
        for raw in data.splitlines():
            e = orjson.loads(raw)
            obj = plan.objects[e["object"]]
            record = e["record"] + before.get((e["object"], e["part_start"]), 0)
            lines.append({"uri": obj.uri, "key": obj.key, "record": record,
                          "offset": e["offset"], "error": e["error"]})
    lines.sort(key=lambda x: (x["key"], x["offset"]))
    uri = output_folder(settings) + ERRORS_NAME
    if lines:
        store.write_bytes(uri, b"".join(orjson.dumps(x) + b"\n" for x in lines),
                          "application/x-ndjson")
    else:
        store.delete(uri)
    return lines


def _summary(settings: BatchSettings, plan: ShardPlan, reports: list[ShardReport],
             failed: list[dict[str, Any]]) -> JobSummary:
    n_failed = sum(r.failed_records for r in reports)
    summary: dict[str, Any] = {
        "objects": len(plan.objects), "shards": len(plan.shards),
        "records": sum(r.records for r in reports), "failed_records": n_failed,
        "bytes_in": sum(r.bytes_in for r in reports),
        "bytes_out": sum(r.bytes_out for r in reports)}
    allowed = settings.max_failed_records
    if n_failed > allowed:
        first = failed[0] if failed else None
        where = (f' (the first: object "{first["key"]}" record {first["record"]}, byte offset '
                 f'{first["offset"]}: {first["error"]})') if first else ""
        summary.update(failed=True, reason="TooManyFailedRecords", message=short(
            f"{n_failed} records failed, more than errorPolicy.maxFailedRecords ({allowed}) "
            f"allows{where}: see {output_folder(settings)}{ERRORS_NAME}, fix the input or raise "
            "errorPolicy.maxFailedRecords", 1500))
    return JobSummary(**summary)
