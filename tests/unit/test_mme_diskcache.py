"""The multi-model disk cache: bounded by bytes, LRU, never deletes a file being loaded."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubeinfer_runtime.errors import InsufficientStorage, NotReady
from kubeinfer_runtime.storage.diskcache import DiskCache


def _writer(cache: DiskCache, key: str, size: int) -> Path:
    def download() -> Path:
        path = cache.root / key / "model.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * size)
        return path
    got = cache.get(key, size, download)
    return got


def test_lru_eviction_keeps_disk_use_within_budget(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path / "disk", budget_bytes=100)
    a = _writer(cache, "a", 40)
    b = _writer(cache, "b", 40)
    cache.unpin("a")
    cache.unpin("b")
    assert cache.get("a", 40, lambda: pytest.fail("a is cached")) == a  # hit; a is now MRU
    cache.unpin("a")
    c = _writer(cache, "c", 40)
    assert a.is_file() and c.is_file() and not b.exists()
    assert cache.used_bytes == 80
    total = sum(p.stat().st_size for p in (tmp_path / "disk").rglob("*.onnx"))
    assert total <= 100


def test_pinned_files_are_not_deleted_and_oversize_is_refused(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path / "disk", budget_bytes=100)
    a = _writer(cache, "a", 60)  # still pinned: being loaded
    with pytest.raises(NotReady):
        _writer(cache, "b", 60)
    assert a.is_file() and cache.used_bytes == 60
    with pytest.raises(InsufficientStorage):
        _writer(cache, "huge", 101)


def test_a_failed_download_frees_its_reservation(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path / "disk", budget_bytes=100)

    def broken() -> Path:
        raise OSError("connection reset")
    with pytest.raises(OSError):
        cache.get("a", 60, broken)
    assert cache.used_bytes == 0
