"""Object access for batch jobs: ``s3://`` (minio SDK) and confined ``file://``.

What the worker needs and nothing more: list a folder, the size of an object,
stream an object from a byte offset (ranged GETs: never a whole large object in
memory), read a small object, write an object atomically, concatenate objects.

* Atomic writes: an S3 object appears only when its (multipart) upload
  completes; a file is written to a temporary name beside it and renamed. So a
  worker killed half way never leaves half an output under its real name.
* Concatenation (objects split over shards): S3 ``compose_object`` (server-side
  UploadPartCopy; SeaweedFS supports it) when S3's part rules allow it
  (:func:`composable`), else a streamed copy through a temporary file.
* Confinement: every ``file://`` path is resolved (symlinks included) and must lie
  below one of the job's roots (its input and output folders; a job with no file://
  folder reads and writes no file, whatever its plan lists); only regular files
  are read (``O_NOFOLLOW``, ``O_NONBLOCK``: a FIFO cannot hang a worker). Keys are
  checked for ``..``, empty segments and non-printable characters before any I/O,
  and percent-encoded into URIs (:func:`join`), so a key names exactly its object.

Blocking calls; the minio client is thread-safe, so callers use threads.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import os
import shutil
import stat
import tempfile
import threading
from collections.abc import Callable, Generator, Sequence
from typing import TYPE_CHECKING, BinaryIO, TypeVar
from urllib.parse import quote

from kubeinfer_runtime.batch.errors import InputRefused, StoreFailed
from kubeinfer_runtime.contract import S3Settings
from kubeinfer_runtime.contract.locations import split_location
from kubeinfer_runtime.storage.fetch import access_denied_hint, s3_client

if TYPE_CHECKING:
    from minio import Minio

T = TypeVar("T")

#: Bytes per read.
CHUNK = 1 << 20
#: Names of files being written (renamed into place when whole).
TEMP_PREFIX = ".kubeinfer-tmp-"
#: S3's smallest part of a multipart upload (all but the last).
_S3_MIN_PART = 5 << 20
#: S3's largest part (UploadPartCopy included) and most parts of a multipart upload.
_S3_MAX_PART = 5 << 30
_S3_MAX_PARTS = 10000
_MISSING = {"NoSuchKey", "NoSuchBucket", "NoSuchObject", "NotFound"}


def composable(sizes: Sequence[int]) -> bool:
    """Whether objects of these sizes can be joined by server-side copy (UploadPartCopy).

    A source over 5 GiB is copied as 5 GiB parts plus a remainder, and that remainder
    is a part too: unless it ends the object, it needs S3's 5 MiB as well (a source of
    5 GiB + 1 MiB would leave a 1 MiB part mid-object, which minio refuses with a
    ValueError and S3 with EntityTooSmall); the parts, not the sources, count towards
    the 10,000. Checked here so such a join is streamed instead of failing the job.
    """
    parts = 0
    for i, size in enumerate(sizes):
        tail = size % _S3_MAX_PART
        if i < len(sizes) - 1 and (size < _S3_MIN_PART or 0 < tail < _S3_MIN_PART):
            return False
        parts += max(1, -(-size // _S3_MAX_PART))
    return len(sizes) > 1 and parts <= _S3_MAX_PARTS


def key_problem(key: str) -> str | None:
    """Why ``key`` cannot be an object key mirrored under the output folder, else None.

    ``key`` is the key as it is used: the listed name, or a manifest entry taken
    literally (:func:`join` encodes it, so ``%2e%2e`` is a name, never ``..``).
    Keys end up quoted in messages and termination logs, hence printable only; a
    segment named like our temporary files would be deleted by finalize's sweep.
    """
    if not key or key.startswith("/"):
        return "is empty or absolute"
    if not key.isprintable():
        return "holds a control or other non-printable character"
    parts = key.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return "has an empty, '.' or '..' path segment"
    if any(p.startswith(TEMP_PREFIX) for p in parts):
        return (f"has a segment starting with {TEMP_PREFIX!r}, the name of the worker's "
                "temporary files (finalize deletes them)")
    return None


def join(prefix: str, key: str) -> str:
    """The URI of the object ``key`` below ``prefix`` (a folder URI, ending in ``/``).

    The key is percent-encoded: pasted raw, a '#', '?' or '%41' in a legal key
    would be read by :func:`split_location` as a fragment, a query or an escape,
    naming another object. Encoded, every key decodes back to itself, for s3://
    and file:// alike.
    """
    return prefix + quote(key, safe="/")


class Store:
    """Objects by URI; one per process."""

    def __init__(self, s3: S3Settings, *, file_roots: Sequence[str] = (),
                 connections: int = 16) -> None:
        self._s3 = s3
        self._connections = connections
        self._client: Minio | None = None
        #: Real folders (symlinks resolved) file:// objects must lie below.
        self.file_roots: tuple[str, ...] = ()
        #: Output folders made and confined already: folder -> its real path.
        self._folders: dict[str, str] = {}
        for root in file_roots:
            self.allow(root)

    def allow(self, prefix: str) -> None:
        """Let file:// objects lie below this folder URI (the job's input, its output, a
        manifest's prefix); s3:// URIs need nothing."""
        scheme, _, path = self._parts(prefix)
        if scheme == "file":
            self.file_roots += (os.path.realpath(path).rstrip("/") + "/",)

    # -- addressing ----------------------------------------------------------------

    def _minio(self) -> Minio:
        if self._client is None:
            self._client = s3_client(self._s3, maxsize=self._connections)
        return self._client

    @staticmethod
    @functools.lru_cache(maxsize=1 << 16)
    def _parts(uri: str) -> tuple[str, str, str]:
        split = split_location(uri)
        if split is None:
            raise InputRefused(f"Location {uri[:200]!r} is not s3://bucket/key or "
                               "file:///path: fix the job's input or output URI")
        return split

    def _path(self, path: str, what: str) -> str:
        """The real path of ``path``, refused unless below a root (none: no file is)."""
        real = os.path.realpath(path)
        if not self.file_roots:
            # A job whose folders are all in S3 reads and writes no local file: a plan or
            # manifest naming file:// must not reach the worker's own files.
            raise InputRefused(f"{what} file://{path} is not in the job's folders, which "
                               "are all in S3: name objects below the input and output "
                               "folders")
        if not any((real + "/").startswith(r) or real + "/" == r for r in self.file_roots):
            raise InputRefused(f"{what} file://{path} resolves outside the job's folders "
                               "(a symbolic link?): keep every object below the input and "
                               "output folders")
        return real

    # -- reading -------------------------------------------------------------------

    def list_folder(self, prefix: str) -> list[tuple[str, int]]:
        """(key relative to ``prefix``, size) of every object below the folder ``prefix``."""
        scheme, bucket, path = self._parts(prefix)
        if scheme == "s3":
            return self._s3_call(prefix, lambda: [
                (o.object_name[len(path):], int(o.size or 0))
                for o in self._minio().list_objects(bucket, prefix=path, recursive=True)
                if o.object_name and not o.object_name.endswith("/")])
        root = self._path(path, "Input folder")

        def unreadable(e: OSError) -> None:
            # os.walk skips a folder it cannot list unless told: that would drop its objects
            # from the job without a word. Gone is fine (a listing is a snapshot).
            if isinstance(e, FileNotFoundError):
                return
            where = os.path.relpath(e.filename, root) if e.filename else "."
            raise InputRefused(f"Input folder {where!r} in file://{root} cannot be listed "
                               f"({e.strerror}): let the worker read it, or remove it")

        out: list[tuple[str, int]] = []
        for folder, dirs, files in os.walk(root, onerror=unreadable):
            for name in sorted(dirs + files):
                full = os.path.join(folder, name)
                key = os.path.relpath(full, root)
                try:
                    info = os.lstat(full)
                except FileNotFoundError:
                    continue  # removed since its folder was listed
                if stat.S_ISLNK(info.st_mode):
                    target = self._path(full, f"Input object {key!r}:")
                    if name in dirs:
                        continue  # a link to a folder inside the root: not descended
                    try:
                        info = os.stat(target)
                    except FileNotFoundError:
                        raise InputRefused(f"Input object {key!r} in file://{root} is a broken "
                                           "symbolic link: remove it") from None
                if stat.S_ISDIR(info.st_mode):
                    continue
                if not stat.S_ISREG(info.st_mode):
                    raise InputRefused(f"Input object {key!r} in file://{root} is not a "
                                       "regular file (a device, pipe or socket): remove it")
                out.append((key, info.st_size))
        return sorted(out)

    def size(self, uri: str) -> int | None:
        """The object's size, None when there is none."""
        scheme, bucket, path = self._parts(uri)
        if scheme == "s3":
            from minio.error import S3Error

            try:
                return int(self._minio().stat_object(bucket, path).size or 0)
            except S3Error as e:
                if e.code in _MISSING:
                    return None
                raise StoreFailed(f"Object {uri} cannot be read ({e.code}): check the S3 "
                                  "credentials and the bucket policy"
                                  f"{access_denied_hint(e.code)}") from None
            except Exception as e:
                raise StoreFailed(f"Object store is unreachable reading {uri} "
                                  f"({type(e).__name__}): check KUBEINFER_S3_ENDPOINT_URL"
                                  ) from None
        real = self._path(path, "Object")
        try:
            info = os.stat(real)
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(info.st_mode):
            raise InputRefused(f"Object {uri} is not a regular file: name a file")
        return info.st_size

    def chunks(self, uri: str, start: int = 0) -> Generator[bytes, None, None]:
        """The object's bytes from ``start`` to its end, :data:`CHUNK` at a time. Close the
        generator to stop early (the connection is dropped, not drained)."""
        scheme, bucket, path = self._parts(uri)
        if scheme == "file":
            yield from self._file_chunks(uri, path, start)
            return
        from minio.error import S3Error

        try:
            resp = self._minio().get_object(bucket, path, offset=start)
        except S3Error as e:
            raise StoreFailed(f"Object {uri} cannot be read ({e.code}): it was listed in the "
                              "plan; check it still exists and the S3 credentials") from None
        except Exception as e:
            raise StoreFailed(f"Object store is unreachable reading {uri} "
                              f"({type(e).__name__}): check KUBEINFER_S3_ENDPOINT_URL") from None
        try:
            yield from resp.stream(CHUNK)
        except GeneratorExit:
            raise
        except Exception as e:
            raise StoreFailed(f"Reading {uri} failed midway ({type(e).__name__}): the "
                              "shard is retried") from None
        finally:
            resp.close()
            resp.release_conn()

    def _real_file(self, path: str, what: str) -> str:
        """The real path of a file to open with ``O_NOFOLLOW``: its folder's real path
        (checked once per folder) and its own name, which may not be a link."""
        parent, name = os.path.split(path)
        real_parent = self._folders.get(parent)
        if real_parent is None:
            real_parent = self._folders[parent] = self._path(parent, what)
        return os.path.join(real_parent, name)

    def _file_chunks(self, uri: str, path: str, start: int) -> Generator[bytes, None, None]:
        # O_NONBLOCK: opening a FIFO must not hang; O_NOFOLLOW: the path checked is the
        # one opened. A name that is itself a link (ELOOP) is resolved and checked whole.
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            try:
                fd = os.open(self._real_file(path, "Input object"), flags)
            except OSError as e:
                if e.errno != errno.ELOOP:
                    raise
                fd = os.open(self._path(path, "Input object"), flags)
        except FileNotFoundError:
            raise StoreFailed(f"Input object {uri} does not exist: it was listed in the plan; "
                              "restore it, or delete the job's _kubeinfer folder to re-plan"
                              ) from None
        except OSError as e:
            raise InputRefused(f"Input object {uri} cannot be opened ({e.strerror})") from None
        with os.fdopen(fd, "rb", buffering=0) as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise InputRefused(f"Input object {uri} is not a regular file: name a file, "
                                   "not a device, pipe or directory")
            f.seek(start)
            while chunk := f.read(CHUNK):
                yield chunk

    def read(self, uri: str, max_bytes: int) -> bytes | None:
        """A whole small object (plans, markers), None when there is none."""
        if self.size(uri) is None:
            return None
        data = bytearray()
        gen = self.chunks(uri)
        try:
            for chunk in gen:
                data += chunk
                if len(data) > max_bytes:
                    raise InputRefused(f"Object {uri} is over {max_bytes} bytes, more than "
                                       "it may hold: remove or shorten it")
        finally:
            gen.close()
        return bytes(data)

    # -- writing -------------------------------------------------------------------

    def write(self, uri: str, source: BinaryIO, length: int,
              content_type: str = "application/octet-stream") -> None:
        """Write ``length`` bytes of ``source`` (at its position) to ``uri``, atomically."""
        scheme, bucket, path = self._parts(uri)
        if scheme == "s3":
            self._s3_call(uri, lambda: self._minio().put_object(
                bucket, path, source, length, content_type=content_type))
            return

        def copy(fd: int) -> None:
            with os.fdopen(fd, "wb", closefd=False) as out:
                shutil.copyfileobj(source, out, CHUNK)

        self._write_file(uri, path, copy)

    def write_bytes(self, uri: str, data: bytes,
                    content_type: str = "application/octet-stream") -> None:
        scheme, bucket, path = self._parts(uri)
        if scheme == "s3":
            self._s3_call(uri, lambda: self._minio().put_object(
                bucket, path, io.BytesIO(data), len(data), content_type=content_type))
            return

        def put(fd: int) -> None:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]

        self._write_file(uri, path, put)

    def _write_file(self, uri: str, path: str, fill: Callable[[int], None]) -> None:
        """A file written by ``fill(fd)`` under a temporary name, renamed into place."""
        parent, name = path.rsplit("/", 1)
        real_parent = self._folders.get(parent)
        if real_parent is None:
            try:
                os.makedirs(parent or "/", exist_ok=True)
            except OSError as e:
                raise StoreFailed(f"Folder file://{parent} cannot be made ({e.strerror}): "
                                  "check the output folder's permissions") from None
            real_parent = self._path(parent or "/", "Output folder")
            # Checked once per folder: thousands of small outputs share a few folders.
            self._folders[parent] = real_parent
        # A name of our own, not mkstemp's: mkstemp costs ~140 µs in a folder of
        # thousands of outputs (its random names), 10x the write. This process and
        # thread are the only writers of this name; a killed run's leftovers are
        # overwritten by the next, and swept by the finalizer (``sweep_temporary``).
        folder = real_parent.rstrip("/")
        # The name cut to 150 bytes, not characters: 150 'é' are 300 bytes, over NAME_MAX.
        short = name.encode(errors="surrogateescape")[:150].decode(errors="ignore")
        tmp = f"{folder}/{TEMP_PREFIX}{os.getpid()}-{threading.get_ident()}-{short}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o644)
            try:
                try:
                    fill(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, f"{folder}/{name}")
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as e:
            raise StoreFailed(f"Object {uri} cannot be written ({e.strerror}): check the "
                              "output folder's permissions and free space") from None

    def delete(self, uri: str) -> None:
        scheme, bucket, path = self._parts(uri)
        if scheme == "s3":
            from minio.error import S3Error

            with contextlib.suppress(S3Error):
                self._minio().remove_object(bucket, path)
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(path, "Object"))

    def prune(self, folder: str) -> None:
        """Remove the empty folders below (and including) a file:// folder; S3 has none."""
        scheme, _, path = self._parts(folder)
        if scheme != "file" or not os.path.isdir(path):
            return
        real = self._path(path, "Folder")
        for sub, _dirs, _files in sorted(os.walk(real), key=lambda w: -len(w[0])):
            with contextlib.suppress(OSError):
                os.rmdir(sub)  # only empty ones go

    def sweep_temporary(self, folder: str) -> int:
        """Remove the temporary files killed writers left below a file:// folder (S3 has
        none: an object appears whole or not at all); returns how many."""
        scheme, _, path = self._parts(folder)
        if scheme != "file" or not os.path.isdir(path):
            return 0
        swept = 0
        for sub, _dirs, files in os.walk(self._path(path, "Folder")):
            for name in files:
                if name.startswith(TEMP_PREFIX):
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(sub, name))
                        swept += 1
        return swept

    def concat(self, dest: str, sources: Sequence[str]) -> None:
        """``dest`` = the sources one after the other, written atomically."""
        scheme, bucket, path = self._parts(dest)
        if scheme == "s3":
            sizes = [self.size(s) or 0 for s in sources]
            if composable(sizes):
                from minio.commonconfig import ComposeSource

                comps = [ComposeSource(*self._parts(s)[1:]) for s in sources]
                self._s3_call(dest, lambda: self._minio().compose_object(bucket, path, comps))
                return
        with tempfile.TemporaryFile() as tmp:
            for source in sources:
                gen = self.chunks(source)
                try:
                    for chunk in gen:
                        tmp.write(chunk)
                finally:
                    gen.close()
            length = tmp.tell()
            tmp.seek(0)
            self.write(dest, tmp, length)

    def _s3_call(self, uri: str, call: Callable[[], T]) -> T:
        from minio.error import S3Error

        try:
            return call()
        except S3Error as e:
            raise StoreFailed(f"Object store refused {uri} ({e.code}): check the bucket exists "
                              "and the worker's S3 credentials may use it") from None
        except (InputRefused, StoreFailed):
            raise
        except ValueError as e:
            raise InputRefused(f"Location {uri[:200]} cannot be named in S3 ({e}): fix the "
                               "job's URI") from None
        except Exception as e:
            raise StoreFailed(f"Object store is unreachable at {uri} ({type(e).__name__}): "
                              "check KUBEINFER_S3_ENDPOINT_URL") from None
