"""Multi-model target names → model locations under the endpoint's prefix: PURE, no I/O.

``X-Amzn-SageMaker-Target-Model`` comes straight from the client, so it is
hostile input: it must never name anything outside the prefix. Rather than
trying to normalise tricks away (``..``, ``%2e%2e``, ``\\``, absolute paths,
``s3://other-bucket/``, ``file:``), a name that contains any of them is refused
outright, before any file or object is touched. A ``file://`` prefix is also
checked after symlinks are resolved, by the I/O side (``MultiModelStore``).
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass

from kubeinfer_runtime.errors import ValidationError
from kubeinfer_runtime.storage.uri import (
    DIRECTORY_BUCKET_SUFFIX,
    FileLocation,
    Location,
    S3Location,
)

#: SageMaker's limit on TargetModel.
MAX_TARGET_LENGTH = 1024
#: A file name's limit on common filesystems (NAME_MAX): longer segments cannot exist.
MAX_SEGMENT_BYTES = 255

#: Characters that only ever appear in a name to play URL or shell tricks:
#: percent-encoding, query/fragment, scheme separators, backslashes, and any
#: control or whitespace character — the C1 controls (0x80-0x9f) included, which is
#: what those bytes in a header become (headers are decoded as latin-1).
_FORBIDDEN = re.compile(r"[%?#:\\\x00-\x20\x7f-\x9f]")


class InvalidTargetModel(ValidationError):
    """The target model name is refused (400); nothing was read."""


@dataclass(frozen=True)
class ModelPrefix:
    """A parsed ``multiModel.prefix``: where every target model lives."""

    uri: str
    #: ``s3`` or ``file``.
    scheme: str
    #: Bucket for s3, empty for file.
    bucket: str
    #: Key prefix (s3) or absolute directory (file), always ending in ``/``.
    root: str

    def locate(self, target: str) -> Location:
        """The location of ``target`` (already checked by :func:`check_target`)."""
        if self.scheme == "s3":
            return S3Location(self.bucket, self.root + target)
        return FileLocation(self.root + target)

    def describe(self, target: str) -> str:
        if self.scheme == "s3":
            return f"s3://{self.bucket}/{self.root}{target}"
        return f"file://{self.root}{target}"


def parse_prefix(uri: str, base_dir: str = "/") -> ModelPrefix:
    """Parse ``s3://bucket/prefix/`` or ``file:///dir/`` (relative file:// against base_dir)."""
    if uri.startswith("s3://"):
        bucket, _, key = uri[5:].partition("/")
        if not bucket:
            raise ValidationError(f"Multi-model prefix {uri!r} must look like "
                                  "s3://bucket/models/")
        if bucket.endswith(DIRECTORY_BUCKET_SUFFIX):
            raise ValidationError(f"Multi-model prefix {uri!r} names an S3 directory bucket "
                                  "(S3 Express One Zone), which kubeinfer does not support: "
                                  "use a general purpose bucket")
        key = key.lstrip("/")
        if ".." in key.split("/"):
            raise ValidationError(f"Multi-model prefix {uri!r} contains '..': remove it")
        if key and not key.endswith("/"):
            key += "/"
        return ModelPrefix(uri, "s3", bucket, key)
    if uri.startswith("file://"):
        path = uri[7:]
        if ".." in path.split("/"):
            raise ValidationError(f"Multi-model prefix {uri!r} contains '..': remove it")
        if not path.startswith("/"):
            path = posixpath.join(base_dir, path)
        root = posixpath.normpath(path)
        return ModelPrefix(uri, "file", "", root.rstrip("/") + "/")
    raise ValidationError(f"Multi-model prefix {uri!r} has an unsupported scheme: use "
                          "s3://bucket/models/ or file:///models/")


def check_target(target: str) -> str:
    """Return ``target`` when it is a safe relative model name, else raise 400.

    Allowed: a relative path of non-empty segments, none of them ``.`` or
    ``..``, without the characters in ``_FORBIDDEN``.
    """
    if not target:
        raise InvalidTargetModel("Header X-Amzn-SageMaker-Target-Model is empty: name the model "
                                 "relative to the endpoint's prefix, e.g. tenant-42/model.onnx")
    shown = target[:100] + ("..." if len(target) > 100 else "")
    if len(target) > MAX_TARGET_LENGTH:
        raise InvalidTargetModel(f"Target model {shown!r} is longer than {MAX_TARGET_LENGTH} "
                                 "characters: use a shorter name")
    if _FORBIDDEN.search(target):
        raise InvalidTargetModel(f"Target model {shown!r} contains a character that is not "
                                 "allowed (%, ?, #, :, \\, spaces or control characters): name "
                                 "the model by its plain path relative to the prefix")
    if target.startswith("/"):
        raise InvalidTargetModel(f"Target model {shown!r} is an absolute path: name the model "
                                 "relative to the endpoint's prefix")
    for segment in target.split("/"):
        if segment in ("", ".", ".."):
            raise InvalidTargetModel(f"Target model {shown!r} has an empty, '.' or '..' path "
                                     "segment: name the model by a path inside the prefix")
        if len(segment.encode()) > MAX_SEGMENT_BYTES:
            raise InvalidTargetModel(f"Target model {shown!r} has a path segment longer than "
                                     f"{MAX_SEGMENT_BYTES} bytes: use shorter folder and file "
                                     "names")
    return target
