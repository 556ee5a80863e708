"""SageMaker DataProcessing: InputFilter, JoinSource, OutputFilter: PURE.

What SageMaker documents ("Associate Prediction Results with Input Records"),
pinned by golden tests:

* Filters are JSONPath in SageMaker's subset: ``$``, ``.name``, ``['a','b']``,
  ``[n]`` and ``[n,m]`` (negative counts from the end), ``[a:b]`` slices and ``*``.
  A CSV row is a JSON array of its columns, so CSV filters select by index only
  (``$[1:]``, ``$[0,2]``); JSON records by anything in the subset.
* Slices end before ``b``, as in JSONPath (Jayway's, which SageMaker links to) and
  the docs' table ("the array slice() method"). The docs' prose calls ``$[1:4]``
  "the second through fifth columns" (inclusive); the table and JSONPath win here.
* ``[0,5:]`` (indexes and slices together, the API reference's example) selects
  each in turn. Names may hold ``_`` (SageMaker refuses it; nothing needs that).
* JoinSource Input joins each output record with its *whole* input record (not the
  filtered one): CSV columns appended after the input's; a JSON object input gets
  a ``SageMakerOutput`` attribute; any other JSON input becomes
  ``{"SageMakerInput": input, "SageMakerOutput": output}``.
* OutputFilter selects from the joined record (or the output alone, without join).
* A field that is missing, or an index past the end, is an error for that record
  (SageMaker: "If you specify indexes that aren't within the dimension size of the
  joined dataset, you get an error"), counted against ``maxFailedRecords``.

CSV rows are parsed as RFC 4180 (quoted commas stay in their column) and written
back with minimal quoting; values are never reformatted. No message quotes a value.
"""

from __future__ import annotations

import csv
import io
import json
import re
from typing import Any

import orjson
from jsonpath_ng import JSONPath
from jsonpath_ng.jsonpath import Child, Fields, Index, Root, Slice, Wildcard
from jsonpath_ng.parser import parse as parse_jsonpath

from kubeinfer_runtime.batch.errors import BadInput, BadRecord
from kubeinfer_runtime.codec_tensors import load_json
from kubeinfer_runtime.contract.batch import BatchSettings, JoinSource, media_type_of
from kubeinfer_runtime.errors import ValidationError

#: A path whose last bracket mixes indexes and slices: ``$[0,5:]``.
_UNION = re.compile(r"^(?P<head>\$.*?)\[(?P<items>[^\[\]'\"]*[,][^\[\]'\"]*)\]$")
_SUBSET = ("SageMaker's JSONPath subset: $, .name, ['a','b'], [n], [n,m], [a:b] and *")


class JsonFilter:
    """One compiled InputFilter or OutputFilter."""

    def __init__(self, expr: str, field: str, *, columns: bool) -> None:
        self.expr = expr.strip() or "$"
        self.field = field
        self.identity = self.expr == "$"
        self._paths: list[JSONPath] = []
        #: What a match becomes: "value" (one), "list" (several), "object" (named fields).
        self._shape = "value"
        if self.identity:
            return
        if not self.expr.startswith("$"):
            raise BadInput(f"{field} {self.expr[:70]!r} must start with $: use {_SUBSET}")
        union = _UNION.match(self.expr)
        try:
            if union and ":" in union["items"]:
                self._paths = [parse_jsonpath(f"{union['head']}[{item.strip()}]")
                               for item in union["items"].split(",")]
                self._shape = "list"
            else:
                self._paths = [parse_jsonpath(self.expr)]
        except Exception:
            raise BadInput(f"{field} {self.expr[:70]!r} is not valid JSONPath: use "
                           f"{_SUBSET}") from None
        for path in self._paths:
            self._check(path, columns)
        if len(self._paths) == 1:
            last = self._paths[0].right if isinstance(self._paths[0], Child) else self._paths[0]
            if isinstance(last, Fields):
                many = len(last.fields) > 1
                self._shape = "object" if many else "list" if last.fields == ("*",) else "value"
            elif isinstance(last, Index):
                self._shape = "list" if len(last.indices) > 1 else "value"
            elif isinstance(last, Slice | Wildcard):
                self._shape = "list"

    def _check(self, path: JSONPath, columns: bool) -> None:
        nodes: list[JSONPath] = []
        node = path
        while isinstance(node, Child):
            nodes.append(node.right)
            node = node.left
        if not isinstance(node, Root) or any(not isinstance(n, Fields | Index | Slice | Wildcard)
                                             for n in nodes):
            raise BadInput(f"{self.field} {self.expr[:70]!r} uses an operator outside "
                           f"{_SUBSET}")
        if columns and (len(nodes) != 1 or not isinstance(nodes[0], Index | Slice | Wildcard)):
            raise BadInput(f"{self.field} {self.expr[:70]!r} selects by name, but a text/csv "
                           "record is an array of columns: select columns by index, such as "
                           "$[1:] or $[0,2]")

    def apply(self, doc: Any, what: str) -> Any:
        """The selected part of ``doc``; :class:`BadRecord` when it is not there."""
        if self.identity:
            return doc
        if self._shape == "list" and len(self._paths) > 1:
            return [m.value for p in self._paths for m in p.find(doc)]
        path = self._paths[0]
        matches = path.find(doc)
        last = path.right if isinstance(path, Child) else path
        if self._shape == "object":
            assert isinstance(last, Fields)
            found = {str(m.path): m.value for m in matches}
            missing = [f for f in last.fields if f not in found]
            if missing:
                raise BadRecord(f"{self.field} {self.expr[:70]!r} selects field "
                                f"{missing[0][:60]!r}, which {what} does not have")
            return {f: found[f] for f in last.fields}
        if isinstance(last, Index) and len(matches) < len(last.indices):
            raise BadRecord(f"{self.field} {self.expr[:70]!r} selects an index past the end of "
                            f"{what}: select indexes it has")
        if self._shape == "value":
            if not matches:
                raise BadRecord(f"{self.field} {self.expr[:70]!r} selects nothing in {what}: "
                                "fix the filter, or the record")
            return matches[0].value
        return [m.value for m in matches]


class DataProcessor:
    """The job's DataProcessing, applied record by record."""

    def __init__(self, settings: BatchSettings) -> None:
        media = media_type_of(settings.input_content_type)
        self.csv = media == "text/csv"
        self.join = settings.join_source is JoinSource.INPUT
        self.input_filter = JsonFilter(settings.input_filter, "dataProcessing.inputFilter",
                                       columns=self.csv)
        self.output_filter = JsonFilter(settings.output_filter, "dataProcessing.outputFilter",
                                        columns=self.csv)
        #: Whether what is sent differs from the record as read.
        self.filters_input = not self.input_filter.identity
        #: Whether each output record must be matched with its input record.
        self.per_record = self.join or not self.output_filter.identity

    def sent(self, data: bytes, *, line: bool) -> bytes:
        """What the request carries for a record (``line``: ``\\n``-terminated)."""
        if not self.filters_input:
            return data
        value = self.input_filter.apply(self._parse(data, "input record"), "the input record")
        if not self.csv and (b"NaN" in data or b"Infinity" in data):
            # The model reads NaN and Infinity as Python's json writes them (orjson would
            # write null, which a float input refuses): the selection keeps them.
            return (json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
                    + (b"\n" if line else b""))
        return self._dump(value) + (b"\n" if line else b"")

    def output(self, data: bytes, output: bytes) -> bytes:
        """The output line of one record: its output, joined and filtered."""
        if self.csv:
            out_cols = _csv_row(output)
            joined: Any = (_csv_row(data) + out_cols) if self.join else out_cols
        else:
            try:
                out: Any = orjson.loads(output)
            except orjson.JSONDecodeError:
                out = output.decode("utf-8", "replace")  # a text answer stays text
            if self.join:
                doc = self._parse(data, "input record")
                joined = ({**doc, "SageMakerOutput": out} if isinstance(doc, dict)
                          else {"SageMakerInput": doc, "SageMakerOutput": out})
            else:
                joined = out
        return self._dump(self.output_filter.apply(joined, "the joined record")) + b"\n"

    def _parse(self, data: bytes, what: str) -> Any:
        if self.csv:
            return _csv_row(data)
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError as e:
            reason = str(e).split(":")[0]
        try:
            # NaN and Infinity, as Python's json writes them (and a leading BOM): read as
            # the model server reads a request (``load_json``).
            return load_json(data)
        except ValidationError:
            raise BadRecord(f"The {what} is not JSON ({reason}): send one JSON document "
                            "per line") from None

    def _dump(self, value: Any) -> bytes:
        if not self.csv:
            return orjson.dumps(value)
        row = value if isinstance(value, list) else [value]
        buf = io.StringIO()
        csv.writer(buf, lineterminator="").writerow(row)
        return buf.getvalue().encode()


def _csv_row(data: bytes) -> list[str]:
    try:
        text = data.decode("utf-8-sig").rstrip("\r\n")
    except UnicodeDecodeError as e:
        raise BadRecord(f"The record is not UTF-8 (invalid byte at position {e.start}): send "
                        "UTF-8 text") from None
    try:
        return next(csv.reader([text]), [])
    except csv.Error as e:
        raise BadRecord(f"The record is not a CSV row ({e}): quote fields as RFC 4180 "
                        "says") from None
