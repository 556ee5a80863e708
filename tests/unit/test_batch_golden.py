"""Golden tests of whole batch jobs: SageMaker's Batch Transform semantics, pinned.

Each case runs the three steps (plan, work, finalize) in-process on file:// folders
with a model whose answers anyone can check by eye (each row's sum: ``1,2`` ->
``3.0``), and compares every output object byte for byte. SplitType x
BatchStrategy x AssembleWith x JoinSource with Input/Output filters, CSV and JSON
Lines, gzip, empty objects, a final line without newline, records over
MaxPayloadInMB, bad records with and without a tolerance, objects cut into
byte ranges over several shards.
"""

from __future__ import annotations

import gzip
import json
import struct
import threading
from pathlib import Path
from typing import Any

import pytest

from kubeinfer_runtime.batch import finalize
from kubeinfer_runtime.batch import plan as plan_module
from kubeinfer_runtime.batch.errors import BadInput, RecordTooLarge, TooManyFailures
from kubeinfer_runtime.batch.finalize import run_finalize
from kubeinfer_runtime.batch.plan import input_root, make_plan, output_folder
from kubeinfer_runtime.batch.store import Store
from kubeinfer_runtime.batch.worker import Progress, run_work
from kubeinfer_runtime.contract.batch import BatchSettings, JobSummary
from tests.support.onnx_models import row_sum_model
from tests.unit.test_batch_records import recordio, tfrecord

CSV = "text/csv"
JSONL = "application/jsonlines"


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return row_sum_model(tmp_path_factory.mktemp("model") / "sum.onnx")


def run_job(tmp: Path, model: Path, files: dict[str, bytes], **env: Any
            ) -> tuple[dict[str, bytes], JobSummary, list[dict[str, Any]]]:
    """(outputs by key, the summary, the merged error lines)."""
    for key, data in files.items():
        (tmp / "in" / key).parent.mkdir(parents=True, exist_ok=True)
        (tmp / "in" / key).write_bytes(data)
    source = {} if "pipeline" in env else {"model_uri": f"file://{model}"}
    settings = BatchSettings(**source, input_uri=f"file://{tmp}/in/",
                             output_uri=f"file://{tmp}/out/", report_file=str(tmp / "report"),
                             **env)
    store = Store(settings.s3(), file_roots=[input_root(settings), output_folder(settings)])
    make_plan(settings, store)
    run_work(settings, store, Progress(None), threading.Event())
    summary = run_finalize(settings, store)
    out = tmp / "out"
    outputs = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*.out")
               if p.is_file()}
    errors_file = out / "_errors.jsonl"
    errors = ([json.loads(x) for x in errors_file.read_text().splitlines()]
              if errors_file.exists() else [])
    return outputs, summary, errors


LINES = b"1,2\n3,4\n5,6"  # the last line has no newline
SUMS = b"3.0\n7.0\n11.0\n"


@pytest.mark.parametrize(("strategy", "assemble", "payload"), [
    ("MultiRecord", "Line", None), ("MultiRecord", "None", None),
    ("SingleRecord", "Line", None), ("SingleRecord", "None", None),
    ("MultiRecord", "Line", 8),  # two records per request
    ("MultiRecord", "Line", 0),  # no bound: the whole object in one request
])
def test_csv_lines(tmp_path: Path, model: Path, strategy: str, assemble: str,
                   payload: int | None) -> None:
    outputs, summary, _ = run_job(
        tmp_path, model, {"a.csv": LINES, "sub/b.csv": b"10,20\n"}, split_type="Line",
        input_content_type=CSV, accept=CSV, batch_strategy=strategy, assemble_with=assemble,
        max_batch_payload_bytes=payload)
    assert outputs == {"a.csv.out": SUMS, "sub/b.csv.out": b"30.0\n"}
    assert (summary.records, summary.failed_records, summary.objects) == (4, 0, 2)


def test_blank_lines_empty_objects_and_gzip(tmp_path: Path, model: Path) -> None:
    files = {"blank.csv": b"\n1,2\n\n3,4\r\n\n", "empty.csv": b""}
    outputs, summary, _ = run_job(tmp_path / "1", model, files, split_type="Line",
                                  input_content_type=CSV, accept=CSV, assemble_with="Line")
    assert outputs == {"blank.csv.out": b"3.0\n7.0\n", "empty.csv.out": b""}
    assert summary.records == 2
    # Gzip: several members, streamed; offsets count decompressed bytes.
    gz = gzip.compress(b"1,2\n3,4\n") + gzip.compress(b"5,6")
    outputs, _, _ = run_job(tmp_path / "2", model, {"z.csv.gz": gz, "e.gz": b""},
                            split_type="Line", input_content_type=CSV, accept=CSV,
                            assemble_with="Line", compression="Gzip")
    assert outputs == {"z.csv.gz.out": SUMS, "e.gz.out": b""}


def test_csv_join_with_input_and_output_filters(tmp_path: Path, model: Path) -> None:
    # SageMaker's "output an ID column with results, exclude it from the input" example.
    files = {"a.csv": b'a,1,2\nb,3,4\n"c,d",5,6\n'}
    env = dict(split_type="Line", input_content_type=CSV, accept=CSV, assemble_with="Line",
               input_filter="$[1:]", join_source="Input")
    outputs, _, _ = run_job(tmp_path / "1", model, files, **env)
    assert outputs == {"a.csv.out": b'a,1,2,3.0\nb,3,4,7.0\n"c,d",5,6,11.0\n'}
    outputs, _, _ = run_job(tmp_path / "2", model, files, **env, output_filter="$[0,-1]")
    assert outputs == {"a.csv.out": b'a,3.0\nb,7.0\n"c,d",11.0\n'}
    outputs, _, _ = run_job(tmp_path / "3", model, files, **env, output_filter="$[0,3:]",
                            batch_strategy="SingleRecord")
    assert outputs == {"a.csv.out": b'a,3.0\nb,7.0\n"c,d",11.0\n'}


def test_json_lines_join_with_filters(tmp_path: Path, model: Path) -> None:
    # SageMaker's JSON example: InputFilter $.features, OutputFilter $['id','SageMakerOutput'].
    files = {"a.jsonl": b'{"id":"a","features":[1,2]}\n{"id":"b","features":[3,4]}\n'}
    env = dict(split_type="Line", input_content_type=JSONL, accept=JSONL, assemble_with="Line",
               input_filter="$.features", join_source="Input")
    outputs, _, _ = run_job(tmp_path / "1", model, files, **env,
                            output_filter="$['id','SageMakerOutput']")
    assert outputs == {"a.jsonl.out": b'{"id":"a","SageMakerOutput":[3.0]}\n'
                                      b'{"id":"b","SageMakerOutput":[7.0]}\n'}
    outputs, _, _ = run_job(tmp_path / "2", model, files, **env)
    assert outputs == {"a.jsonl.out":
                       b'{"id":"a","features":[1,2],"SageMakerOutput":[3.0]}\n'
                       b'{"id":"b","features":[3,4],"SageMakerOutput":[7.0]}\n'}


def test_json_join_of_inputs_that_are_not_objects(tmp_path: Path, model: Path) -> None:
    # Accept application/json: the model answers {"predictions": [...]} per request, cut
    # into one output per record for the join.
    outputs, _, _ = run_job(tmp_path, model, {"a.json": b"[1,2]\n[3,4]\n"}, split_type="Line",
                            input_content_type="application/json", accept="application/json",
                            assemble_with="Line", join_source="Input")
    assert outputs == {"a.json.out": b'{"SageMakerInput":[1,2],"SageMakerOutput":[3.0]}\n'
                                     b'{"SageMakerInput":[3,4],"SageMakerOutput":[7.0]}\n'}


def test_json_without_join_is_the_model_answer(tmp_path: Path, model: Path) -> None:
    outputs, _, _ = run_job(tmp_path / "1", model, {"a.json": b"[1,2]\n[3,4]\n"},
                            split_type="Line", input_content_type="application/json",
                            accept="application/json", assemble_with="Line")
    assert outputs == {"a.json.out": b'{"predictions":[[3.0],[7.0]]}\n'}
    outputs, _, _ = run_job(tmp_path / "2", model, {"a.jsonl": b"[1,2]\n[3,4]\n"},
                            split_type="Line", input_content_type=JSONL, accept=JSONL,
                            assemble_with="None", batch_strategy="SingleRecord")
    assert outputs == {"a.jsonl.out": b"[3.0]\n[7.0]\n"}


def test_json_lines_are_one_instance_each(tmp_path: Path, model: Path) -> None:
    # A line that is not one JSON value is a bad record, named; it cannot become two
    # instances, or close the request's array and add to its structure. A line of
    # spaces is a record (as for CSV) and not JSON; an empty line is no record.
    data = (b'[1,2]\n[3,4],[5,6]\n\n[7,8]\n   \n[1,2]],"extra":[[0]\n[9,10]\n')
    outputs, summary, errors = run_job(tmp_path, model, {"a.jsonl": data}, split_type="Line",
                                       input_content_type=JSONL, accept=JSONL,
                                       assemble_with="Line", max_failed_records=3)
    assert outputs == {"a.jsonl.out": b"[3.0]\n[15.0]\n[19.0]\n"}
    assert (summary.records, summary.failed_records) == (6, 3)
    assert [(e["record"], e["offset"]) for e in errors] == [
        (2, 6), (4, 25), (5, 29)]
    assert "whitespace" in errors[1]["error"] and "not one JSON value" in errors[2]["error"]
    assert all("extra" not in e["error"] and "[3,4]" not in e["error"] for e in errors)


def test_split_none_sends_whole_objects(tmp_path: Path, model: Path) -> None:
    outputs, summary, _ = run_job(
        tmp_path, model, {"a.json": b'{"instances":[[1,2],[3,4]]}', "b.json": b"[[5,6]]",
                          "empty.json": b""},
        input_content_type="application/json", accept="application/json")
    assert outputs == {"a.json.out": b'{"predictions":[[3.0],[7.0]]}',
                       "b.json.out": b'{"predictions":[[11.0]]}', "empty.json.out": b""}
    assert summary.records == 2


@pytest.mark.parametrize("framing", ["RecordIO", "TFRecord"])
def test_binary_records_single_record_sends_payloads(tmp_path: Path, model: Path,
                                                     framing: str) -> None:
    frame = recordio if framing == "RecordIO" else tfrecord
    outputs, summary, _ = run_job(tmp_path, model, {"a.rec": frame([b"1,2", b"3,4", b"5,6"])},
                                  split_type=framing, input_content_type=CSV, accept=CSV,
                                  batch_strategy="SingleRecord", assemble_with="Line")
    assert outputs == {"a.rec.out": SUMS}
    assert summary.records == 3


def test_record_over_maxpayload_fails_naming_it(tmp_path: Path, model: Path) -> None:
    with pytest.raises(RecordTooLarge) as e:
        run_job(tmp_path, model, {"a.csv": b"1,2\n333333,444444\n"}, split_type="Line",
                input_content_type=CSV, max_batch_payload_bytes=8)
    assert 'Object "a.csv" record 2 (byte offset 4) is over 8 bytes' in e.value.message
    assert "333333" not in e.value.message


def test_bad_records_tolerated_are_listed(tmp_path: Path, model: Path) -> None:
    files = {"a.csv": b"1,2\nx,4\n5,6\n7,y\n9,10\n"}
    outputs, summary, errors = run_job(tmp_path, model, files, split_type="Line",
                                       input_content_type=CSV, accept=CSV,
                                       assemble_with="Line", max_failed_records=2)
    assert outputs == {"a.csv.out": b"3.0\n11.0\n19.0\n"}
    assert (summary.records, summary.failed_records, summary.failed) == (5, 2, False)
    assert [(e["key"], e["record"], e["offset"]) for e in errors] == [("a.csv", 2, 4),
                                                                      ("a.csv", 4, 12)]
    assert "not a number" in errors[0]["error"]
    assert all("x,4" not in e["error"] and "7,y" not in e["error"] for e in errors)


def test_many_bad_records_are_merged_in_sorted_runs(tmp_path: Path, model: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # A shard lists records its InputFilter refused as it reads them, and those the
    # model refused as answers come: out of order. Sorted in runs of 2 on disk, then
    # merged, they come out as one sort in memory gives.
    monkeypatch.setattr(finalize, "MERGE_RUN_LINES", 2)
    files = {f"{name}.jsonl": b'{"features":["x",1]}\nx\n{"features":[1,2]}\n'
             for name in "cab"}
    outputs, summary, errors = run_job(tmp_path, model, files, split_type="Line",
                                       input_content_type=JSONL, accept=JSONL,
                                       assemble_with="Line", input_filter="$.features",
                                       max_failed_records=6)
    assert outputs == {f"{name}.jsonl.out": b"[3.0]\n" for name in "abc"}
    assert summary.failed_records == 6
    assert [(e["key"], e["record"], e["offset"]) for e in errors] == [
        (f"{name}.jsonl", record, offset) for name in "abc" for record, offset in ((1, 0),
                                                                                   (2, 21))]


def test_first_bad_record_fails_the_job_without_tolerance(tmp_path: Path, model: Path) -> None:
    with pytest.raises(TooManyFailures) as e:
        run_job(tmp_path, model, {"a.csv": b"1,2\n3,4\nx,6\n7,8\n"}, split_type="Line",
                input_content_type=CSV, accept=CSV)
    assert 'Object "a.csv" record 3 (byte offset 8) failed' in e.value.message
    assert "errorPolicy.maxFailedRecords (0)" in e.value.message


def test_objects_cut_over_shards_come_back_whole(tmp_path: Path, model: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plan_module, "MIN_SHARD_BYTES", 64)
    monkeypatch.setattr(plan_module, "OBJECT_OVERHEAD_BYTES", 0)
    rows = [f"{i},{i + 1}" for i in range(200)]
    rows[150] = "bad,1"
    data = "\n".join(rows).encode()
    outputs, summary, errors = run_job(
        tmp_path, model, {"big.csv": data}, split_type="Line", input_content_type=CSV,
        accept=CSV, assemble_with="Line", instance_count=4, max_failed_records=5,
        max_batch_payload_bytes=50)
    assert summary.shards > 4
    expected = b"".join(f"{2 * i + 1}.0\n".encode() for i in range(200) if i != 150)
    assert outputs == {"big.csv.out": expected}
    assert [(e["record"], e["offset"]) for e in errors] == [(151, data.index(b"bad"))]
    assert not list((tmp_path / "out" / "_kubeinfer").glob("parts/**/*"))


def test_impossible_settings_are_refused_naming_the_field(tmp_path: Path, model: Path) -> None:
    with pytest.raises(BadInput, match=r"not on input\.splitType RecordIO"):
        run_job(tmp_path / "1", model, {"a": b""}, split_type="RecordIO", join_source="Input",
                input_content_type=CSV)
    with pytest.raises(BadInput, match="a text/csv record is an array of columns"):
        run_job(tmp_path / "2", model, {"a": b"1,2\n"}, split_type="Line", input_filter="$.x",
                input_content_type=CSV)
    with pytest.raises(BadInput, match=r"set output\.assembleWith Line"):
        run_job(tmp_path / "3", model, {"a": b"1,2\n"}, split_type="Line", join_source="Input",
                input_content_type=CSV)


def test_tfrecord_multirecord_keeps_framing(tmp_path: Path, model: Path) -> None:
    # The in-process model cannot read framed bytes: each request fails, and is tried
    # record by record (still framed) -- pinning that MultiRecord sends framing.
    data = tfrecord([b"1,2"])
    _, summary, errors = run_job(tmp_path, model, {"a.rec": data}, split_type="TFRecord",
                                 input_content_type=CSV, max_failed_records=1)
    assert summary.failed_records == 1 and errors[0]["offset"] == 0
    assert struct.unpack("<Q", data[:8])[0] == 3


def test_pipeline_model_in_process(tmp_path: Path, model: Path) -> None:
    # A one-step multi-container model: the steps run in-process, as the pipeline server's.
    pipeline = {"steps": [{"name": "sum", "model_uri": f"file://{model}"}]}
    outputs, summary, _ = run_job(tmp_path, model, {"a.csv": LINES}, pipeline=pipeline,
                                  split_type="Line", input_content_type=CSV, accept=CSV,
                                  assemble_with="Line", max_batch_payload_bytes=8)
    assert outputs == {"a.csv.out": SUMS}
    assert summary.records == 3
