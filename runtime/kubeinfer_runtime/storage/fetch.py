"""Fetch a model into local storage: the I/O half of ``storage`` (parsing is in ``uri``).

``file://`` models are read where they are (copying a multi-GB file into the
cache would double disk use for nothing; a compiled artifact may be a folder);
``s3://`` models are streamed into the cache directory under a temporary
name, hashed on the way, fsynced and renamed into place, so a crash never
leaves a half-written model that looks complete. The sha256 is returned and
written next to the file.

A download is bounded: an object over ``max_bytes`` (the model server's
``KUBEINFER_MAX_MODEL_BYTES``) is refused from its announced length before a
byte is written, and the stream is cut if more than announced arrives; a
multi-model server also passes ``expect_bytes``, the size it reserved room for,
so an object replaced by a bigger one since (or a store that lies) can never
write past its disk budget. The decisions are :func:`length_problem`, pure.
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from kubeinfer_runtime.errors import (
    InsufficientStorage,
    NotFound,
    NotReady,
    RuntimeServiceError,
)
from kubeinfer_runtime.server_env import S3Config
from kubeinfer_runtime.storage.uri import FileLocation, S3Location, parse_model_uri

if TYPE_CHECKING:
    from minio import Minio

log = logging.getLogger("kubeinfer.storage")

_CHUNK = 1 << 20
_MISSING_CODES = {"NoSuchKey", "NoSuchBucket", "NoSuchObject", "NotFound"}


class ModelNotFoundError(NotFound):
    """The URI is well formed but nothing is there."""


class StorageUnavailable(NotReady):
    """The object store could not be reached or refused access; retrying may help."""


class ModelTooLarge(InsufficientStorage):
    """The object is over the model server's download bound (507); nothing was kept."""


class ModelChanged(NotReady):
    """The object is not the size it had when room was made for it (503); retry."""


#: Retries of a request S3 answers 5xx (waits 0, 0.4, 0.8, 1.6, 3.2, 5 s, each + <0.2 s).
S3_STATUS_RETRIES = 6

#: The setting (env var) of the model server's bound on one downloaded model.
MAX_MODEL_BYTES_SETTING = "KUBEINFER_MAX_MODEL_BYTES"


def length_problem(uri: str, length: int, *, max_bytes: int | None,
                   expect_bytes: int | None, complete: bool) -> RuntimeServiceError | None:
    """Pure: the error of an object of ``length`` bytes (announced, or read so far when
    not ``complete``), or None when it is within ``max_bytes`` and is ``expect_bytes``."""
    size = f"is {length} bytes" if complete else f"sent at least {length} bytes"
    if max_bytes is not None and length > max_bytes:
        return ModelTooLarge(
            f"Model object {uri} {size}, over the "
            f"{max_bytes} bytes a model server downloads ({MAX_MODEL_BYTES_SETTING}): nothing "
            f"was kept; point the URI at the right object, or raise {MAX_MODEL_BYTES_SETTING} "
            "in the variant's env if the model really is that big")
    if expect_bytes is not None and (length > expect_bytes
                                     or (complete and length != expect_bytes)):
        return ModelChanged(
            f"Model object {uri} {size}, but it was "
            f"{expect_bytes} bytes when the disk cache made room for it: it changed while "
            "loading (or the object store answers inconsistently); nothing was kept, retry")
    return None


@dataclass(frozen=True)
class FetchedModel:
    uri: str
    path: Path
    sha256: str
    size: int


def fetch_model(uri: str, *, base_dir: str, cache_dir: str, s3: S3Config,
                max_bytes: int | None = None, expect_bytes: int | None = None) -> FetchedModel:
    """Make the model at ``uri`` available as a local file and hash it.

    ``max_bytes`` bounds a download (``ModelTooLarge`` over it); ``expect_bytes`` is the
    size the caller made room for (``ModelChanged`` when the object is not that size).
    ``file://`` models are not downloaded, so neither applies to them.
    """
    loc = parse_model_uri(uri, base_dir)
    if isinstance(loc, FileLocation):
        return _local(uri, Path(loc.path))
    return _download(uri, loc, Path(cache_dir), s3, max_bytes, expect_bytes)


#: A folder holding this file is a compiled artifact (``contract.compile.MANIFEST_NAME``):
#: it is served in place and identified by its manifest, which lists every file's sha256.
ARTIFACT_MANIFEST = "manifest.json"


def _local(uri: str, path: Path) -> FetchedModel:
    if path.is_dir() and (path / ARTIFACT_MANIFEST).is_file():
        manifest = _local(uri, path / ARTIFACT_MANIFEST)
        return FetchedModel(uri, path, manifest.sha256, manifest.size)
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise ModelNotFoundError(f"Model file {path} {what}: "
                                 "fix the URI or put the model there")
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return FetchedModel(uri, path, h.hexdigest(), size)


def s3_client(s3: S3Config, *, maxsize: int = 10) -> Minio:
    """A minio client for ``s3``: https unless the endpoint URL says http.

    Without explicit keys, credentials come from the usual AWS chain (env,
    ~/.aws, IRSA web identity / instance metadata). ``maxsize`` is the number of
    pooled connections kept per host (raise it for concurrent callers).
    """
    # Imported here: minio pulls in its crypto stack (~1 s of start-up on a
    # busy core), which a server loading a file:// model never needs.
    import urllib3
    from minio.credentials.providers import (
        AWSConfigProvider,
        ChainedProvider,
        EnvAWSProvider,
        EnvMinioProvider,
        IamAwsProvider,
    )

    from kubeinfer_runtime.storage.s3compat import AwsMinio

    url = s3.endpoint_url or "https://s3.amazonaws.com"
    if "://" not in url:
        url = "https://" + url
    parsed = urlparse(url)
    # A bounded retry policy: minio's default retries a dead endpoint for long. A 5xx
    # (AWS's 503 SlowDown above all, which asks callers to back off while a prefix scales)
    # gets more tries and longer, jittered waits than an endpoint that refuses connections:
    # a batch worker that gives up exits and spends one of its pod's few retries. POST too:
    # CreateMultipartUpload and CompleteMultipartUpload are throttled like any request.
    http = urllib3.PoolManager(
        maxsize=maxsize,
        timeout=urllib3.Timeout(connect=5.0, read=60.0),
        retries=urllib3.Retry(total=None, connect=3, read=3, redirect=3, other=3,
                              status=S3_STATUS_RETRIES, backoff_factor=0.2, backoff_max=5.0,
                              backoff_jitter=0.2, status_forcelist=[500, 502, 503, 504],
                              allowed_methods=urllib3.Retry.DEFAULT_ALLOWED_METHODS
                              | {"POST"}),
    )
    kwargs: dict[str, Any] = {"secure": parsed.scheme == "https", "region": s3.region,
                              "http_client": http}
    if s3.access_key and s3.secret_key:
        kwargs.update(access_key=s3.access_key, secret_key=s3.secret_key,
                      session_token=_session_token(s3.access_key))
    else:
        kwargs["credentials"] = ChainedProvider([
            EnvAWSProvider(), EnvMinioProvider(), AWSConfigProvider(), IamAwsProvider(),
        ])
    return AwsMinio(parsed.netloc, **kwargs)


def _session_token(access_key: str) -> str | None:
    """``AWS_SESSION_TOKEN`` when ``access_key`` is ``AWS_ACCESS_KEY_ID``'s, else None.

    The settings take the key pair from the AWS variables but have no field for the
    token: temporary keys (``ASIA...``: an assumed role, SSO, ``aws sts``) sent without
    it are refused by AWS (InvalidAccessKeyId). A token beside other keys (a MinIO or
    SeaweedFS pair in ``KUBEINFER_S3_*``) belongs to those AWS keys, not to these.
    """
    if access_key != os.environ.get("AWS_ACCESS_KEY_ID"):
        return None
    return os.environ.get("AWS_SESSION_TOKEN") or None


def access_denied_hint(code: str | None) -> str:
    """What else AccessDenied may mean on AWS: there a missing object reads as 403, not 404,
    unless the caller may also s3:ListBucket (SeaweedFS, our test store, answers 404)."""
    if code != "AccessDenied":
        return ""
    return ("; or the object does not exist (AWS answers AccessDenied for a missing object "
            "when the role lacks s3:ListBucket on the bucket)")


def cache_path(cache_dir: Path, loc: S3Location) -> Path:
    """Where an object is cached: one folder per URI, the object's own file name."""
    digest = hashlib.sha256(loc.uri.encode()).hexdigest()[:16]
    return cache_dir / digest / posixpath.basename(loc.key)


def _announced_length(resp: Any) -> int | None:
    try:
        return int(resp.headers.get("Content-Length"))
    except (TypeError, ValueError):
        return None


def _download(uri: str, loc: S3Location, cache_dir: Path, s3: S3Config,
              max_bytes: int | None, expect_bytes: int | None) -> FetchedModel:
    import urllib3
    from minio.error import S3Error

    dest = cache_path(cache_dir, loc)
    dest.parent.mkdir(parents=True, exist_ok=True)
    client = s3_client(s3)
    try:
        resp = client.get_object(loc.bucket, loc.key)
    except S3Error as e:
        if e.code in _MISSING_CODES:
            raise ModelNotFoundError(f"Model object {uri} does not exist ({e.code}): upload it "
                                     "or fix the model URI") from None
        raise StorageUnavailable(f"Model object {uri} cannot be read ({e.code}: {e.message}): "
                                 "check the S3 credentials and bucket policy"
                                 f"{access_denied_hint(e.code)}") from None
    except (urllib3.exceptions.HTTPError, OSError, ValueError) as e:
        raise StorageUnavailable(f"Object store {s3.endpoint_url or 's3.amazonaws.com'} is "
                                 f"unreachable while fetching {uri} ({e}): check "
                                 "KUBEINFER_S3_ENDPOINT_URL") from None
    announced = _announced_length(resp)
    problem = None if announced is None else length_problem(
        uri, announced, max_bytes=max_bytes, expect_bytes=expect_bytes, complete=True)
    if problem is not None:
        resp.close()
        resp.release_conn()
        raise problem
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".download-")
    h = hashlib.sha256()
    size = 0
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in resp.stream(_CHUNK):
                size += len(chunk)
                # More than announced (or nothing announced): cut the stream at the bound.
                problem = length_problem(uri, size, max_bytes=max_bytes,
                                         expect_bytes=expect_bytes, complete=False)
                if problem is not None:
                    raise problem
                h.update(chunk)
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        problem = length_problem(uri, size, max_bytes=max_bytes, expect_bytes=expect_bytes,
                                 complete=True)
        if problem is not None:
            raise problem
        os.replace(tmp, dest)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, RuntimeServiceError):
            raise
        if isinstance(e, Exception):
            raise StorageUnavailable(f"Download of {uri} failed after {size} bytes ({e}): "
                                     "retry, or check the object store") from None
        raise
    finally:
        resp.close()
        resp.release_conn()
    digest = h.hexdigest()
    dest.with_name(dest.name + ".sha256").write_text(f"{digest}  {dest.name}\n")
    log.info("Downloaded %s to %s (%d bytes, sha256 %s)", uri, dest, size, digest)
    return FetchedModel(uri, dest, digest, size)
