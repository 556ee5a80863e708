"""The route-table file: notice changes, parse, keep the last good table.

On Kubernetes the file is a mounted ConfigMap, which kubelet updates by
swapping a symlink (``..data``) atomically; in local mode the operator writes
it with ``os.replace``. Both give a new inode, and an in-place edit changes the
size or mtime, so comparing ``(device, inode, size, mtime_ns)`` of the resolved
file is enough to notice every update without reading the file on each poll.

The rules (issue 2): a missing file means "no endpoints yet" (the gateway still
answers /ping, every endpoint is 404); an invalid file never replaces the last
good table, it is only reported; a file that disappears later keeps the last
table too (a ConfigMap is never deleted under a running gateway on purpose).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from pydantic import ValidationError

from kubeinfer_runtime.contract import RouteTable


@dataclass(frozen=True, slots=True)
class FileSignature:
    dev: int
    ino: int
    size: int
    mtime_ns: int


def file_signature(path: Path) -> FileSignature | None:
    """Signature of the file ``path`` resolves to (symlinks followed); None if absent."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return FileSignature(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def parse_route_table(data: bytes) -> RouteTable | str:
    """The table in ``data``, or a one-line description of what is wrong with it."""
    try:
        return RouteTable.from_json(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_url=False):
            loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
            problems.append(f"{loc}: {err['msg']}")
        return "; ".join(problems)


class Outcome(StrEnum):
    UNCHANGED = "unchanged"
    LOADED = "loaded"
    INVALID = "invalid"
    MISSING = "missing"


@dataclass(frozen=True, slots=True)
class PollResult:
    outcome: Outcome
    #: The table now in force (the last good one), or None before any was loaded.
    table: RouteTable | None
    #: What is wrong with the file, for INVALID.
    error: str | None = None


_NEVER = FileSignature(-1, -1, -1, -1)


class RouteTableFile:
    """Polls one route-table file and remembers the last good table."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.table: RouteTable | None = None
        self._seen: FileSignature | None = _NEVER

    def poll(self) -> PollResult:
        sig = file_signature(self.path)
        if sig == self._seen:
            return PollResult(Outcome.UNCHANGED, self.table)
        self._seen = sig
        if sig is None:
            return PollResult(Outcome.MISSING, self.table)
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            # Swapped away between stat and read: look again next poll.
            self._seen = _NEVER
            return PollResult(Outcome.MISSING, self.table)
        except OSError as exc:
            return PollResult(Outcome.INVALID, self.table, f"cannot read the file: {exc}")
        parsed = parse_route_table(data)
        if isinstance(parsed, str):
            return PollResult(Outcome.INVALID, self.table, parsed)
        self.table = parsed
        return PollResult(Outcome.LOADED, parsed)
