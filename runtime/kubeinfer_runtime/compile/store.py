"""The compiler's I/O with the outside: fetch the inputs, publish the outputs, share the cache.

* Inputs (the model, the calibration set) come through ``storage.fetch`` like a
  served model: ``file://`` read in place, ``s3://`` downloaded and hashed.
* Outputs are built in a local folder, then published under ``output_uri``:
  for ``file://`` the previous artifact folder is swapped out in one rename
  (a reader never sees half of one); for ``s3://`` each file is uploaded, the
  tarball and the report last.
* The artifact cache (``artifact_cache_uri``) is read back with the same
  fetch: a folder per key holding what ``publish`` wrote; an entry counts only
  when its report (written last) and its tarball's sha256 agree.
* The tuning cache can live in the object store (``tuning_cache_uri``): one
  ``<key>.tar.gz`` per cache folder, restored before tuning and saved after
  new trials, so Jobs on fresh pods share records.
"""

from __future__ import annotations

import logging
import shutil
import uuid
from pathlib import Path
from urllib.parse import urlparse

from pydantic import ValidationError

from kubeinfer_runtime.compile.bundle import pack, unpack
from kubeinfer_runtime.compile.errors import BadInput, CompileError
from kubeinfer_runtime.compile.manifest import ArtifactError
from kubeinfer_runtime.contract import S3Settings
from kubeinfer_runtime.contract.compile import (
    ARTIFACT_DIR,
    ARTIFACT_TARBALL,
    REPORT_NAME,
    CompileReport,
)
from kubeinfer_runtime.errors import RuntimeServiceError
from kubeinfer_runtime.storage.fetch import (
    FetchedModel,
    ModelNotFoundError,
    fetch_model,
    s3_client,
)

log = logging.getLogger("kubeinfer.compile")


def fetch(uri: str, what: str, cache_dir: Path, s3: S3Settings) -> FetchedModel:
    """``uri`` as a local file; BadInput when nothing is there, CompileError when unreachable."""
    try:
        return fetch_model(uri, base_dir="/", cache_dir=str(cache_dir), s3=s3)
    except ModelNotFoundError as e:
        raise BadInput(f"{what.capitalize()} {uri} not found ({e.message}): fix the URI") from None
    except RuntimeServiceError as e:
        if e.status < 500 and e.status != 404:
            raise BadInput(f"{what.capitalize()} URI {uri!r} is invalid: {e.message}") from None
        raise CompileError(f"{what.capitalize()} {uri} cannot be read: {e.message}") from None


def _split(uri: str) -> tuple[str, str, str]:
    """(scheme, bucket, folder) of a ``file://`` or ``s3://`` folder URI."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return "file", "", (parsed.netloc + parsed.path).rstrip("/")
    if parsed.scheme == "s3" and parsed.netloc:
        return "s3", parsed.netloc, parsed.path.strip("/")
    raise BadInput(f"Output URI {uri!r} must be file:///abs/dir or s3://bucket/prefix")


def join(uri: str, name: str) -> str:
    return uri.rstrip("/") + "/" + name


def publish(local: Path, output_uri: str, s3: S3Settings) -> None:
    """Publish ``local`` (artifact/, artifact.tar.gz, report.json) under ``output_uri``."""
    scheme, bucket, folder = _split(output_uri)
    order = [*sorted((local / ARTIFACT_DIR).iterdir()), local / ARTIFACT_TARBALL,
             local / REPORT_NAME]
    if scheme == "file":
        dest = Path(folder)
        if not dest.is_absolute():
            raise BadInput(f"Output URI {output_uri!r} must be an absolute path")
        try:
            dest.mkdir(parents=True, exist_ok=True)
            staged = dest / f".{ARTIFACT_DIR}-{uuid.uuid4().hex[:8]}"
            shutil.copytree(local / ARTIFACT_DIR, staged)
            old = dest / f".{ARTIFACT_DIR}-old-{uuid.uuid4().hex[:8]}"
            if (dest / ARTIFACT_DIR).exists():
                (dest / ARTIFACT_DIR).rename(old)
            staged.rename(dest / ARTIFACT_DIR)
            shutil.rmtree(old, ignore_errors=True)
            for path in order[-2:]:
                shutil.copyfile(path, dest / f".{path.name}.tmp")
                (dest / f".{path.name}.tmp").replace(dest / path.name)
        except OSError as e:
            raise CompileError(f"Cannot write the artifact to {dest} ({e.strerror}): check "
                               "the output folder's permissions and free space") from None
        return
    client = s3_client(s3)
    try:
        for path in order:
            rel = (f"{ARTIFACT_DIR}/{path.name}" if path.parent.name == ARTIFACT_DIR
                   else path.name)
            client.fput_object(bucket, f"{folder}/{rel}".lstrip("/"), str(path))
    except Exception as e:  # minio raises S3Error, urllib3 errors, OSError
        raise CompileError(f"Cannot upload the artifact to {output_uri} ({e}): check "
                           "KUBEINFER_S3_* and the bucket") from None


def lookup_artifact(folder_uri: str, local: Path, s3: S3Settings, source_sha256: str, *,
                    copy: bool = True) -> CompileReport | None:
    """The report of a complete artifact under ``folder_uri`` (with ``copy``, the artifact
    is copied into ``local`` in the layout ``publish`` takes); None when there is none or
    it is damaged.

    Complete means: ``report.json`` (published last) says ok and names the same
    source model, and the tarball's sha256 is the one it names. A damaged or
    half-written entry is a miss, so the compile that follows replaces it.
    """
    download = local / "download"
    try:
        return _lookup(folder_uri, local, download, s3, source_sha256, copy)
    finally:
        shutil.rmtree(download, ignore_errors=True)


def _lookup(folder_uri: str, local: Path, download: Path, s3: S3Settings,
            source_sha256: str, copy: bool) -> CompileReport | None:
    try:
        found = fetch_model(join(folder_uri, REPORT_NAME), base_dir="/",
                            cache_dir=str(download), s3=s3)
        report = CompileReport.model_validate_json(found.path.read_bytes())
        if not report.ok or report.source_sha256 != source_sha256:
            return None
        tar = fetch_model(join(folder_uri, ARTIFACT_TARBALL), base_dir="/",
                          cache_dir=str(download), s3=s3)
    except ModelNotFoundError:
        return None
    except ValidationError:
        log.warning("Artifact cache entry %s has an unreadable report: compiling again",
                    folder_uri)
        return None
    except RuntimeServiceError as e:
        raise CompileError(f"Artifact cache {folder_uri} cannot be read ({e.message}): check "
                           "KUBEINFER_S3_* or the cache folder") from None
    if tar.sha256 != report.sha256:
        log.warning("Artifact cache entry %s: tarball sha256 %s, its report says %s: "
                    "compiling again", folder_uri, tar.sha256[:12], report.sha256[:12])
        return None
    if not copy:
        return report
    try:
        unpack(tar.path, local / ARTIFACT_DIR)
        shutil.copyfile(tar.path, local / ARTIFACT_TARBALL)
    except (ArtifactError, OSError) as e:
        log.warning("Artifact cache entry %s cannot be unpacked (%s): compiling again",
                    folder_uri, e)
        shutil.rmtree(local / ARTIFACT_DIR, ignore_errors=True)
        return None
    return report


def restore_cache(cache_uri: str, key: str, dest: Path, s3: S3Settings) -> bool:
    """Unpack ``<cache_uri>/<key>.tar.gz`` into ``dest``; False when there is none."""
    scheme, bucket, folder = _split(cache_uri)
    name = f"{key}.tar.gz"
    tmp = dest.parent / f".{name}.{uuid.uuid4().hex[:8]}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        if scheme == "file":
            src = Path(folder) / name
            if not src.is_file():
                return False
            shutil.copyfile(src, tmp)
        else:
            from minio.error import S3Error

            try:
                s3_client(s3).fget_object(bucket, f"{folder}/{name}".lstrip("/"), str(tmp))
            except S3Error as e:
                if e.code in ("NoSuchKey", "NoSuchObject", "NotFound"):
                    return False
                raise
        unpack(tmp, dest)
        return True
    except (OSError, ArtifactError) as e:
        raise CompileError(f"Tuning cache {join(cache_uri, name)} cannot be restored: "
                           f"{e}") from None
    except Exception as e:
        raise CompileError(f"Tuning cache {join(cache_uri, name)} cannot be read ({e}): check "
                           "KUBEINFER_S3_* or unset KUBEINFER_TUNING_CACHE_URI") from None
    finally:
        tmp.unlink(missing_ok=True)


def save_cache(src: Path, cache_uri: str, key: str, s3: S3Settings) -> None:
    """Pack the cache folder ``src`` (its top-level files) as ``<cache_uri>/<key>.tar.gz``."""
    scheme, bucket, folder = _split(cache_uri)
    name = f"{key}.tar.gz"
    tmp = src.parent / f".{name}.{uuid.uuid4().hex[:8]}"
    try:
        pack(src, tmp)
        if scheme == "file":
            Path(folder).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(tmp, Path(folder) / f".{name}.tmp")
            (Path(folder) / f".{name}.tmp").replace(Path(folder) / name)
        else:
            s3_client(s3).fput_object(bucket, f"{folder}/{name}".lstrip("/"), str(tmp))
    except Exception as e:
        raise CompileError(f"Tuning cache {join(cache_uri, name)} cannot be saved ({e})") from None
    finally:
        tmp.unlink(missing_ok=True)
