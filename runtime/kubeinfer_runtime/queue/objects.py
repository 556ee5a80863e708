"""Object I/O of async requests: read the input, write the output or failure object.

``s3://`` goes through the minio SDK (thread-safe; callers run these blocking
calls in a thread), ``file://`` through the filesystem with an atomic rename so
a reader never sees half an output. Writes to one key are idempotent by design:
a request processed twice overwrites the same object with the same kind of
content.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

from kubeinfer_runtime.contract import S3Settings
from kubeinfer_runtime.errors import NotFound, NotReady
from kubeinfer_runtime.storage.fetch import s3_client

if TYPE_CHECKING:
    from minio import Minio

_MISSING_CODES = {"NoSuchKey", "NoSuchBucket", "NoSuchObject", "NotFound"}


class InputNotFound(NotFound):
    """The request's InputLocation names nothing."""


class ObjectStoreError(NotReady):
    """The object store failed or refused; another attempt may succeed."""


def _split(uri: str) -> tuple[str, str, str]:
    """``(scheme, bucket, key)``; for file:// bucket is "" and key the path."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        return "s3", parsed.netloc, unquote(parsed.path.lstrip("/"))
    return "file", "", unquote(parsed.path)


class ObjectStore:
    """Reads and writes whole objects by URI; one instance per worker process."""

    def __init__(self, s3: S3Settings, *, connections: int = 10) -> None:
        self._s3 = s3
        self._connections = connections
        self._client: Minio | None = None

    def _minio(self) -> Minio:
        if self._client is None:
            self._client = s3_client(self._s3, maxsize=self._connections)
        return self._client

    def read(self, uri: str) -> bytes:
        scheme, bucket, key = _split(uri)
        if scheme == "file":
            try:
                return Path(key).read_bytes()
            except FileNotFoundError:
                raise InputNotFound(f"Input object {uri} does not exist: upload it before "
                                    "invoking, or fix the InputLocation") from None
            except OSError as e:
                raise ObjectStoreError(f"Input object {uri} cannot be read ({e})") from None
        from minio.error import S3Error

        try:
            resp = self._minio().get_object(bucket, key)
        except S3Error as e:
            if e.code in _MISSING_CODES:
                raise InputNotFound(f"Input object {uri} does not exist ({e.code}): upload it "
                                    "before invoking, or fix the InputLocation") from None
            raise ObjectStoreError(f"Input object {uri} cannot be read ({e.code}): check the "
                                   "worker's S3 credentials and the bucket policy") from None
        except Exception as e:
            raise ObjectStoreError(f"Object store is unreachable reading {uri} ({e}): check "
                                   "KUBEINFER_S3_ENDPOINT_URL") from None
        try:
            return resp.read()
        except Exception as e:
            raise ObjectStoreError(f"Reading {uri} failed midway ({e}): retrying") from None
        finally:
            resp.close()
            resp.release_conn()

    def write(self, uri: str, data: bytes, content_type: str) -> None:
        scheme, bucket, key = _split(uri)
        if scheme == "file":
            path = Path(key)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".write-")
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            except OSError as e:
                raise ObjectStoreError(f"Output object {uri} cannot be written ({e}): check "
                                       "the directory's permissions and free space") from None
            return
        import io

        from minio.error import S3Error

        try:
            self._minio().put_object(bucket, key, io.BytesIO(data), len(data),
                                     content_type=content_type or "application/octet-stream")
        except S3Error as e:
            raise ObjectStoreError(f"Output object {uri} cannot be written ({e.code}): check "
                                   "the bucket exists and the worker may write to it") from None
        except Exception as e:
            raise ObjectStoreError(f"Object store is unreachable writing {uri} ({e}): check "
                                   "KUBEINFER_S3_ENDPOINT_URL") from None
