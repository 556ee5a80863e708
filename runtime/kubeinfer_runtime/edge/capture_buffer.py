"""The device's bounded on-disk buffer of capture records, kept until the fleet acknowledges them.

Devices are offline for hours and restart at any time, so sampled
request/response records go to disk first (JSON Lines segment files under
the state dir) and are uploaded in batches when the fleet server answers. The
buffer's live records never exceed ``max_bytes``; when a record does not fit,
``OnFull.DROP_OLDEST`` drops the oldest records (advancing the read cursor)
and ``OnFull.REJECT_NEW`` drops the new one; either way every dropped record
is counted, and the count survives restarts.

``take_batch`` reads without removing; ``ack`` removes what a batch held, so an
upload that fails (or a crash mid-upload) loses nothing: the next batch holds
the same records again (delivery is at least once). A record dropped to make
room while its batch is in flight is counted as dropped even if that upload
then succeeds. A record larger than one upload (``MAX_CAPTURE_UPLOAD_BYTES``) is
dropped when appended: the fleet would refuse it at every try, and the records
after it would never leave; ``discard`` drops a batch the fleet refused for good.

Disk layout (``directory``): ``seg-<seq>.jsonl`` (append only; the highest is
the one written to) and ``cursor.json`` ({segment, offset, dropped}: where the
oldest live record starts, written atomically). A line cut short by a crash is
cut off on open. Disk use may exceed ``max_bytes`` by at most one segment
(records before the cursor in the oldest segment are freed with that segment).
Not thread-safe: the agent uses it from its event loop.
"""

from __future__ import annotations

import base64
import json
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubeinfer_runtime.contract.edge import MAX_CAPTURE_UPLOAD_BYTES, OnFull

_SEGMENT_RE = re.compile(r"^seg-(\d{12})\.jsonl$")
_CURSOR = "cursor.json"
#: Largest segment file, bytes (smaller when the buffer is small, so freeing is timely).
MAX_SEGMENT_BYTES = 1 << 20


@dataclass(frozen=True)
class Batch:
    """Records read from the buffer, not yet removed: ``ack`` removes them."""

    records: list[bytes]
    #: (segment, end offset) of each record, in order.
    ends: list[tuple[int, int]]

    @property
    def size(self) -> int:
        return sum(len(r) for r in self.records)

    def jsonl(self) -> bytes:
        return b"".join(self.records)


def _encode(body: bytes, content_type: str) -> tuple[str, str]:
    """(data, encoding) as SageMaker's capture writes them: text stays text."""
    ct = content_type.split(";")[0].strip().lower()
    if ct in ("application/json", "text/csv", "text/plain") or ct.endswith("+json"):
        try:
            return body.decode("utf-8"), "CSV" if ct in ("text/csv", "text/plain") else "JSON"
        except UnicodeDecodeError:
            pass
    return base64.b64encode(body).decode(), "BASE64"


def capture_record(*, device_id: str, request: bytes, request_type: str, response: bytes,
                   response_type: str, at: float | None = None,
                   event_id: str | None = None) -> dict[str, Any]:
    """One record in SageMaker's data-capture format (``eventVersion`` "0")."""
    in_data, in_enc = _encode(request, request_type)
    out_data, out_enc = _encode(response, response_type)
    when = datetime.fromtimestamp(at, UTC) if at is not None else datetime.now(UTC)
    return {
        "captureData": {
            "endpointInput": {"observedContentType": request_type, "mode": "INPUT",
                              "data": in_data, "encoding": in_enc},
            "endpointOutput": {"observedContentType": response_type, "mode": "OUTPUT",
                               "data": out_data, "encoding": out_enc},
        },
        "eventMetadata": {"eventId": event_id or str(uuid.uuid4()),
                          "inferenceTime": when.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
                          "deviceId": device_id},
        "eventVersion": "0",
    }


class CaptureBuffer:
    def __init__(self, directory: Path, max_bytes: int,
                 on_full: OnFull = OnFull.DROP_OLDEST,
                 segment_bytes: int | None = None) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.on_full = on_full
        self.segment_bytes = segment_bytes or max(4096, min(MAX_SEGMENT_BYTES, max_bytes // 8))
        self._sizes: dict[int, int] = {}
        self._cursor = (0, 0)
        self.dropped = 0
        self._count = 0
        self._load()

    # -- state --------------------------------------------------------------------------------

    def _path(self, seq: int) -> Path:
        return self.dir / f"seg-{seq:012d}.jsonl"

    def _load(self) -> None:
        for p in self.dir.iterdir():
            if m := _SEGMENT_RE.match(p.name):
                self._sizes[int(m.group(1))] = self._repair(p)
        try:
            meta = json.loads((self.dir / _CURSOR).read_text())
            self._cursor = (int(meta["segment"]), int(meta["offset"]))
            self.dropped = int(meta.get("dropped", 0))
        except (OSError, ValueError, KeyError, TypeError):
            self._cursor = (min(self._sizes, default=0), 0)
        for seq in [s for s in self._sizes if s < self._cursor[0]]:
            self._delete(seq)
        if not self._sizes:
            self._sizes[self._cursor[0]] = 0
            self._path(self._cursor[0]).touch()
        if self._cursor[0] not in self._sizes:  # the cursor's segment was freed
            self._cursor = (min(self._sizes), 0)
        self._count = sum(1 for _ in self._iter_from(self._cursor))
        self._normalize()

    @staticmethod
    def _repair(path: Path) -> int:
        """Cut a last line left without its newline by a crash; returns the size."""
        data = path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end != len(data):
            with open(path, "r+b") as f:
                f.truncate(end)
        return end

    def _delete(self, seq: int) -> None:
        self._sizes.pop(seq, None)
        self._path(seq).unlink(missing_ok=True)

    def _save_cursor(self) -> None:
        tmp = self.dir / f".{_CURSOR}.tmp"
        tmp.write_text(json.dumps({"segment": self._cursor[0], "offset": self._cursor[1],
                                   "dropped": self.dropped}))
        tmp.replace(self.dir / _CURSOR)

    def _normalize(self) -> None:
        """Free the segments the cursor has moved past (never the one written to).

        The cursor only moves forward: an ack may jump it over whole segments, which are
        freed here too, and a consumed segment hands the cursor to the next one, never
        back to an older one (that would bring acknowledged records back).
        """
        for seq in [s for s in self._sizes if s < self._cursor[0]]:
            self._delete(seq)
        active = max(self._sizes)
        while self._cursor[0] < active and self._cursor[1] >= self._sizes.get(self._cursor[0], 0):
            following = min(s for s in self._sizes if s > self._cursor[0])
            self._delete(self._cursor[0])
            self._cursor = (following, 0)

    def _iter_from(self, pos: tuple[int, int]) -> Any:
        """(segment, end offset, line) of every live record from ``pos``."""
        for seq in sorted(s for s in self._sizes if s >= pos[0]):
            start = pos[1] if seq == pos[0] else 0
            with open(self._path(seq), "rb") as f:
                f.seek(start)
                offset = start
                for line in f:
                    offset += len(line)
                    if offset > self._sizes[seq]:
                        break
                    yield seq, offset, line

    # -- the API ------------------------------------------------------------------------------

    @property
    def size_bytes(self) -> int:
        """Bytes of live records."""
        seq0, off0 = self._cursor
        return sum(size for seq, size in self._sizes.items() if seq >= seq0) - off0

    @property
    def buffered(self) -> int:
        return self._count

    def configure(self, max_bytes: int, on_full: OnFull) -> None:
        """New bounds from the fleet (a smaller bound drops nothing until the next append)."""
        self.max_bytes = max_bytes
        self.on_full = on_full
        # Segments in step with the bound (from the next one): a 4 KiB buffer must not
        # keep 1 MiB segments, whose whole size counts against the device's disk.
        self.segment_bytes = max(4096, min(MAX_SEGMENT_BYTES, max_bytes // 8))

    def append(self, record: dict[str, Any]) -> bool:
        """Add a record; False (and counted as dropped) when it was refused: larger than
        the buffer or than one upload, or the buffer full with ``OnFull.REJECT_NEW``."""
        line = json.dumps(record, separators=(",", ":")).encode() + b"\n"
        if len(line) > self.max_bytes or len(line) > MAX_CAPTURE_UPLOAD_BYTES:
            self._drop(1)
            return False
        if self.size_bytes + len(line) > self.max_bytes:
            if self.on_full is OnFull.REJECT_NEW:
                self._drop(1)
                return False
            self._drop_oldest(self.size_bytes + len(line) - self.max_bytes)
        active = max(self._sizes)
        if self._sizes[active] >= self.segment_bytes:
            active += 1
            self._sizes[active] = 0
        with open(self._path(active), "ab") as f:
            f.write(line)
        self._sizes[active] += len(line)
        self._count += 1
        return True

    def _drop(self, n: int) -> None:
        self.dropped += n
        self._save_cursor()

    def _drop_oldest(self, need: int) -> None:
        freed = dropped = 0
        for seq, end, line in self._iter_from(self._cursor):
            freed += len(line)
            dropped += 1
            self._cursor = (seq, end)
            if freed >= need:
                break
        self._count -= dropped
        self._normalize()
        self._drop(dropped)

    def take_batch(self, max_bytes: int) -> Batch | None:
        """The oldest live records up to ``max_bytes`` (at least one), or None when empty."""
        records: list[bytes] = []
        ends: list[tuple[int, int]] = []
        total = 0
        for seq, end, line in self._iter_from(self._cursor):
            if records and total + len(line) > max_bytes:
                break
            records.append(line)
            ends.append((seq, end))
            total += len(line)
        return Batch(records, ends) if records else None

    def ack(self, batch: Batch) -> None:
        """Remove what ``batch`` held (records dropped meanwhile are not removed twice)."""
        if self._remove(batch):
            self._save_cursor()

    def discard(self, batch: Batch) -> None:
        """Remove what ``batch`` held as dropped (counted): the fleet refused it for good."""
        removed = self._remove(batch)
        if removed:
            self._drop(removed)

    def _remove(self, batch: Batch) -> int:
        """Move the cursor past ``batch``; the number of records that removed."""
        removed = sum(1 for e in batch.ends if e > self._cursor)
        if not removed:
            return 0
        self._cursor = max(self._cursor, batch.ends[-1])
        self._count -= removed
        self._normalize()
        return removed
