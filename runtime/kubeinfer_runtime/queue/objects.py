"""Object I/O of async requests: read the input, write the output or failure object.

``s3://`` goes through the minio SDK (thread-safe; callers run these blocking
calls in a thread), ``file://`` through the filesystem with an atomic rename so
a reader never sees half an output. Writes to one key are idempotent by design:
a request processed twice overwrites the same object with the same kind of
content.

Reads are bounded and confined: an input is read in chunks and refused as
soon as it exceeds ``max_read_bytes`` (never slurped: ``/dev/zero`` or a 50 GB
object costs one chunk), file:// inputs must be regular files whose real path
(symlinks resolved) lies below one of ``file_roots``, and no message ever
quotes an object's bytes.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

from kubeinfer_runtime.contract import S3Settings
from kubeinfer_runtime.errors import NotFound, NotReady, PayloadTooLarge, ValidationError
from kubeinfer_runtime.storage.fetch import s3_client

if TYPE_CHECKING:
    from minio import Minio
    from minio.error import S3Error

_MISSING_CODES = {"NoSuchKey", "NoSuchBucket", "NoSuchObject", "NotFound"}
#: S3 error codes of a store that is down or overloaded rather than refusing this request.
_OUTAGE_CODES = {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout"}
#: Reads go in chunks of this size, so a bound is enforced within one chunk.
_CHUNK = 1 << 20


class InputNotFound(NotFound):
    """The request's InputLocation names nothing."""


class ObjectStoreError(NotReady):
    """The object store failed or refused; another attempt may succeed (transient)."""


class StoreUnreachable(ObjectStoreError):
    """The object store cannot be reached, or answers 5xx: the whole store is down, not one
    object (workers pause taking new requests and probe it, see ``retry_policy``)."""


class InputTooLarge(PayloadTooLarge):
    """The input object is bigger than the endpoint's maxInputBytes."""


class InputRefused(ValidationError):
    """The input may not be read: not a regular file, or outside the allowed folders."""


def _split(uri: str) -> tuple[str, str, str]:
    """``(scheme, bucket, key)``; for file:// bucket is "" and key the path."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        return "s3", parsed.netloc, unquote(parsed.path.lstrip("/"))
    return "file", "", unquote(parsed.path)


def _outage(error: S3Error) -> bool:
    status = getattr(error.response, "status", 0) or 0
    return error.code in _OUTAGE_CODES or int(status) >= 500


class ObjectStore:
    """Reads and writes whole objects by URI; one instance per worker process."""

    def __init__(self, s3: S3Settings, *, connections: int = 10,
                 max_read_bytes: int = 1 << 30, file_roots: Iterable[str] = ()) -> None:
        self._s3 = s3
        self._connections = connections
        self._client: Minio | None = None
        self.max_read_bytes = max_read_bytes
        #: Real paths (symlinks resolved) file:// inputs must lie below.
        self.file_roots = tuple(os.path.realpath(r).rstrip("/") + "/" for r in file_roots)

    def _minio(self) -> Minio:
        if self._client is None:
            self._client = s3_client(self._s3, maxsize=self._connections)
        return self._client

    def read(self, uri: str) -> bytes:
        scheme, bucket, key = _split(uri)
        if scheme == "file":
            return self._read_file(uri, key)
        from minio.error import S3Error

        try:
            resp = self._minio().get_object(bucket, key)
        except S3Error as e:
            if e.code in _MISSING_CODES:
                raise InputNotFound(f"Input object {uri} does not exist ({e.code}): upload it "
                                    "before invoking, or fix the InputLocation") from None
            if _outage(e):
                raise StoreUnreachable(f"Object store failed reading {uri} ({e.code}): "
                                       "retrying until it recovers") from None
            raise ObjectStoreError(f"Input object {uri} cannot be read ({e.code}): check the "
                                   "worker's S3 credentials and the bucket policy") from None
        except ValueError as e:  # refused by the SDK before any request (a bad bucket name)
            raise InputRefused(f"Input object {uri} cannot be named in S3 ({e}): fix the "
                               "InputLocation") from None
        except Exception as e:
            raise StoreUnreachable(f"Object store is unreachable reading {uri} "
                                   f"({type(e).__name__}): check KUBEINFER_S3_ENDPOINT_URL"
                                   ) from None
        try:
            declared = resp.headers.get("content-length")
            if declared is not None and declared.isdigit():
                self._check_size(uri, int(declared))
            return self._bounded(uri, resp.stream(_CHUNK))
        except (InputTooLarge, InputRefused):
            raise
        except Exception as e:
            raise StoreUnreachable(f"Reading {uri} failed midway ({type(e).__name__}): "
                                   "retrying") from None
        finally:
            resp.close()
            resp.release_conn()

    def _check_size(self, uri: str, size: int) -> None:
        if size > self.max_read_bytes:
            raise InputTooLarge(f"Input object {uri} is {size} bytes, over the endpoint's "
                                f"maxInputBytes ({self.max_read_bytes} bytes): split the input, "
                                "or raise spec.async.maxInputBytes")

    def _bounded(self, uri: str, chunks: Iterable[bytes]) -> bytes:
        """Join ``chunks`` while within the bound; refuse at the first chunk past it."""
        parts: list[bytes] = []
        size = 0
        for chunk in chunks:
            size += len(chunk)
            if size > self.max_read_bytes:
                raise InputTooLarge(f"Input object {uri} is over the endpoint's maxInputBytes "
                                    f"({self.max_read_bytes} bytes): split the input, or raise "
                                    "spec.async.maxInputBytes")
            parts.append(chunk)
        return b"".join(parts)

    def _read_file(self, uri: str, path: str) -> bytes:
        real = os.path.realpath(path)
        if self.file_roots and not any(real.startswith(r) for r in self.file_roots):
            raise InputRefused(f"Input object {uri} resolves outside the endpoint's file:// "
                               "input paths (a symbolic link?): name a file below them")
        try:
            # O_NONBLOCK: opening a FIFO must not hang; O_NOFOLLOW: the checked path is the
            # one opened.
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise InputNotFound(f"Input object {uri} does not exist: upload it before "
                                "invoking, or fix the InputLocation") from None
        except OSError as e:
            raise InputRefused(f"Input object {uri} cannot be opened ({e.strerror}): check "
                               "the file's permissions") from None
        with os.fdopen(fd, "rb", buffering=0) as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise InputRefused(f"Input object {uri} is not a regular file: name a file, "
                                   "not a device, pipe or directory")
            self._check_size(uri, info.st_size)
            try:
                return self._bounded(uri, iter(lambda: f.read(_CHUNK), b""))
            except OSError as e:
                raise ObjectStoreError(f"Input object {uri} cannot be read ({e.strerror})"
                                       ) from None

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
            if _outage(e):
                raise StoreUnreachable(f"Object store failed writing {uri} ({e.code}): "
                                       "retrying until it recovers") from None
            raise ObjectStoreError(f"Output object {uri} cannot be written ({e.code}): check "
                                   "the bucket exists and the worker may write to it") from None
        except Exception as e:
            raise StoreUnreachable(f"Object store is unreachable writing {uri} "
                                   f"({type(e).__name__}): check KUBEINFER_S3_ENDPOINT_URL"
                                   ) from None

    def probe(self, uri: str) -> None:
        """Whether the store holding ``uri`` answers: StoreUnreachable when it does not.

        One cheap call (does the bucket exist); any answer from the server counts,
        a refusal included: the probe asks "is it up", not "may I write". file://
        locations are local folders: always up.
        """
        scheme, bucket, _ = _split(uri)
        if scheme == "file":
            return
        from minio.error import S3Error

        try:
            self._minio().bucket_exists(bucket)
        except S3Error as e:
            if _outage(e):
                raise StoreUnreachable(f"Object store answers {e.code}") from None
        except Exception as e:
            raise StoreUnreachable(f"Object store is unreachable ({type(e).__name__})"
                                   ) from None
