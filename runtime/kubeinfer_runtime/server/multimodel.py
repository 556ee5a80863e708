"""The multi-model endpoint's loader: target name → size, local file, loaded model.

Implements ``models.cache.Loader`` for the model server: sizes come from a
stat of the object (or file) before anything is downloaded, so a model that
cannot fit is refused without reading it; downloads go through the bounded
``DiskCache``; loading and warm-up reuse the single-model procedure. Every
slow step runs in the loader thread pool, never on the event loop.

The server's readiness stays "the model store is reachable" (models load on
demand), but a model's own readiness means "answers", as for a single model:
one that loads and then fails its warm-up inference is a failed load (424
with the reason to the requests that waited for it), never cached, so the
next request tries again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubeinfer_runtime.contract import ModelServerSettings
from kubeinfer_runtime.errors import ModelError, NotFound
from kubeinfer_runtime.metrics import MultiModelMetrics
from kubeinfer_runtime.models.base import ModelLoadError
from kubeinfer_runtime.models.registry import create_backend
from kubeinfer_runtime.models.warmup import WarmupStatus, run_warmup
from kubeinfer_runtime.server.state import (
    LOAD_FAILED_MARKER,
    LoadedModel,
    choose_inline,
    log_warmup,
    warmup_failure,
)
from kubeinfer_runtime.storage.diskcache import DiskCache
from kubeinfer_runtime.storage.fetch import (
    StorageUnavailable,
    access_denied_hint,
    fetch_model,
    length_problem,
    s3_client,
)
from kubeinfer_runtime.storage.target import (
    InvalidTargetModel,
    ModelPrefix,
    check_target,
    parse_prefix,
)
from kubeinfer_runtime.storage.uri import S3Location

if TYPE_CHECKING:
    from minio import Minio

log = logging.getLogger("kubeinfer.server")


class MultiModelStore:
    """Where a multi-model server's models come from (the cache's ``Loader``)."""

    def __init__(self, settings: ModelServerSettings, metrics: MultiModelMetrics,
                 pool: ThreadPoolExecutor) -> None:
        assert settings.multi_model_prefix is not None
        self.settings = settings
        self.metrics = metrics
        self.pool = pool
        self.prefix: ModelPrefix = parse_prefix(settings.multi_model_prefix,
                                                settings.model_base_dir)
        self.disk = DiskCache(Path(settings.model_cache_dir) / "multi-model",
                              settings.disk_cache_bytes)
        self._client: Minio | None = None
        #: Why models cannot be loaded yet; None once the store is usable.
        self.not_ready: str | None = (
            f"Connecting to the model store {settings.multi_model_prefix}"
            if self.prefix.scheme == "s3" else None)

    def client(self) -> Minio:
        if self._client is None:
            self._client = s3_client(self.settings.s3())
        return self._client

    def warm_up(self) -> None:
        """Build the S3 client before the first request needs it (importing minio takes
        about half a second); until then /ping answers 503."""
        try:
            self.client()
        except Exception as e:
            self.not_ready = f"Cannot use the model store {self.prefix.uri}: {e}"
            log.error("%s", self.not_ready)
            return
        self.not_ready = None

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    # ------------------------------------------------------------------ Loader

    async def size(self, name: str) -> int:
        size: int = await self._run(self._stat, check_target(name))
        return size

    async def load(self, name: str, size: int) -> LoadedModel:
        # The size comes with the call, not through a dict kept here: a load that never
        # followed its size (too big for the cache, no room) left its name behind, one
        # per name a caller tried.
        model: LoadedModel = await self._run(self._load, name, size)
        return model

    def unload(self, name: str, value: LoadedModel) -> None:
        # Only the cache held the model (no request is in flight when it lets
        # go), so dropping the reference frees the onnxruntime session at once.
        # Not Backend.unload(): its full gc pass, at eviction rates, stalled
        # every thread for tens of milliseconds (GIL) and tripled miss latency.
        del value
        log.debug('Model "%s" unloaded from the multi-model cache', name)

    # ------------------------------------------------------------------ threads

    def _stat(self, name: str) -> int:
        loc = self.prefix.locate(name)
        where = self.prefix.describe(name)
        if isinstance(loc, S3Location):
            from minio.error import S3Error

            try:
                size = int(self.client().stat_object(loc.bucket, loc.key).size or 0)
            except S3Error as e:
                if e.code in ("NoSuchKey", "NoSuchObject", "NotFound", "NoSuchBucket"):
                    raise _unknown(name, where) from None
                raise StorageUnavailable(f"Model {where} cannot be read ({e.code}): check the "
                                         "S3 credentials and bucket policy"
                                         f"{access_denied_hint(e.code)}") from None
            except Exception as e:
                raise StorageUnavailable(f"Object store is unreachable while looking up {where} "
                                         f"({e}): check KUBEINFER_S3_ENDPOINT_URL") from None
            problem = length_problem(where, size, max_bytes=self.settings.max_model_bytes,
                                     expect_bytes=None, complete=True)
            if problem is not None:
                raise problem
            return size
        try:
            path = self._safe_path(name, loc.path)
            if not path.is_file():
                raise _unknown(name, where)
            return path.stat().st_size
        except OSError as e:  # a name the filesystem refuses (too long, not a directory...)
            raise _unknown(name, f"{where} ({e.strerror})") from None

    def _safe_path(self, name: str, path: str) -> Path:
        """The real path of a file:// model; refuses symlinks that leave the prefix."""
        root = os.path.realpath(self.prefix.root)
        real = os.path.realpath(path)
        if os.path.commonpath([root, real]) != root:
            raise InvalidTargetModel(f'Target model "{name}" resolves outside the multi-model '
                                     "prefix (a symbolic link): name a model inside the prefix")
        return Path(real)

    def _load(self, name: str, size: int) -> LoadedModel:
        settings = self.settings
        loc = self.prefix.locate(name)
        t0 = time.perf_counter()
        pinned = False
        if isinstance(loc, S3Location):
            def download() -> Path:
                # Never more than the disk cache made room for (the size ``_stat`` saw).
                return fetch_model(loc.uri, base_dir=settings.model_base_dir,
                                   cache_dir=str(self.disk.root), s3=settings.s3(),
                                   max_bytes=settings.max_model_bytes,
                                   expect_bytes=size or None).path

            path = self.disk.get(name, size, download)
            pinned = True
        else:
            path = self._safe_path(name, loc.path)
        t1 = time.perf_counter()
        self.metrics.download_seconds.observe(t1 - t0)
        try:
            backend = create_backend(settings.model_format,
                                     intra_op_threads=settings.intra_op_threads)
            try:
                backend.load(path)
            except ModelLoadError as e:
                raise ModelError(f'Model "{name}" cannot be loaded: {e}') from None
            meta = backend.metadata()
            result = run_warmup(backend, meta)
        finally:
            if pinned:
                self.disk.unpin(name)
        self.metrics.load_seconds.observe(time.perf_counter() - t1)
        if result.status is WarmupStatus.FAILED:
            del backend  # only this frame held it: the session is freed now
            reason = (f'Model "{name}" {LOAD_FAILED_MARKER}: ' + warmup_failure(
                result, "fix the model, or upload a working one under the same name"))
            log.error("%s", reason)
            raise ModelError(reason)
        log_warmup(name, result)
        warmup_s = result.latency_s
        log.info('Model "%s" loaded into the multi-model cache (%d bytes)', name, size)
        # The version is the file's identity; hashing every model would cost a
        # second read of each file for a field only metadata calls show.
        version = f"{size:x}"
        return LoadedModel(backend, meta, version.rjust(12, "0"),
                           choose_inline(settings.inference_mode, warmup_s), warmup_s)


def _unknown(name: str, where: str) -> NotFound:
    return NotFound(f'Model "{name}" not found at {where}: check TargetModel, or upload the '
                    "model under the endpoint's multi-model prefix")
