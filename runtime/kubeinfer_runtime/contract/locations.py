"""Object locations callers may name, and the prefixes that confine them: PURE.

An async request names its input object (``X-Amzn-SageMaker-InputLocation``)
and its output and failure objects land at places derived from the
Endpoint's paths. Every one of those URIs must stay inside prefixes the
Endpoint declares: the gateway checks before queueing, the worker checks again
what it dequeues (Redis is not a trust boundary), and the operator derives the
default input prefixes from the same rules. So the rules live here, in the
contract, where both sides import them.

Prefixes are folders: ``s3://bucket/in`` confines to keys below ``in/``, never
to ``s3://bucket/input-secrets``. Locations are compared after percent-decoding
(the worker reads the decoded key), and any ``..`` segment, raw or encoded, is
refused rather than resolved. An S3 key longer than S3 allows (1024 bytes) is
refused too: the store would refuse it on every try.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Sequence
from urllib.parse import unquote, urlsplit

#: Characters that make ``split_location`` parse with urlsplit rather than by hand.
_SPECIAL = frozenset("%?#[]@ ")
#: S3's limit on an object key (UTF-8 bytes): a longer one is refused by the store on
#: every try, so it is refused here, before anything is queued.
MAX_S3_KEY_BYTES = 1024


def split_location(uri: str) -> tuple[str, str, str] | None:
    """``(scheme, bucket, decoded path)`` of an s3:// or file:// URI; None if unparsable.

    For file:// the bucket is "" and the path absolute; for s3:// the path is
    the key without its leading '/'.
    """
    # The common plain URI without urlsplit (a batch job parses two per object: 10,000
    # objects spent a third of a second here); anything urlsplit would treat specially
    # (escapes, queries, fragments, brackets, whitespace it strips) takes its path.
    if uri.isascii() and uri.isprintable() and not _SPECIAL.intersection(uri):
        if uri.startswith("file:///"):
            return "file", "", uri[7:]
        if uri.startswith("s3://"):
            bucket, _, key = uri[5:].partition("/")
            return "s3", bucket, key.lstrip("/")
    try:
        parts = urlsplit(uri)
    except ValueError:  # e.g. "s3://[bucket/key": urlsplit refuses bad IPv6 hosts
        return None
    if parts.scheme == "s3":
        return "s3", parts.netloc, unquote(parts.path.lstrip("/"))
    if parts.scheme == "file":
        return "file", parts.netloc, unquote(parts.path)
    return None


def location_problem(uri: str, what: str) -> str | None:
    """Why ``uri`` cannot be an object location we read or write, else None."""
    if len(uri) > 2048:
        return f"{what} is {len(uri)} characters long: name an object in at most 2048"
    split = split_location(uri)
    if split is None:
        scheme = ""
        try:
            scheme = urlsplit(uri).scheme
        except ValueError:
            return (f"{what} {uri[:200]!r} is not a valid URI: use s3://bucket/key or "
                    "file:///absolute/path")
        return (f"{what} {uri[:200]!r} has unsupported scheme {scheme or '(none)'!r}: "
                "use s3://bucket/key or file:///absolute/path")
    scheme, bucket, path = split
    if any(c in path for c in "\x00\r\n"):
        return f"{what} {uri[:200]!r} contains a control character: name a plain object"
    if scheme == "s3" and (not bucket or not path.strip("/")):
        return f"{what} {uri[:200]!r} must look like s3://bucket/key"
    if scheme == "s3" and len(key := path.encode("utf-8", "surrogatepass")) > MAX_S3_KEY_BYTES:
        return (f"{what} {uri[:200]!r} names an S3 key of {len(key)} bytes: S3 keys are at "
                f"most {MAX_S3_KEY_BYTES} bytes (UTF-8), so name a shorter one")
    if scheme == "file" and (bucket or not path.startswith("/") or not path.strip("/")):
        return f"{what} {uri[:200]!r} must be an absolute path: file:///absolute/path"
    if ".." in path.split("/") or ".." in uri.split("/"):
        return f"{what} {uri[:200]!r} contains '..': name the object without parent segments"
    return None


def normalize_prefix(prefix: str) -> str:
    """``s3://b/in`` -> ``s3://b/in/``; ``s3://b`` -> ``s3://b/``; ``file:///d`` -> ``file:///d/``."""
    split = split_location(prefix)
    if split is None:
        raise ValueError(f"prefix {prefix!r} must be s3://bucket[/prefix] or file:///dir")
    scheme, bucket, path = split
    if scheme == "s3":
        if not bucket:
            raise ValueError(f"prefix {prefix!r} names no bucket: use s3://bucket/prefix")
        key = path.strip("/")
        return f"s3://{bucket}/" + (key + "/" if key else "")
    if bucket or not path.startswith("/"):
        raise ValueError(f"prefix {prefix!r} must be an absolute path: file:///dir")
    clean = posixpath.normpath(path)
    if clean != path.rstrip("/") and path.rstrip("/"):
        raise ValueError(f"prefix {prefix!r} is not a plain absolute path: remove '..', '.' "
                         "and repeated '/'")
    return "file://" + clean.rstrip("/") + "/"


def prefix_problem(prefix: str, what: str) -> str | None:
    """Why ``prefix`` cannot confine locations, else None."""
    if ".." in prefix.split("/"):
        return f"{what} {prefix!r} contains '..': name the folder without parent segments"
    try:
        normalized = normalize_prefix(prefix)
    except ValueError as exc:
        return f"{what}: {exc}"
    if normalized == "file:///":
        return (f"{what} {prefix!r} is the whole filesystem: name the folder inputs are "
                "uploaded to, e.g. file:///data/inputs/")
    return None


def default_input_paths(output_path: str) -> list[str]:
    """Where inputs may come from when the Endpoint says nothing (``async.inputPath``).

    s3:// outputs: the output's bucket (as SageMaker's execution role usually
    allows). file:// outputs: the output folder's parent (``file:///data/out``
    -> ``file:///data/``), or the output folder itself when its parent is the
    filesystem root. Never file:// for an s3:// output: a worker's local files
    are not an input store.
    """
    scheme, bucket, path = split_location(output_path) or ("", "", "")
    if scheme == "s3":
        return [f"s3://{bucket}/"]
    if scheme == "file":
        folder = posixpath.normpath(path.rstrip("/") or "/")
        parent = posixpath.dirname(folder)
        return [normalize_prefix("file://" + (parent if parent != "/" else folder))]
    return []


def within(uri: str, prefixes: Iterable[str]) -> bool:
    """Whether ``uri`` names an object strictly below one of ``prefixes`` (normalized).

    Compared after percent-decoding, and under both readings of its path: as
    written (an S3 key is a name: ``in/../x`` is an object below ``in/``) and
    normalised (a filesystem, or a store that normalises, resolves it to ``x``).
    A path below a prefix one way but not the other is refused: decoding
    ``%2e%2e`` into ``..`` must not let a location climb out of its folder.
    """
    split = split_location(uri)
    if split is None:
        return False
    scheme, bucket, path = split
    if scheme == "file" and bucket:
        return False  # file://host/...: another machine's file, never below a prefix here
    if scheme == "s3":
        # The bucket is a segment too: 's3://b/../x' normalised names bucket x, not b.
        normal = posixpath.normpath(f"/{bucket}/{path}").lstrip("/")
        readings = (f"s3://{bucket}/{path}", f"s3://{normal}")
    else:
        # normpath keeps a leading '//' (POSIX leaves its meaning to the system): one root.
        normal = "/" + posixpath.normpath(path).lstrip("/")
        readings = (f"file://{path}", f"file://{normal}")
    return any(all(r.startswith(p) and len(r) > len(p) for r in readings) for p in prefixes)


def describe_prefixes(prefixes: Sequence[str]) -> str:
    return ", ".join(prefixes) if prefixes else "(none)"
