"""The fleet server's object I/O: stream a package to a device, write a capture batch.

Packages are read where the operator put them (``PackageRef.uri``: file:// or s3://)
and streamed in chunks, never held whole: a package may be hundreds of MB and many
devices download at once. Capture batches go through the async worker's
``ObjectStore`` (atomic file:// writes, s3:// through the minio SDK), one object per
upload, named ``<destination>/<fleet>/<deviceId>/yyyy/mm/dd/hh/<uuid>.jsonl`` (UTC)
like SageMaker's data capture layout. Blocking calls run in threads.
"""

from __future__ import annotations

import asyncio
import os
import stat
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime

from kubeinfer_runtime.contract import S3Settings
from kubeinfer_runtime.contract.edge import PackageRef
from kubeinfer_runtime.errors import NotReady, RuntimeServiceError
from kubeinfer_runtime.queue.objects import ObjectStore
from kubeinfer_runtime.storage.fetch import s3_client
from kubeinfer_runtime.storage.uri import FileLocation, parse_model_uri

_CHUNK = 1 << 20
_MISSING_CODES = {"NoSuchKey", "NoSuchBucket", "NoSuchObject", "NotFound"}


class PackageUnavailable(NotReady):
    """A package the config names cannot be read (not uploaded yet, store down)."""


def capture_uri(destination: str, fleet: str, device_id: str, now: float) -> str:
    """Where one capture batch goes (``device_id`` is validated against NAME_PATTERN)."""
    t = datetime.fromtimestamp(now, UTC)
    return (f"{destination.rstrip('/')}/{fleet}/{device_id}/{t:%Y/%m/%d/%H}/"
            f"{uuid.uuid4().hex}.jsonl")


async def _iterate(chunks: Iterator[bytes], close: object = None) -> AsyncIterator[bytes]:
    """Pull each blocking chunk in a thread so the event loop keeps serving."""
    sentinel = b""
    try:
        while True:
            chunk = await asyncio.to_thread(next, chunks, sentinel)
            if not chunk:
                return
            yield chunk
    finally:
        if callable(close):
            await asyncio.to_thread(close)


class Blobs:
    """Package reads and capture writes for one fleet server process."""

    def __init__(self, s3: S3Settings) -> None:
        self._s3 = s3
        self._store = ObjectStore(s3, connections=16)

    async def open_package(self, version: str, target: str, ref: PackageRef
                           ) -> tuple[int, AsyncIterator[bytes]]:
        """``(size, chunks)`` of the package; PackageUnavailable when it cannot be read."""
        what = f"Package of version {version} for target {target}"
        try:
            loc = parse_model_uri(ref.uri)
        except RuntimeServiceError:
            raise PackageUnavailable(f"{what} has an unusable URI in the fleet config: fix "
                                     "the EdgeFleet's packages") from None
        if isinstance(loc, FileLocation):
            return await asyncio.to_thread(self._open_file, what, loc.path)
        return await asyncio.to_thread(self._open_s3, what, loc.bucket, loc.key)

    def _open_file(self, what: str, path: str) -> tuple[int, AsyncIterator[bytes]]:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise PackageUnavailable(f"{what} cannot be opened ({e.strerror}): the operator "
                                     "has not written it yet, or the volume is missing") from None
        f = os.fdopen(fd, "rb", buffering=0)
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            f.close()
            raise PackageUnavailable(f"{what} is not a regular file: fix the package URI")
        return info.st_size, _iterate(iter(lambda: f.read(_CHUNK), b""), f.close)

    def _open_s3(self, what: str, bucket: str, key: str) -> tuple[int, AsyncIterator[bytes]]:
        from minio.error import S3Error

        try:
            resp = s3_client(self._s3).get_object(bucket, key)
        except S3Error as e:
            reason = "missing" if e.code in _MISSING_CODES else "refused"
            raise PackageUnavailable(f"{what} cannot be read from the object store "
                                     f"({reason}: {e.code})") from None
        except Exception as e:
            raise PackageUnavailable(f"{what}: the object store is unreachable "
                                     f"({type(e).__name__}): check "
                                     "KUBEINFER_S3_ENDPOINT_URL") from None
        declared = resp.headers.get("content-length")
        size = int(declared) if declared and declared.isdigit() else -1

        def close() -> None:
            resp.close()
            resp.release_conn()

        return size, _iterate(iter(resp.stream(_CHUNK)), close)

    async def write_capture(self, uri: str, data: bytes) -> None:
        """Write one capture batch (ObjectStoreError, a 503, when the store fails)."""
        await asyncio.to_thread(self._store.write, uri, data, "application/jsonl")
