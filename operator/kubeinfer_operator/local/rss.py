"""How much memory a local model server uses: RSS of its process tree, from /proc (Linux).

The I/O half of memory-limit enforcement (``memory`` decides). It reads
``/proc/<pid>/statm`` (resident pages) of the process and of every descendant
(uvicorn workers when ``KUBEINFER_WORKERS`` > 1), a few small reads per
process, so measuring twice a second costs the supervisor nothing that matters
and the model servers nothing at all.

What is counted, and why:

* Each process's whole resident set, shared pages included. A model server
  forked from local mode's fork server (``prefork``) shares the pre-imported
  runtime with it copy-on-write; those pages count for the model server, not
  for the fork server, because in its own pod it would have imported them
  itself. The fork server is no descendant of any model server, so it is never
  counted (it does not exist on Kubernetes).
* RSS, not a cgroup's usage: no page cache, so a model server reading large
  files is not charged for them; pages shared by a uvicorn master and its
  workers count once per process (a cgroup counts them once), so several
  workers are killed somewhat earlier than in a pod — on the safe side.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_PROC = Path("/proc")


def process_rss(pid: int) -> int | None:
    """Resident bytes of one process; None when it is gone (a zombie has 0)."""
    try:
        fields = (_PROC / str(pid) / "statm").read_bytes().split()
        return int(fields[1]) * _PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return None


def _children(pid: int) -> list[int] | None:
    """Direct children from ``/proc/<pid>/task/*/children``; None when the kernel
    lacks that file (CONFIG_PROC_CHILDREN) and /proc must be scanned instead."""
    found: list[int] = []
    try:
        tasks = list((_PROC / str(pid) / "task").iterdir())
    except OSError:
        return []  # gone: no children to count
    for task in tasks:
        try:
            found += [int(c) for c in (task / "children").read_bytes().split()]
        except FileNotFoundError:
            if task.name == str(pid) and (task / "stat").exists():
                return None  # the thread is there, the file is not: no kernel support
        except (OSError, ValueError):
            continue  # a thread that exited meanwhile
    return found


def _parents() -> dict[int, list[int]]:
    """Every process's children, from one scan of /proc/*/stat (the slow fallback)."""
    tree: dict[int, list[int]] = {}
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_bytes()
        except OSError:
            continue
        # The command name (field 2) is in parentheses and may hold spaces.
        fields = raw[raw.rfind(b")") + 2:].split()
        try:
            tree.setdefault(int(fields[1]), []).append(int(entry.name))
        except (IndexError, ValueError):
            continue
    return tree


def descendants(pid: int) -> list[int]:
    """Children, grandchildren, ... of ``pid`` (without ``pid``)."""
    out: list[int] = []
    seen = {pid}
    pending = [pid]
    tree: dict[int, list[int]] | None = None
    while pending:
        current = pending.pop()
        kids: Iterable[int] | None = _children(current)
        if kids is None:
            if tree is None:
                tree = _parents()
            kids = tree.get(current, [])
        for kid in kids:
            if kid not in seen:  # pids can be reused mid-walk: never loop
                seen.add(kid)
                out.append(kid)
                pending.append(kid)
    return out


def tree_rss(pid: int) -> int | None:
    """Resident bytes of ``pid`` and its descendants; None when ``pid`` is gone."""
    own = process_rss(pid)
    if own is None:
        return None
    return own + sum(process_rss(kid) or 0 for kid in descendants(pid))
