"""DataProcessing filters and joins, output assembly, execution parameters: SageMaker's
documented examples, pinned."""

from __future__ import annotations

import numpy as np
import pytest

from kubeinfer_runtime.batch.assemble import line_terminated, split_outputs
from kubeinfer_runtime.batch.errors import BadInput, BadRecord, OutputMismatch
from kubeinfer_runtime.batch.filters import DataProcessor, JsonFilter
from kubeinfer_runtime.batch.invoke import ExecutionParameters, as_instances, encode_jsonlines
from kubeinfer_runtime.contract.batch import BatchSettings, BatchStrategy

ROW = list("abcdefg")


@pytest.mark.parametrize(("expr", "expected"), [
    ("$", ROW), ("$[1:]", ROW[1:]), ("$[0:3]", ROW[0:3]), ("$[:5]", ROW[:5]),
    ("$[2:5]", ROW[2:5]), ("$[1]", "b"), ("$[-1]", "g"), ("$[1,3,5]", ["b", "d", "f"]),
    ("$[0,2]", ["a", "c"]), ("$[0,5:]", ["a", "f", "g"]), ("$[*]", ROW),
])
def test_column_filters(expr: str, expected: object) -> None:
    # Slices end before their second index, as in JSONPath; the docs' prose reads
    # $[1:4] as inclusive, the docs' table and JSONPath do not.
    assert JsonFilter(expr, "dataProcessing.inputFilter", columns=True).apply(ROW, "r") == expected


def test_json_filters() -> None:
    doc = {"id": 7, "features": [1, 2], "SageMakerOutput": {"label": 1},
           "nested_obj": {"a": 1, "b": 2}}
    f = "dataProcessing.outputFilter"
    assert JsonFilter("$.features", f, columns=False).apply(doc, "r") == [1, 2]
    assert JsonFilter("$['id','SageMakerOutput']", f, columns=False).apply(doc, "r") == {
        "id": 7, "SageMakerOutput": {"label": 1}}
    assert JsonFilter("$.nested_obj.*", f, columns=False).apply(doc, "r") == [1, 2]
    assert JsonFilter("$.nested_obj['a','b']", f, columns=False).apply(doc, "r") == {
        "a": 1, "b": 2}


@pytest.mark.parametrize(("expr", "doc", "message"), [
    ("$.missing", {"id": 1}, "selects nothing"),
    ("$['id','missing']", {"id": 1}, "selects field 'missing'"),
    ("$[9]", [1, 2], "past the end"),
    ("$[0,9]", [1, 2], "past the end"),
])
def test_missing_fields_and_indexes_fail_the_record(expr: str, doc: object,
                                                    message: str) -> None:
    with pytest.raises(BadRecord, match=message) as e:
        JsonFilter(expr, "dataProcessing.outputFilter", columns=False).apply(doc, "the record")
    assert "1, 2" not in e.value.message


@pytest.mark.parametrize(("expr", "columns", "message"), [
    ("x", False, "must start with \\$"), ("$..id", False, "outside SageMaker's JSONPath"),
    ("$[?(@.a)]", False, "not valid JSONPath"), ("$.id", True, "array of columns"),
    ("$[0][1]", True, "array of columns"),
])
def test_bad_filters_are_refused_naming_the_field(expr: str, columns: bool,
                                                  message: str) -> None:
    with pytest.raises(BadInput, match=message) as e:
        JsonFilter(expr, "dataProcessing.inputFilter", columns=columns)
    assert e.value.message.startswith("dataProcessing.inputFilter")


def _processor(**kw: object) -> DataProcessor:
    base: dict[str, object] = dict(model_url="http://x", split_type="Line",
                                   assemble_with="Line")
    base.update(kw)
    return DataProcessor(BatchSettings(**base))  # type: ignore[arg-type]


def test_csv_join_appends_output_columns_to_the_whole_input() -> None:
    p = _processor(input_content_type="text/csv", join_source="Input", input_filter="$[1:]")
    assert p.sent(b"id1,1,2,3\n", line=True) == b"1,2,3\n"
    # The docs' example: record [1,2,3] and label [1] -> [1,2,3,1].
    assert _processor(input_content_type="text/csv", join_source="Input").output(
        b"1,2,3\n", b"1") == b"1,2,3,1\n"
    assert p.output(b'id1,"a,b",2\n', b"0.5,0.5") == b'id1,"a,b",2,0.5,0.5\n'


def test_json_join_adds_sagemaker_output_or_wraps() -> None:
    p = _processor(input_content_type="application/jsonlines", join_source="Input")
    # The docs' example: {"key":1} and the result {"label":1}.
    assert p.output(b'{"key":1}\n', b'{"label":1}') == b'{"key":1,"SageMakerOutput":{"label":1}}\n'
    assert p.output(b"[1,2]\n", b"0") == b'{"SageMakerInput":[1,2],"SageMakerOutput":0}\n'
    assert p.output(b'"text"\n', b"not json") == (
        b'{"SageMakerInput":"text","SageMakerOutput":"not json"}\n')
    with pytest.raises(BadRecord, match="not JSON") as e:
        p.output(b"{broken secret\n", b"1")
    assert "secret" not in e.value.message


def test_output_filter_without_join_selects_from_the_output() -> None:
    p = _processor(input_content_type="text/csv", output_filter="$[1]")
    assert p.per_record and not p.join
    assert p.output(b"1,2\n", b"0.1,0.9") == b"0.9\n"


def test_settings_problems() -> None:
    def problems(**kw: object) -> list[str]:
        base: dict[str, object] = dict(model_url="http://x")
        base.update(kw)
        return BatchSettings(**base).problems()  # type: ignore[arg-type]

    assert problems() == []
    assert problems(input_filter="$[1:]", input_content_type="image/png",
                    split_type="Line")[0].startswith("DataProcessing filters and joinSource "
                                                     "need input.contentType")
    assert "need input.splitType Line" in problems(join_source="Input",
                                                   input_content_type="text/csv")[0]
    assert "output.accept text/csv" in problems(
        join_source="Input", input_content_type="text/csv", split_type="Line",
        assemble_with="Line", accept="application/json")[0]
    assert "set output.assembleWith Line" in problems(
        output_filter="$[0]", input_content_type="text/csv", split_type="Line")[0]
    assert problems(join_source="Input", input_content_type="application/json") == []


# -- assembly --------------------------------------------------------------------------


def test_assemble_with_line_ends_every_answer_with_one_newline() -> None:
    assert line_terminated(b"1\n2\n") == b"1\n2\n"
    assert line_terminated(b'{"predictions":[1]}') == b'{"predictions":[1]}\n'
    assert line_terminated(b"") == b""


@pytest.mark.parametrize(("body", "ctype", "n", "expected"), [
    (b"1\n2\n3\n", "text/csv", 3, [b"1", b"2", b"3"]),
    (b"1\r\n2", "text/csv", 2, [b"1", b"2"]),
    (b'{"predictions":[[1],[2]]}', "application/json", 2, [b"[1]", b"[2]"]),
    (b"[[1],[2]]", "application/json", 2, [b"[1]", b"[2]"]),
    (b'{"predictions":{"label":[0,1],"p":[[0.1],[0.9]]}}', "application/json", 2,
     [b'{"label":0,"p":[0.1]}', b'{"label":1,"p":[0.9]}']),
    (b'{"a":1}\n{"a":2}\n', "application/jsonlines", 2, [b'{"a":1}', b'{"a":2}']),
    (b'{"predictions":[[1,2]]}', "application/json", 1, [b"[1,2]"]),
    (b'{"x":1,"y":2}', "application/json", 1, [b'{"x":1,"y":2}']),
    (b"0.5,0.5", "text/csv", 1, [b"0.5,0.5"]),
])
def test_split_outputs(body: bytes, ctype: str, n: int, expected: list[bytes]) -> None:
    assert split_outputs(body, ctype, n, "records") == expected


def test_split_outputs_count_mismatch_is_clear() -> None:
    with pytest.raises(OutputMismatch, match="answered 2 output lines for the 3 records of "
                                             "object"):
        split_outputs(b"1\n2\n", "text/csv", 3, 'object "k" record 1')


# -- in-process JSON Lines, execution parameters ---------------------------------------


def test_json_lines_in_process() -> None:
    assert as_instances(b"[1,2]\n\n[3,4]\n") == b'{"instances":[[1,2],[3,4]]}'
    out = {"y": np.array([[1.5], [2.0]], np.float32)}
    assert encode_jsonlines(out, None) == b"[1.5]\n[2.0]\n"
    two = {"label": np.array([0, 1]), "p": np.array([[0.25], [0.75]])}
    assert encode_jsonlines(two, None) == b'{"label":0,"p":[0.25]}\n{"label":1,"p":[0.75]}\n'
    assert encode_jsonlines(two, "label") == b"0\n1\n"


def test_execution_parameters_apply_where_the_job_set_none() -> None:
    params = ExecutionParameters.parse({"MaxConcurrentTransforms": 4,
                                        "BatchStrategy": "SINGLE_RECORD", "MaxPayloadInMB": 2})
    assert params == ExecutionParameters(4, BatchStrategy.SINGLE_RECORD, 2)
    unset = params.apply(BatchSettings(model_url="http://x"))
    assert (unset.effective_max_concurrent_transforms, unset.effective_batch_strategy,
            unset.effective_max_payload_bytes) == (4, BatchStrategy.SINGLE_RECORD, 2 << 20)
    job = BatchSettings(model_url="http://x", max_concurrent_transforms=2,
                        batch_strategy="MultiRecord", max_batch_payload_bytes=1000)
    assert params.apply(job) == job
    assert ExecutionParameters.parse({"MaxConcurrentTransforms": "lots", "MaxPayloadInMB": 999,
                                      "BatchStrategy": "Other"}) == ExecutionParameters()
    assert ExecutionParameters.parse([]) == ExecutionParameters()


def test_sagemaker_env_of_an_image_model() -> None:
    env = BatchSettings(model_url="http://x", max_batch_payload_bytes=(1 << 20) + 1,
                        batch_strategy="SingleRecord").sagemaker_env()
    assert env == {"SAGEMAKER_BATCH": "true", "SAGEMAKER_MAX_PAYLOAD_IN_MB": "2",
                   "SAGEMAKER_BATCH_STRATEGY": "SINGLE_RECORD",
                   "SAGEMAKER_MAX_CONCURRENT_TRANSFORMS": "1"}
