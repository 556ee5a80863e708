"""The multi-model endpoint's local disk cache: downloaded model files, bounded by bytes.

Models evicted from memory stay on disk so a reload skips the download, but
the disk is finite too (an emptyDir on Kubernetes): files are evicted least
recently used first when a new download would exceed the budget. A file being
loaded into memory right now is pinned and never deleted under the loader.
Called from loader threads, so every method takes the lock; downloads run
outside it.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kubeinfer_runtime.errors import InsufficientStorage, NotReady

log = logging.getLogger("kubeinfer.cache")


@dataclass
class _File:
    path: Path
    size: int
    pins: int = 0


class DiskCache:
    def __init__(self, root: Path, budget_bytes: int) -> None:
        self.root = root
        self.budget_bytes = budget_bytes
        self.used_bytes = 0
        self._files: OrderedDict[str, _File] = OrderedDict()
        self._lock = threading.Lock()
        # Files left by an earlier process are not accounted for: start empty.
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)

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
