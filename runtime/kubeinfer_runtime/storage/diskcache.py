"""The multi-model endpoint's local disk cache: downloaded model files, bounded by bytes.

Models evicted from memory stay on disk so a reload skips the download, but
the disk is finite too (an emptyDir on Kubernetes): files are evicted least
recently used first when a new download would exceed the budget. A file being
loaded into memory right now is pinned and never deleted under the loader.
Called from loader threads, so every method takes the lock; downloads run
outside it.

The folder given is shared by every process of a model server (uvicorn's
``KUBEINFER_WORKERS``, local mode's replicas of a variant), so each process
caches in a folder of its own under it (``<pid>-<random>``), named by an
flock'ed ``<name>.lock`` beside it for as long as the process lives. A process
never touches another's files: a starting one removes only the folders whose
lock nobody holds (their process is gone), under an flock of the shared
folder (``.lock``), so no two starts race. The budget is per process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kubeinfer_runtime.errors import InsufficientStorage, NotReady

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock, no sharing to guard
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("kubeinfer.cache")

_LOCK = ".lock"


@dataclass
class _File:
    path: Path
    size: int
    pins: int = 0


def _try_flock(fd: int) -> bool:
    """Whether this process now holds ``fd``'s flock (False: another process does; without
    flock, every folder counts as held, so none is ever removed)."""
    if fcntl is None:  # pragma: no cover - Windows
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _claim(shared: Path) -> tuple[Path, int]:
    """A fresh folder of this process under ``shared`` and the fd whose flock names it
    live; removes the folders of processes that are gone (their lock is free)."""
    shared.mkdir(parents=True, exist_ok=True)
    guard = os.open(shared / _LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if fcntl is not None:
            fcntl.flock(guard, fcntl.LOCK_EX)  # held for milliseconds, by starting processes
        name = f"{os.getpid()}-{secrets.token_hex(4)}"
        mine = os.open(shared / f"{name}{_LOCK}", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        _try_flock(mine)
        for entry in shared.iterdir():
            if entry.name == _LOCK or entry.name.startswith(name):
                continue
            if entry.name.endswith(_LOCK):
                fd = os.open(entry, os.O_RDWR)
                try:
                    if not _try_flock(fd):
                        continue  # a live process's folder
                    shutil.rmtree(shared / entry.name[:-len(_LOCK)], ignore_errors=True)
                    entry.unlink(missing_ok=True)
                finally:
                    os.close(fd)
            elif not (shared / f"{entry.name}{_LOCK}").exists():
                # Left by an earlier layout, or by a process that died while being removed.
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
        root = shared / name
        root.mkdir()
        return root, mine
    finally:
        os.close(guard)  # releases the flock


class DiskCache:
    def __init__(self, root: Path, budget_bytes: int) -> None:
        """``root`` may be shared with other processes; this one caches in a folder of its
        own under it (``self.root``), created empty."""
        self.root, self._owner_fd = _claim(root)
        self.budget_bytes = budget_bytes
        self.used_bytes = 0
        self._files: OrderedDict[str, _File] = OrderedDict()
        self._lock = threading.Lock()

    def close(self) -> None:
        """Remove this process's folder (a process that exits without it leaves the folder
        to the next process that starts)."""
        shutil.rmtree(self.root, ignore_errors=True)
        lock = self.root.with_name(self.root.name + _LOCK)
        lock.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            os.close(self._owner_fd)

    def get(self, key: str, size: int, download: Callable[[], Path]) -> Path:
        """The local file of ``key``, downloading it (``size`` bytes) when absent; pinned.

        Call :meth:`unpin` once the file has been loaded.
        """
        with self._lock:
            f = self._files.get(key)
            if f is not None and f.path.is_file():
                f.pins += 1
                self._files.move_to_end(key)
                return f.path
            if f is not None:  # deleted behind our back: forget it
                self._forget(key)
            self._make_room(key, size)
            self.used_bytes += size
            self._files[key] = _File(Path(), size, pins=1)
        try:
            path = download()
        except BaseException:
            with self._lock:
                self._forget(key)
            raise
        with self._lock:
            self._files[key].path = path
        return path

    def unpin(self, key: str) -> None:
        with self._lock:
            f = self._files.get(key)
            if f is not None and f.pins:
                f.pins -= 1

    def _make_room(self, key: str, size: int) -> None:
        if size > self.budget_bytes:
            raise InsufficientStorage(
                f'Model "{key}" needs {size} bytes on disk but the disk cache holds '
                f"{self.budget_bytes} bytes in all: raise multiModel.diskCacheBytes")
        for name in list(self._files):
            if self.used_bytes + size <= self.budget_bytes:
                return
            if self._files[name].pins == 0:
                self._evict(name)
        if self.used_bytes + size > self.budget_bytes:
            raise NotReady(f'Model "{key}" cannot be downloaded: the disk cache '
                           f"({self.budget_bytes} bytes) is full of models being loaded; retry")

    def _evict(self, key: str) -> None:
        f = self._files[key]
        if f.path.name:
            f.path.unlink(missing_ok=True)
            f.path.with_name(f.path.name + ".sha256").unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # shared or already gone
                f.path.parent.rmdir()
        log.debug("Evicted %s from the disk cache (%d bytes)", key, f.size)
        self._forget(key)

    def _forget(self, key: str) -> None:
        f = self._files.pop(key, None)
        if f is not None:
            self.used_bytes -= f.size
