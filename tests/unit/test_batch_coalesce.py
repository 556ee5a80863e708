"""Small objects sharing requests (``batch_across_objects``): the outputs are exactly what
one request per object gives, bad records are still found per object, and a model
whose answer is not a line per record makes the worker go back to one request each."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kubeinfer_runtime.batch import invoke
from kubeinfer_runtime.batch.coalesce import can_coalesce, cut_answer, joined
from kubeinfer_runtime.contract.batch import BatchSettings
from tests.support.onnx_models import row_sum_model
from tests.unit.test_batch_golden import run_job

CSV = "text/csv"
SMALL = {f"d{i // 10}/o{i:02d}.csv": f"{i},1\n{i},2\n{i},3".encode() for i in range(30)}
EXPECTED = {f"{k}.out": "".join(f"{float(i + j)}\n" for j in (1, 2, 3)).encode()
            for i, k in enumerate(SMALL)}
JOB = dict(split_type="Line", input_content_type=CSV, accept=CSV, assemble_with="Line")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return row_sum_model(tmp_path_factory.mktemp("model") / "sum.onnx")


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The records of each request the in-process model answered (a spy: it calls through)."""
    seen: list[int] = []
    real = invoke.InProcessModel.invoke

    def spy(self: invoke.InProcessModel, body: bytes, *, lines: bool) -> invoke.Answer:
        seen.append(body.count(b"\n"))
        return real(self, body, lines=lines)

    monkeypatch.setattr(invoke.InProcessModel, "invoke", spy)
    return seen


def test_cut_answer() -> None:
    assert cut_answer(b"1\n2\n3\n", CSV, [2, 1]) == [b"1\n2\n", b"3\n"]
    assert cut_answer(b"1\n2\n3", "text/csv; charset=utf-8", [1, 0, 2]) == [b"1\n", b"",
                                                                             b"2\n3\n"]
    assert cut_answer(b"1\n2\n", CSV, [2, 1]) is None  # fewer lines than records
    assert cut_answer(b"h\n1\n2\n3\n", CSV, [2, 1]) is None  # a header line more
    assert cut_answer(b'{"predictions":[1,2,3]}', "application/json", [2, 1]) is None
    assert joined([b"1,2", b"3,4\n"]) == b"1,2\n3,4\n"


def test_which_jobs_coalesce() -> None:
    base: dict[str, Any] = dict(model_uri="file:///m.onnx", **JOB)
    assert can_coalesce(BatchSettings(**base))
    assert can_coalesce(BatchSettings(**{**base, "accept": "application/jsonlines"}))
    for change in ({"batch_across_objects": False}, {"batch_strategy": "SingleRecord"},
                   {"assemble_with": "None"}, {"accept": "application/json"},
                   {"split_type": "None"}):
        assert not can_coalesce(BatchSettings(**{**base, **change})), change


def test_small_objects_share_requests_with_the_same_outputs(
        tmp_path: Path, model: Path, calls: list[int]) -> None:
    outputs, summary, _ = run_job(tmp_path / "on", model, SMALL, **JOB)
    assert outputs == EXPECTED
    assert summary.records == 90
    assert sum(calls) == 90 and len(calls) < len(SMALL) // 2
    calls.clear()
    outputs, _, _ = run_job(tmp_path / "off", model, SMALL, **JOB, batch_across_objects=False)
    assert outputs == EXPECTED
    assert len(calls) == len(SMALL)


def test_a_bad_record_is_found_in_its_own_object(tmp_path: Path, model: Path) -> None:
    files = dict(SMALL)
    files["d1/o12.csv"] = b"12,1\nx,2\n12,3\n"
    outputs, summary, errors = run_job(tmp_path, model, files, **JOB, max_failed_records=1)
    assert outputs == {**EXPECTED, "d1/o12.csv.out": b"13.0\n15.0\n"}
    assert summary.failed_records == 1
    assert [(e["key"], e["record"], e["offset"]) for e in errors] == [("d1/o12.csv", 2, 5)]


def test_answers_not_a_line_per_record_go_back_to_a_request_per_object(
        tmp_path: Path, model: Path) -> None:
    # The model answers a header line, then its JSON answer: shared, the lines do not
    # match the records; object by object, each output is what a request of its own
    # gives (and what SageMaker writes).
    header = "tests.support.batch_handlers:with_header"
    pipeline = {"steps": [{"name": "sum", "model_uri": f"file://{model}"},
                          {"name": "header", "handler": header}]}
    outputs, _, _ = run_job(tmp_path / "on", model, SMALL, **JOB, pipeline=pipeline)
    alone, _, _ = run_job(tmp_path / "off", model, SMALL, **JOB, pipeline=pipeline,
                          batch_across_objects=False)
    assert outputs == alone
    assert all(v.startswith(b"sum\n") and v.count(b"\n") == 2 for v in outputs.values())
