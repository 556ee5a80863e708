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
quotes an object's bytes. An input is read into one buffer of the size the
store declares (Content-Length, st_size), so reading it costs its size once,
not twice (chunks, then their join): a 1 GB input is a 1 GB worker, not 2 GB.
The buffer is a ``bytearray``, returned as it is: ``bytes(buffer)`` would be
the second copy the single buffer avoids, and the codec takes either.

What the store refuses for one request is permanent, so a bad request fails at
once instead of holding a worker for the transient budget: an input S3 refuses
as a bad request (``_REFUSED_CODES``: a key too long, an archived object) is
``InputRefused``; an output or failure object whose name cannot exist (too
long for S3 or for a file name) is ``LocationRefused``. Everything else the
store refuses (AccessDenied above all: credentials and bucket policies get
fixed) stays transient.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from collections.abc import Callable, Iterable
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
#: S3 error codes refusing this request's object for good (the key cannot exist, or the
#: object cannot be read as it is): the same request fails the same way on every try.
_BAD_NAME_CODES = {"KeyTooLongError", "InvalidObjectName"}
_REFUSED_CODES = _BAD_NAME_CODES | {"InvalidArgument", "InvalidRequest", "InvalidObjectState"}
#: file:// write errors of a name that cannot exist: too long, or invalid on the filesystem.
_BAD_NAME_ERRNOS = {errno.ENAMETOOLONG, errno.EINVAL}
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
    """The input may not be read: not a regular file, outside the allowed folders, or
    refused by S3 as a bad request (``_REFUSED_CODES``)."""


class LocationRefused(ValidationError):
    """An output or failure object cannot be written under its name, on any try: the
    name is too long or invalid for the store (permanent, unlike a store that fails)."""


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

    def read(self, uri: str) -> bytearray:
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
            if e.code in _REFUSED_CODES:
                raise InputRefused(f"Input object {uri[:300]} cannot be read: the object "
                                   f"store refuses the request ({e.code}): fix the "
                                   "InputLocation, or restore the object if it is "
                                   "archived") from None
            # AccessDenied and the like: credentials and bucket policies get fixed.
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
            length = resp.headers.get("content-length")
            declared = int(length) if length is not None and length.isdigit() else None
            if declared is not None:
                self._check_size(uri, declared)
            # urllib3's readinto reads into a temporary of the slice's size: one chunk.
            return self._bounded(uri, declared, resp.readinto)
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

    def _bounded(self, uri: str, declared: int | None,
                 readinto: Callable[[memoryview], int | None]) -> bytearray:
        """The whole object, read with ``readinto`` a chunk at a time into one buffer of
        the ``declared`` size; refused at the first chunk past the bound.

        A shorter object is what it holds (the buffer is cut, in place). A longer
        one (a file that grew since its size was read, a body without a declared
        length or decoded longer than sent) goes on growing the buffer by a
        chunk at a time, still bounded: only then can a resize copy it.
        """
        buf = bytearray(declared or 0)
        size = self._fill(buf, readinto)
        if size < len(buf):
            del buf[size:]
            return buf
        # Full: the end, unless there is more than declared. One byte tells (a chunk when
        # nothing was declared), so a small input does not cost a chunk.
        spare = bytearray(1 if declared else _CHUNK)
        while n := self._fill(spare, readinto):
            size += n
            if size > self.max_read_bytes:
                raise InputTooLarge(f"Input object {uri} is over the endpoint's maxInputBytes "
                                    f"({self.max_read_bytes} bytes): split the input, or raise "
                                    "spec.async.maxInputBytes")
            buf += memoryview(spare)[:n]
            if len(spare) < _CHUNK:
                spare = bytearray(_CHUNK)
        return buf

    @staticmethod
    def _fill(buf: bytearray, readinto: Callable[[memoryview], int | None]) -> int:
        """Read into ``buf`` until it is full or the object ends; how much was read. In
        slices of at most a chunk: a reader may allocate a temporary of the slice's size."""
        size = 0
        with memoryview(buf) as view:
            while size < len(buf):
                n = readinto(view[size:size + _CHUNK])
                if not n:
                    break
                size += n
        return size

    def _read_file(self, uri: str, path: str) -> bytearray:
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
                return self._bounded(uri, info.st_size, f.readinto)
            except OSError as e:
                raise ObjectStoreError(f"Input object {uri} cannot be read ({e.strerror})"
                                       ) from None

    def write(self, uri: str, data: bytes, content_type: str) -> None:
        scheme, bucket, key = _split(uri)
        if scheme == "file":
            self._write_file(uri, Path(key), data)
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
            if e.code in _BAD_NAME_CODES:
                raise LocationRefused(f"Object {uri[:300]} cannot be written: the object "
                                      f"store refuses its name ({e.code}): use a shorter "
                                      "S3OutputPathExtension or outputPath") from None
            raise ObjectStoreError(f"Output object {uri} cannot be written ({e.code}): check "
                                   "the bucket exists and the worker may write to it") from None
        except Exception as e:
            raise StoreUnreachable(f"Object store is unreachable writing {uri} "
                                   f"({type(e).__name__}): check KUBEINFER_S3_ENDPOINT_URL"
                                   ) from None

    @staticmethod
    def _write_file(uri: str, path: Path, data: bytes) -> None:
        tmp = ""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".write-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError as e:
            if tmp:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            if e.errno in _BAD_NAME_ERRNOS:
                # No retry makes such a name exist: say so now rather than loop.
                raise LocationRefused(f"Object {uri[:300]} cannot be written ({e.strerror}): "
                                      "its path cannot exist on this filesystem: use "
                                      "shorter folder and file names (at most 255 bytes "
                                      "each)") from None
            raise ObjectStoreError(f"Output object {uri} cannot be written ({e}): check "
                                   "the directory's permissions and free space") from None

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
