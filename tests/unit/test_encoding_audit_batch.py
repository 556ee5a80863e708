"""Batch Transform over files Windows tools write: a UTF-8 byte order mark at the start
of an object (Excel's "CSV UTF-8", Notepad, PowerShell) and CRLF line endings, in JSON
Lines and CSV, with and without filters and join; keys with spaces and non-ASCII."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kubeinfer_runtime.batch.records import LineReader, Where, lines_of
from tests.support.onnx_models import row_sum_model
from tests.unit.test_batch_golden import run_job

BOM = b"\xef\xbb\xbf"
CSV = "text/csv"
JSONL = "application/jsonlines"
W = Where("data/x.csv")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return row_sum_model(tmp_path_factory.mktemp("model") / "sum.onnx")


def _records(data: bytes, start: int = 0, end: int | None = None,
             chunk: int = 5) -> list[tuple[int, bytes]]:
    reader = LineReader(W, start, end, 1 << 20)
    out: list[tuple[int, bytes]] = []
    pos = reader.read_from
    while pos < len(data) and not reader.done:
        block = reader.feed(data[pos:pos + chunk])
        pos += chunk
        if block is not None:
            out += [(r.offset, r.data) for r in lines_of(block)]
    if not reader.done:
        block = reader.finish()
        if block is not None:
            out += [(r.offset, r.data) for r in lines_of(block)]
    return out


def test_a_bom_is_no_part_of_the_first_record() -> None:
    assert _records(BOM + b"1,2\r\n3,4") == [(3, b"1,2\r\n"), (8, b"3,4\n")]
    assert _records(BOM + b"\n1,2\n") == [(4, b"1,2\n")]
    assert _records(BOM) == [] and _records(BOM + b"\r\n") == []
    # Only at the object's start: elsewhere it is the record's content.
    assert _records(b"1,2\n" + BOM + b"3,4\n") == [(0, b"1,2\n"), (4, BOM + b"3,4\n")]


@settings(max_examples=200, deadline=None)
@given(lines=st.lists(st.binary(max_size=8).map(lambda b: b.replace(b"\n", b"x")),
                      max_size=8),
       cuts=st.lists(st.integers(0, 80), max_size=4), chunk=st.integers(1, 20))
def test_with_a_bom_every_record_is_still_in_exactly_one_part(
        lines: list[bytes], cuts: list[int], chunk: int) -> None:
    data = BOM + b"\n".join(lines)
    whole = _records(data, chunk=1000)
    bounds = sorted({0, len(data), *(c for c in cuts if c < len(data))})
    parts = []
    for start, end in itertools.pairwise(bounds):
        parts += _records(data, start, end, chunk)
    assert parts == whole
    assert all(not line.startswith(BOM) for offset, line in whole if offset <= 3)


@pytest.mark.parametrize("env", [
    {},  # MultiRecord: {"instances": [...]} of the lines
    {"batch_strategy": "SingleRecord"},
    {"input_filter": "$.f", "join_source": "Input"},
    {"input_filter": "$.f", "join_source": "Input", "batch_strategy": "SingleRecord"},
])
def test_json_lines_with_a_bom_and_crlf(tmp_path: Path, model: Path,
                                        env: dict[str, str]) -> None:
    data = (BOM + '{"id":"é","f":[1,2]}\r\n{"id":"b","f":[3,4]}\r\n'.encode()
            if "input_filter" in env else BOM + b"[1,2]\r\n[3,4]\r\n")
    outputs, summary, errors = run_job(tmp_path, model, {"a.jsonl": data}, split_type="Line",
                                       input_content_type=JSONL, accept=JSONL,
                                       assemble_with="Line", **env)
    assert errors == [] and (summary.records, summary.failed_records) == (2, 0)
    if "join_source" in env:
        assert outputs == {"a.jsonl.out": '{"id":"é","f":[1,2],"SageMakerOutput":[3.0]}\n'
                                          '{"id":"b","f":[3,4],"SageMakerOutput":[7.0]}\n'
                                          .encode()}
    else:
        assert outputs == {"a.jsonl.out": b"[3.0]\n[7.0]\n"}


def test_json_objects_with_a_bom_split_none_and_single_record(tmp_path: Path,
                                                              model: Path) -> None:
    json = "application/json"
    outputs, _, errors = run_job(tmp_path / "1", model, {"a.json": BOM + b"[[1,2],[3,4]]"},
                                 split_type="None", input_content_type=json, accept=json)
    assert errors == [] and outputs == {"a.json.out": b'{"predictions":[[3.0],[7.0]]}'}
    outputs, _, errors = run_job(tmp_path / "2", model, {"a.json": BOM + b"[1,2]\r\n[3,4]"},
                                 split_type="Line", input_content_type=json, accept=json,
                                 assemble_with="Line", batch_strategy="SingleRecord")
    assert errors == [] and outputs == {
        "a.json.out": b'{"predictions":[[3.0]]}\n{"predictions":[[7.0]]}\n'}


def test_csv_with_boms_crlf_and_unicode_keys_joined(tmp_path: Path, model: Path) -> None:
    # Excel's "CSV UTF-8": every object starts with a BOM; small ones share requests.
    files = {f"dir with space/é ü {i}.csv": BOM + b"x,1,2\r\n\"q,\xc3\xa9\",3,4\r\n"
             for i in range(3)}
    outputs, summary, errors = run_job(
        tmp_path, model, files, split_type="Line", input_content_type=CSV, accept=CSV,
        assemble_with="Line", input_filter="$[1:]", join_source="Input")
    assert errors == [] and summary.records == 6
    assert outputs == {f"{k}.out": 'x,1,2,3.0\n"q,é",3,4,7.0\n'.encode() for k in files}


def test_json_lines_with_nan_as_python_writes_them(tmp_path: Path, model: Path) -> None:
    """``json.dumps`` writes a numpy NaN as NaN: a JSON Lines record holding one is read as
    the model server reads a request, not failed as a bad record (joined too)."""
    data = b'{"f":[NaN,2]}\n{"f":[3,Infinity]}\n{"f":[1,2]}\n'
    outputs, summary, errors = run_job(
        tmp_path, model, {"a.jsonl": data}, split_type="Line", input_content_type=JSONL,
        accept=JSONL, assemble_with="Line", input_filter="$.f", join_source="Input")
    assert errors == [] and (summary.records, summary.failed_records) == (3, 0)
    lines = outputs["a.jsonl.out"].decode().splitlines()
    assert lines[2] == '{"f":[1,2],"SageMakerOutput":[3.0]}'
    assert lines[0].startswith('{"f":[null,2],"SageMakerOutput":')  # JSON has no NaN
    # Still one JSON value per record: NaN does not let a line smuggle in a second one.
    bad = b'{"f":[NaN,2]}, {"f":[1,2]}\n'
    _, summary, errors = run_job(tmp_path / "bad", model, {"b.jsonl": bad}, split_type="Line",
                                 input_content_type=JSONL, accept=JSONL, assemble_with="Line",
                                 max_failed_records=1)
    assert summary.failed_records == 1 and errors
