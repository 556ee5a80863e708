"""Records of several small objects in one request, and the answer cut back per object: PURE.

SageMaker sends each request records of one object only, so a job over
10,000 objects of 100 rows makes 10,000 requests where 4 would carry the same
rows: the per-request cost (decoding, the model's fixed cost, the call itself)
then dominates. When every record's output is one line of the answer, the
objects' batches can share a request and the answer can be cut back at line
counts, giving each object exactly the lines one request of its own would have
given (AssembleWith Line writes a response newline-terminated either way).

That holds when (:func:`can_coalesce`): records are lines (splitType Line),
requests carry several (MultiRecord), outputs are assembled by line, and the
Accept type answers a line per record (CSV, JSON Lines). The answer is checked
too (:func:`cut_answer`): a content type of another kind, or a line count other
than the records sent, means the model does not answer line per record, and
the worker goes back to one request per object for the rest of the job.
``batchAcrossObjects: false`` turns it off for a model whose answer for a
record depends on the other records of its request.
"""

from __future__ import annotations

import numpy as np

from kubeinfer_runtime.contract.batch import (
    LINE_PER_RECORD_TYPES,
    AssembleWith,
    BatchSettings,
    BatchStrategy,
    SplitType,
    media_type_of,
)

#: Objects up to this size are candidates (larger ones already make full requests).
SMALL_OBJECT_BYTES = 1 << 20
#: At most this many objects share a request (bounds the bookkeeping per request).
MAX_MEMBERS = 4096
#: The size of a shared request when maxPayloadInMB is 0 (no bound).
UNBOUNDED_GROUP_BYTES = 6 << 20


def can_coalesce(settings: BatchSettings) -> bool:
    """Whether this job's small objects may share requests."""
    return (settings.batch_across_objects
            and settings.split_type is SplitType.LINE
            and settings.effective_batch_strategy is BatchStrategy.MULTI_RECORD
            and settings.assemble_with is AssembleWith.LINE
            and media_type_of(settings.accept) in LINE_PER_RECORD_TYPES)


def group_bytes(settings: BatchSettings) -> int:
    """The largest shared request."""
    return settings.effective_max_payload_bytes or UNBOUNDED_GROUP_BYTES


def joined(bodies: list[bytes]) -> bytes:
    """One request of several objects' line batches (each ends with a newline)."""
    return b"".join(b if b.endswith(b"\n") else b + b"\n" for b in bodies)


def cut_answer(body: bytes, content_type: str, counts: list[int]) -> list[bytes] | None:
    """The answer to a shared request cut into one piece per object (``counts``: its
    records), each piece its lines with their newlines; None when the answer is not
    one line per record (the caller then asks object by object)."""
    if media_type_of(content_type) not in LINE_PER_RECORD_TYPES:
        return None
    total = sum(counts)
    ends = np.flatnonzero(np.frombuffer(body, dtype=np.uint8) == 10)
    lines = len(ends) + (1 if body and not body.endswith(b"\n") else 0)
    if lines != total:
        return None
    if len(ends) < total:  # a last line without its newline: given one
        ends = np.append(ends, len(body))
        body = body + b"\n"
    pieces: list[bytes] = []
    start = at = 0
    for count in counts:
        if count == 0:
            pieces.append(b"")
            continue
        at += count
        stop = int(ends[at - 1]) + 1
        pieces.append(body[start:stop])
        start = stop
    return pieces
