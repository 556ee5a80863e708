"""Batch Transform's memory bounds, measured: what a worker holds must not grow with
its input (a gzip object's inflated size, a part read whole, its bad records).

Jobs run in-process on file:// folders, as the golden tests' do; the model is a
handler step that answers a line per record at no cost, so what is measured is the
worker's own memory (``tracemalloc``: numpy's buffers are traced too).
"""

from __future__ import annotations

import gzip
import threading
import tracemalloc
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from kubeinfer_runtime.batch import reading
from kubeinfer_runtime.batch.finalize import run_finalize
from kubeinfer_runtime.batch.invoke import ExecutionParameters
from kubeinfer_runtime.batch.plan import input_root, make_plan, output_folder
from kubeinfer_runtime.batch.reading import PartReader
from kubeinfer_runtime.batch.records import Where
from kubeinfer_runtime.batch.store import Store
from kubeinfer_runtime.batch.worker import Progress, run_work
from kubeinfer_runtime.contract.batch import BatchSettings, SplitType

CSV = "text/csv"
MB = 1 << 20
MODEL = {"steps": [{"name": "m", "handler": "tests.support.batch_handlers:line_per_record"}]}


def _settings(tmp: Path, files: dict[str, bytes], **env: Any) -> tuple[BatchSettings, Store]:
    for key, data in files.items():
        (tmp / "in" / key).parent.mkdir(parents=True, exist_ok=True)
        (tmp / "in" / key).write_bytes(data)
    job: dict[str, Any] = dict(split_type="Line", input_content_type=CSV, accept=CSV,
                               assemble_with="Line")
    settings = BatchSettings(pipeline=MODEL, input_uri=f"file://{tmp}/in/",
                             output_uri=f"file://{tmp}/out/", **{**job, **env})
    return settings, Store(settings.s3(), file_roots=[input_root(settings),
                                                      output_folder(settings)])


def _peak(fn: Callable[[], Any]) -> int:
    """Bytes ``fn`` allocated at most at once, beyond what was held before."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        fn()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def _bomb(inflated: int) -> bytes:
    """A small gzip object of 1000-byte CSV lines, ``inflated`` bytes once inflated."""
    line = b"1" * 999 + b"\n"
    return gzip.compress(line * (inflated // len(line)), compresslevel=9)


def test_a_part_read_whole_is_cut_at_the_cap(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # maxPayloadInMB 0 sends a part whole: a gzip bomb's part must still not make one
    # request of all of it (here a 4 MiB cap and 20 MB inflated).
    monkeypatch.setattr(reading, "UNBOUNDED_CAP", 4 * MB)
    settings, store = _settings(tmp_path, {"bomb.csv.gz": _bomb(20_000_000)},
                                compression="Gzip", max_batch_payload_bytes=0)
    plan = make_plan(settings, store)
    parts = plan.shards[0].parts
    with ThreadPoolExecutor(1) as io_pool:
        reader = PartReader(settings, plan, store, None, io_pool, parts,
                            lambda *_: None)
        sizes = [len(b.body) for b in reader.batches(0, Where("bomb.csv.gz"))]
    assert sum(sizes) == 20_000_000 and max(sizes) <= 4 * MB


def test_an_image_may_not_choose_an_unbounded_payload_for_split_records() -> None:
    zero = ExecutionParameters(max_payload_mb=0)
    lines = BatchSettings(model_url="http://127.0.0.1:1", input_uri="file:///i/",
                          output_uri="file:///o/", split_type="Line")
    assert zero.apply(lines).max_batch_payload_bytes is None  # the default applies
    whole = lines.model_copy(update={"split_type": SplitType.NONE})
    assert zero.apply(whole).max_batch_payload_bytes == 0
    assert ExecutionParameters(max_payload_mb=2).apply(lines).max_batch_payload_bytes == 2 * MB
    assert ExecutionParameters.parse({"MaxPayloadInMB": 0}).max_payload_mb == 0


def test_a_small_gzip_object_is_not_inflated_whole_to_be_coalesced(tmp_path: Path) -> None:
    # A 30 KB object inflating to 32 MB is "small" by its stored size: the worker reads
    # at most two of its batches to tell whether it can share a request.
    settings, store = _settings(tmp_path, {"bomb.csv.gz": _bomb(32 * MB)},
                                compression="Gzip", max_batch_payload_bytes=MB)
    make_plan(settings, store)
    peak = _peak(lambda: run_work(settings, store, Progress(None), threading.Event()))
    assert peak < 20 * MB, f"{peak / MB:.1f} MiB"  # 40 MiB when inflated whole
    summary = run_finalize(settings, store)
    assert summary.records == 32 * MB // 1000
    assert (tmp_path / "out" / "bomb.csv.gz.out").read_bytes() == b"1\n" * summary.records


def test_bad_records_are_not_held_in_memory(tmp_path: Path) -> None:
    # 30,000 records the InputFilter refuses (not JSON), all tolerated: held as
    # objects until the shard ended, then joined into one body, they took 26 MiB.
    n = 30_000
    settings, store = _settings(tmp_path, {"bad.jsonl": b"x\n" * n},
                                input_content_type="application/jsonlines",
                                input_filter="$.a", max_failed_records=n)
    make_plan(settings, store)
    peak = _peak(lambda: run_work(settings, store, Progress(None), threading.Event()))
    assert peak < 5 * MB, f"{peak / MB:.1f} MiB"
    summary = run_finalize(settings, store)
    assert summary.failed_records == n and not summary.failed
    errors = (tmp_path / "out" / "_errors.jsonl").read_bytes().splitlines()
    assert len(errors) == n and b'"record":1,' in errors[0]
