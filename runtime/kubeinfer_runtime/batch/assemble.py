"""Responses into the output object (AssembleWith), and per-record outputs: PURE.

* AssembleWith None: the response bodies, concatenated as the model answered them.
* AssembleWith Line: each response ends with a newline (SageMaker: "add a newline
  character at the end of every transformed record"): one is added when the model
  did not end its answer with one. A model answering one line per record (CSV,
  JSON Lines) thus gives one output line per input record; a JSON document per
  request gives one line per request. Responses are not parsed.
* JoinSource Input and OutputFilter need each record's own output:
  :func:`split_outputs` cuts a response into one output per record sent — by
  lines (CSV, JSON Lines), or by elements of a JSON answer (an array, the one
  list a ``{"predictions": [...]}`` answer holds, or per record of a
  ``{"predictions": {"<output>": [...]}}`` answer of several outputs). Any other
  count is an :class:`~kubeinfer_runtime.batch.errors.OutputMismatch`.
"""

from __future__ import annotations

from typing import Any

import orjson

from kubeinfer_runtime.batch.errors import OutputMismatch
from kubeinfer_runtime.contract.batch import media_type_of

_JSON_TYPES = ("application/json", "")


def line_terminated(body: bytes) -> bytes:
    """A response as AssembleWith Line writes it."""
    return body if not body or body.endswith(b"\n") else body + b"\n"


def split_outputs(body: bytes, content_type: str | None, n: int, where: str) -> list[bytes]:
    """``n`` outputs, one per record of a request (``where`` names its records)."""
    media = media_type_of(content_type)
    if media in _JSON_TYPES or (not media and body[:1] in (b"{", b"[")):
        parts = _json_parts(body, n)
        if parts is not None:
            return parts
    lines = body.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    lines = [line[:-1] if line.endswith(b"\r") else line for line in lines]
    if len(lines) == n:
        return lines
    if n == 1 and body.strip():
        return [body.strip()]
    raise OutputMismatch(
        f"Model answered {len(lines)} output lines for the {n} records of {where}: "
        "joinSource Input and outputFilter need one output per record; make the model "
        "answer one line (CSV, JSON Lines) or one JSON array element per record, or set "
        "batchStrategy SingleRecord")


def _json_parts(body: bytes, n: int) -> list[bytes] | None:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None  # several documents (JSON Lines), or not JSON: try lines
    items: Any = None
    if isinstance(doc, list):
        items = doc
    elif isinstance(doc, dict) and len(doc) == 1:
        inner = next(iter(doc.values()))
        if isinstance(inner, list):
            items = inner
        elif (isinstance(inner, dict) and inner
              and all(isinstance(v, list) and len(v) == n for v in inner.values())):
            items = [{k: v[i] for k, v in inner.items()} for i in range(n)]
    if items is not None and len(items) == n:
        return [orjson.dumps(item) for item in items]
    if n == 1:
        return [orjson.dumps(doc)]
    return None
