"""Model URI parsing: PURE, no I/O.

Turns ``file:///abs/path``, ``file://relative/path`` (against a base directory)
and ``s3://bucket/key`` into a typed location, and refuses anything that could
escape where it is meant to point (``..`` segments), before any I/O happens.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from urllib.parse import unquote, urlparse

from kubeinfer_runtime.errors import ValidationError

#: Names of S3 directory buckets (S3 Express One Zone) end with this: they need zonal
#: endpoints and session auth the minio client does not do, so they are refused by name.
DIRECTORY_BUCKET_SUFFIX = "--x-s3"


class InvalidModelUri(ValidationError):
    """The URI cannot name a model we can read; the message says how to write it."""


@dataclass(frozen=True)
class FileLocation:
    path: str


@dataclass(frozen=True)
class S3Location:
    bucket: str
    key: str

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


Location = FileLocation | S3Location


def parse_model_uri(uri: str, base_dir: str = "/") -> Location:
    """Parse a model URI; relative ``file://`` paths resolve against ``base_dir``."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        return _s3(uri, parsed.netloc, parsed.path)
    if parsed.scheme == "file":
        return _file(uri, unquote(parsed.netloc + parsed.path), base_dir)
    raise InvalidModelUri(f"Model URI {uri!r} has unsupported scheme "
                          f"{parsed.scheme or '(none)'!r}: use s3://bucket/key or file:///path")


def _s3(uri: str, bucket: str, path: str) -> S3Location:
    key = path.lstrip("/")
    if not bucket or not key:
        raise InvalidModelUri(f"Model URI {uri!r} must look like s3://bucket/path/to/model.onnx")
    if key.endswith("/"):
        raise InvalidModelUri(f"Model URI {uri!r} names a prefix, not an object: "
                              "point it at the model file")
    _refuse_dotdot(uri, key)
    if bucket.endswith(DIRECTORY_BUCKET_SUFFIX):
        raise InvalidModelUri(f"Model URI {uri!r} names an S3 directory bucket (S3 Express "
                              "One Zone), which kubeinfer does not support: copy the model "
                              "to a general purpose bucket")
    return S3Location(bucket, key)


def _file(uri: str, path: str, base_dir: str) -> FileLocation:
    if not path.strip("/"):
        raise InvalidModelUri(f"Model URI {uri!r} names no file: use file:///absolute/path")
    _refuse_dotdot(uri, path)
    if not path.startswith("/"):
        # file://models/x.onnx: netloc "models" + path "/x.onnx", relative.
        path = posixpath.join(base_dir, path)
    return FileLocation(posixpath.normpath(path))


def _refuse_dotdot(uri: str, path: str) -> None:
    if ".." in path.split("/"):
        raise InvalidModelUri(f"Model URI {uri!r} contains '..': name the model by a path "
                              "without parent-directory segments")
